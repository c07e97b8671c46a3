"""User-facing errors, the CLI guard, atomic file output and TensorFlow start-up quieting."""
import contextlib
import functools
import os
import re
import sys
import tempfile


class UserError(Exception):
    """A problem with the user's input (file, config key, data): shown as one line, no traceback."""


def cli_guard(fn):
    """Wrap an absl `main` so a UserError ends the script with one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f'error: {err}', file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print('interrupted: the last checkpoint is kept; run the same command to resume.',
                  file=sys.stderr)
            sys.exit(130)

    return wrapper


# ---------------------------------------------------------------------------------------------
def _umask_mode():
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_output(path, mode='wb', permissions=None):
    """Open a temporary file beside `path`; rename it into place only if the block succeeds.

    The file is created 0600 and gets `permissions` (default: the umask's usual mode) only once
    written, so a secret written with permissions=0o600 is never readable by others.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', dir=directory)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode() if permissions is None else permissions)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` for writers that need a file name; rename on success."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', dir=directory)
    os.close(fd)
    try:
        yield tmp
        if os.path.isfile(tmp):
            os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# TensorFlow's native start-up lines. Those printed before absl::InitializeLog ignore
# TF_CPP_MIN_LOG_LEVEL, and the cuInit failure of a CPU-only machine is logged at ERROR level.
_NATIVE_LOG = re.compile(rb'^([IWEF])\d{4} \d+:\d+:\d+\.\d+ +\d+ [\w.]+:\d+\] ')
_NATIVE_NOISE = (b'WARNING: All log messages before absl::InitializeLog() is called',
                 b'To enable the following instructions:')
_CPU_ONLY_ERRORS = (b'failed call to cuInit', b'Unable to register cu')


def native_log_lines_to_keep(lines, min_level):
    """The lines of captured native stderr worth showing: drops TensorFlow's start-up noise.

    Log lines below `min_level` (0 INFO, 1 WARNING, 2 ERROR, as TF_CPP_MIN_LOG_LEVEL) and the
    CUDA-initialisation errors of a machine without GPU go; anything else (real errors, Python
    warnings) is kept.
    """
    kept = []
    for line in lines:
        match = _NATIVE_LOG.match(line)
        if match:
            level = 'IWEF'.index(match.group(1).decode())
            if level < min_level or (level == 2 and any(s in line for s in _CPU_ONLY_ERRORS)):
                continue
        elif line.startswith(_NATIVE_NOISE):
            continue
        kept.append(line)
    return kept


@contextlib.contextmanager
def filtered_native_stderr(min_level):
    """Send file descriptor 2 to a temporary file in the block, then replay what is worth showing."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = native_log_lines_to_keep(capture.read().splitlines(keepends=True), min_level)
            if kept:
                sys.stderr.flush()
                os.write(2, b''.join(kept))


def float16_without_onednn(cfg):
    """For a mixed_float16 run, turn oneDNN off before TensorFlow is imported; True if it did.

    oneDNN's float16 convolution filter gradients are emulated on CPUs: a MobileNetV2 step (batch 8)
    took 7.0 s with oneDNN, 0.46 s without it and 0.12 s in float32 with it (Intel Xeon, 2 cores).
    GPU kernels do not depend on the switch; a TF_ENABLE_ONEDNN_OPTS the user set is kept.
    """
    if (cfg.get('mixed_precision') != 'mixed_float16' or 'TF_ENABLE_ONEDNN_OPTS' in os.environ
            or 'tensorflow' in sys.modules):
        return False
    os.environ['TF_ENABLE_ONEDNN_OPTS'] = '0'
    print('[*] mixed_float16: oneDNN is off (TF_ENABLE_ONEDNN_OPTS=0): its float16 gradients are '
          'about 15x slower on a CPU. On a CPU with AVX512_BF16, mixed_bfloat16 is the faster '
          'choice.')
    return True


def quiet_tensorflow():
    """Import TensorFlow without its CPU-only start-up chatter; call it before anything imports it.

    TF_CPP_MIN_LOG_LEVEL (default 2: errors only) must be set before the import, but TensorFlow
    2.21 still prints its early lines and, without a GPU driver, a cuInit error: those are filtered
    out of the import and of the device probe. Real errors, and everything after, still show.
    """
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    if 'tensorflow' in sys.modules:
        return
    try:
        min_level = int(os.environ['TF_CPP_MIN_LOG_LEVEL'])
    except ValueError:
        min_level = 2
    with filtered_native_stderr(min_level):
        import tensorflow as tf
        if not os.path.exists('/dev/nvidiactl'):
            # No NVIDIA driver: the probe fails anyway; do it here, where its error is filtered.
            # (With a driver, device set-up is left to the script, e.g. after --gpu is parsed.)
            tf.config.list_physical_devices('GPU')
