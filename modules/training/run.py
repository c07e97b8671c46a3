"""Training infrastructure shared by both stages.

Both stages use the same pieces: a tf.distribute strategy, an SGD optimizer whose `iterations`
counter is the global step, a CheckpointManager that saves model + optimizer every `save_steps`
(so a killed run resumes exactly where its last checkpoint was), TensorBoard scalars, a tqdm bar
and a guard that stops on a non-finite loss without overwriting the last good checkpoint.
"""
import contextlib
import math
import os
import tempfile
import time

import tensorflow as tf
from tqdm import tqdm

from modules.config import checkpoint_dir, log_dir
from modules.utils import UserError


def configure_devices(gpu=None, cpu_devices=None):
    """Pick visible GPUs (`gpu` like '0,1'; '' for none) and optionally split the CPU into devices.

    Must run before TensorFlow initialises its devices.
    """
    if gpu is not None:
        os.environ['CUDA_VISIBLE_DEVICES'] = gpu
    for device in tf.config.list_physical_devices('GPU'):
        tf.config.experimental.set_memory_growth(device, True)
    if cpu_devices and cpu_devices > 1:
        cpu = tf.config.list_physical_devices('CPU')[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)


def get_strategy():
    """MultiWorkerMirrored when TF_CONFIG is set, else Mirrored over the GPUs or the CPU devices."""
    if os.environ.get('TF_CONFIG'):
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices('GPU')
    devices = gpus or tf.config.list_logical_devices('CPU')
    return tf.distribute.MirroredStrategy(devices=[d.name for d in devices])


def is_chief(strategy):
    """True on the worker that owns checkpoints and logs (always True outside multi-worker)."""
    resolver = getattr(strategy.extended, '_cluster_resolver', None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == 'chief' or (resolver.task_type == 'worker'
                                             and resolver.task_id == 0
                                             and 'chief' not in resolver.cluster_spec().as_dict())


class WarmupSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """lr(t) = base_lr * t / warmup for t < warmup, then the config's schedule.

    After the warm-up: constant base_lr; 'step': x0.1 at each of `lr_steps` (absolute steps);
    'cosine': base_lr * (1 + cos(pi * u)) / 2 and 'poly': base_lr * (1 - u)^2 (arcface_torch),
    with u = (t - warmup) / (total - warmup) clipped to [0, 1], so both reach 0 at the last step.
    """

    def __init__(self, base_lr, total_steps, warmup_steps=0, schedule='constant', lr_steps=()):
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.schedule = schedule
        self.lr_steps = [int(b) for b in lr_steps]

    def __call__(self, step):
        """Learning rate at optimizer step `step` (0-based)."""
        t = tf.cast(step, tf.float32)
        base = tf.constant(self.base_lr, tf.float32)
        span = float(max(self.total_steps - self.warmup_steps, 1))
        u = tf.clip_by_value((t - self.warmup_steps) / span, 0.0, 1.0)
        if self.schedule == 'cosine':
            lr = base * 0.5 * (1.0 + tf.cos(math.pi * u))
        elif self.schedule == 'poly':
            lr = base * tf.square(1.0 - u)
        elif self.schedule == 'step' and self.lr_steps:
            passed = tf.reduce_sum(tf.cast(t >= tf.constant(self.lr_steps, tf.float32), tf.float32))
            lr = base * tf.pow(0.1, passed)
        else:
            lr = base
        if self.warmup_steps:
            lr = tf.where(t < self.warmup_steps, base * t / self.warmup_steps, lr)
        return lr

    def get_config(self):
        """Constructor arguments (Keras serialisation)."""
        return {'base_lr': self.base_lr, 'total_steps': self.total_steps,
                'warmup_steps': self.warmup_steps, 'schedule': self.schedule,
                'lr_steps': self.lr_steps}


def learning_rate(cfg, total_steps):
    """The config's learning rate: warm-up, then constant, step, cosine or poly decay."""
    if cfg['lr_schedule'] == 'constant' and not cfg['warmup_steps']:
        return float(cfg['base_lr'])
    return WarmupSchedule(cfg['base_lr'], total_steps, cfg['warmup_steps'], cfg['lr_schedule'],
                          cfg['lr_steps'])


def make_optimizer(cfg, total_steps, loss_scaling=True):
    """SGD with Nesterov momentum 0.9; wrapped in dynamic loss scaling under mixed_float16."""
    optimizer = tf.keras.optimizers.SGD(learning_rate=learning_rate(cfg, total_steps),
                                        momentum=0.9, nesterov=True)
    if loss_scaling and cfg['mixed_precision'] == 'mixed_float16':
        optimizer = tf.keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


@contextlib.contextmanager
def dtype_policy(cfg):
    """Build models under the config's mixed-precision policy; restore the previous one after."""
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(cfg['mixed_precision'] or 'float32')
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunState:
    """Checkpointing, TensorBoard and progress reporting for one training run.

    The host reads the loss only every `log_steps` steps (and before every checkpoint), so the
    device is not stalled each step. The NaN guard still sees every step: the train step folds
    `is_finite(loss)` into the device-side flag `finite` (see `track_finite`), which is read at
    log and save time; a checkpoint is never written once a non-finite loss has been seen.
    """

    def __init__(self, cfg, checkpoint, optimizer, strategy, total_steps, batch_size):
        self.cfg = cfg
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.chief = is_chief(strategy)
        directory = checkpoint_dir(cfg)
        if not self.chief:  # other workers must write somewhere, but not over the chief's files
            directory = tempfile.mkdtemp(prefix='ckpt_worker_')
        self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=3)
        self.restored = self.manager.latest_checkpoint
        # The step count is the trainer's own: optimizer.iterations stays put on the steps that
        # dynamic loss scaling skips, so a mixed_float16 run resumed from it would repeat steps.
        self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name='trainer_step')
        older = bool(self.restored) and 'trainer_step' not in {
            name.split('/')[0] for name, _ in tf.train.list_variables(self.restored)}
        if not older:  # a checkpoint without the variable would fail the restore's assertion
            checkpoint.trainer_step = self.step_var
        if self.restored:
            checkpoint.restore(self.restored).assert_existing_objects_matched()
        if older:  # written before the trainer kept its own count: take the optimizer's
            self.step_var.assign(optimizer.iterations)
            checkpoint.trainer_step = self.step_var
        self.writer = tf.summary.create_file_writer(log_dir(cfg) if self.chief else
                                                    tempfile.mkdtemp(prefix='logs_worker_'))
        self.step = int(self.step_var.numpy())  # counted on the host, stored at save time
        self.checked_step = self.step  # last step whose losses are known to be finite
        self.finite = tf.Variable(True, trainable=False, name='all_losses_finite')
        self.bar = None
        self.started = None
        self.warm = None
        self.last = None
        self.paused = self.paused_at_last = 0.0  # seconds of checkpoint saves, not training
        self.images = 0
        self.bad_images = None  # a modules.dataset.BadImages when the data pipeline reports to it

    def track_finite(self, loss):
        """Inside a train step: fold this step's loss into the device-side finite flag."""
        self.finite.assign(tf.logical_and(self.finite, tf.reduce_all(tf.math.is_finite(loss))))

    def start(self):
        """Open the progress bar; report where the run starts from."""
        if self.restored:
            print(f'[*] resumed from {self.restored} at step {self.step}')
        else:
            print(f'[*] training from scratch, checkpoints in {self.manager.directory}')
        self.bar = tqdm(total=self.total_steps, initial=self.step, unit='step', dynamic_ncols=True,
                        disable=not self.chief)
        self.started = time.perf_counter()

    def _check(self, loss=None):
        """Stop on a non-finite loss since the last check, or on a bad image in fail mode."""
        finite = bool(self.finite.numpy())
        if finite and loss is not None:
            finite = math.isfinite(float(loss))
        if not finite:
            self.close()
            window = (f'at step {self.step}' if self.step - self.checked_step <= 1 else
                      f'between steps {self.checked_step + 1} and {self.step}')
            raise NonFiniteLoss(f'the loss became NaN or infinite {window}; stopped without '
                                f'saving, last good checkpoint: {self.manager.latest_checkpoint}')
        self.checked_step = self.step
        if self.bad_images is not None and self.bad_images.count:
            try:
                self.bad_images.check()
            except UserError as err:
                self.close()
                raise type(err)(f'{err}; stopped at step {self.step} without saving, last good '
                                f"checkpoint: {self.manager.latest_checkpoint or 'none yet'}") \
                    from None

    def after_step(self, loss, scalars=None):
        """Record one finished step (`loss`, `scalars`: tensors or floats, read only when logged)."""
        self.step += 1
        now = time.perf_counter()
        if self.warm is None:
            self.warm = now  # the first step traces the tf.function: left out of the rate
        else:
            self.images += self.batch_size
            self.last = now
            self.paused_at_last = self.paused
        self.bar.update(1)
        save_due = self.step % self.cfg['save_steps'] == 0 or self.step >= self.total_steps
        if self.step % self.cfg['log_steps'] and not save_due:
            return
        self._check(loss)
        loss = float(loss)
        rate = self.images_per_second()
        bad = {} if self.bad_images is None else {'bad_img': self.bad_images.count}
        self.bar.set_postfix(loss=f'{loss:.4f}', img_s=f'{rate:.1f}', **bad, refresh=False)
        with self.writer.as_default(step=self.step):
            tf.summary.scalar('loss/total', loss)
            tf.summary.scalar('images_per_second', rate)
            lr = self.optimizer.learning_rate
            tf.summary.scalar('learning_rate', float(lr.numpy() if hasattr(lr, 'numpy') else lr))
            for name, value in (scalars or {}).items():
                tf.summary.scalar(name, float(value))
            if self.bad_images is not None:
                tf.summary.scalar('data/bad_images', self.bad_images.count)
        if save_due:
            self.save()

    def save(self):
        """Write a checkpoint for the current step (if not already saved for it); losses checked."""
        if self.manager.latest_checkpoint and self.manager.latest_checkpoint.endswith(
                f'-{self.step}'):
            return
        self._check()
        began = time.perf_counter()
        self.step_var.assign(self.step)
        self.manager.save(checkpoint_number=self.step)
        if self.warm is not None:
            self.paused += time.perf_counter() - began

    def images_per_second(self):
        """Steady-state throughput: after the first (tracing) step, checkpoint saves left out."""
        if self.last is None:
            return 0.0
        return self.images / max(self.last - self.warm - self.paused_at_last, 1e-9)

    def close(self):
        """Close the bar and flush the logs."""
        if self.bar is not None:
            self.bar.close()
        self.writer.flush()


# --------------------------------------------------------------------------------------------
# Stage 1: ArcFace / NormHead classification training.
