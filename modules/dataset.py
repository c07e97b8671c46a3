"""Training data: identity folders, TFRecord conversion, stage-1 and stage-2 (PK) tf.data pipelines.

Images on disk follow the "MS1M align_112" layout, `root/<identity>/<image>.jpg`, one folder per
identity. An identity's label is the index of its folder name in the sorted list of identity
folders that hold at least one image (so labels are always 0..num_identities-1).

Every pipeline yields `(images, labels)`: images RGB float32 in [0, 1] of shape
(batch, 112, 112, 3), labels int64. Images whose decoded size is not 112x112 (e.g. VGGFace2-style
folders) are resized to 112x112.

TensorFlow and OpenCV are imported inside the functions that need them, so that
`pk_index_batches` (pure numpy, also used on cached embeddings) stays cheap to import.
"""
import os
import re
import sys
import threading
from typing import NamedTuple

import numpy as np

from modules.folders import normalise_exts, scan_identity_folders
from modules.pk_sampling import pk_index_batches, pk_require, report_pk_sampling
from modules.utils import UserError

IMAGE_SIZE = 112
_AUG_RESIZE = 128  # augmentations resize to 128x128 and crop 112x112 back out of it
_SATURATION = (0.6, 1.4)
# The original added a brightness delta of up to 0.4 to 0..255 pixel values (before dividing by
# 255): in [0, 1] units that is 0.4 / 255. Keeping its effective strength; a delta of 0.4 on [0, 1]
# images would black out or wash out many faces.
_BRIGHTNESS_DELTA = 0.4 / 255
_DEFAULT_EXTS = ('.jpg', '.jpeg', '.png', '.bmp')
_DECODE_CHUNK = 16  # images per guarded decode call (see _guarded_each)


# ---------------------------------------------------------------------------------------------
# Identity folders
class IdentityFolders(NamedTuple):
    """Images of an identity-folder tree: `root`, identity `names`, per-image paths and labels."""

    root: str  # absolute path of the tree
    names: list  # identity folder names; label i is names[i]
    rel_paths: np.ndarray  # bytes ('S' dtype), '<identity>/[<sub>/]<file>', relative to root
    labels: np.ndarray  # int64, one per image
    empty_folders: list  # identity folders without images, left out

    @property
    def num_identities(self):
        """Number of identities (folders holding at least one image)."""
        return len(self.names)

    @property
    def num_images(self):
        """Number of images over all identities."""
        return len(self.labels)

    def path(self, i):
        """Absolute path of image `i`."""
        return os.path.join(self.root, os.fsdecode(self.rel_paths[i]))


def list_identity_folders(root, img_ext=None):
    """List `root/<identity>/**/<image>` files; label = index of the sorted identity folder name.

    `img_ext` is an extension ('jpg') or a list of them; None accepts jpg, jpeg, png and bmp (case
    insensitive). Photos in sub-folders of an identity folder belong to it; symbolic links are
    followed (`modules.folders`). Hidden entries, files directly under `root` and other
    extensions are left out and counted in one printed line. Identity folders without images are
    left out (and listed in `empty_folders`, with a warning), so labels stay contiguous. A
    missing root, or one without any image, is a UserError.
    """
    exts = _DEFAULT_EXTS if img_ext is None else img_ext
    scan = scan_identity_folders(root, exts)
    root = os.path.abspath(root)
    if not scan.identities and not scan.empty:
        raise UserError(f'{root}: no identity folders (expected <root>/<identity>/<image>.jpg)')
    if not scan.identities:
        exts = ', '.join(normalise_exts(exts))
        raise UserError(f"{root}: none of the {len(scan.empty)} identity folders holds an image "
                        f"with extension {exts} (at any depth); {scan.skip_line(named=False)}")
    names = [name for name, _ in scan.identities]
    counts = [len(files) for _, files in scan.identities]
    rel_paths = [os.fsencode(rel) for _, files in scan.identities for rel in files]
    if scan.empty:
        shown = ', '.join(scan.empty[:10]) + (' ...' if len(scan.empty) > 10 else '')
        print(f'warning: {len(scan.empty)} identity folder(s) under {root} hold no images and are '
              f'ignored: {shown}', file=sys.stderr)
    print(scan.skip_line(), file=sys.stderr)
    labels = np.repeat(np.arange(len(names), dtype=np.int64), counts)
    return IdentityFolders(root, names, np.array(rel_paths, dtype=bytes), labels, scan.empty)


# ---------------------------------------------------------------------------------------------
# TFRecord reading
def count_tfrecord(tfrecord_path):
    """Number of records in a TFRecord file."""
    import tensorflow as tf

    _require_file(tfrecord_path)
    dataset = tf.data.TFRecordDataset(tfrecord_path)
    return int(dataset.reduce(np.int64(0), lambda count, _: count + 1))


# ---------------------------------------------------------------------------------------------
# Image decoding and augmentation (shared by both stages)
def _read_decode(source, from_path):
    """Decoded [0, 1] RGB image from encoded bytes, or from the file at path `source`."""
    import tensorflow as tf

    encoded = tf.io.read_file(source) if from_path else source
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    return tf.image.convert_image_dtype(image, tf.float32)  # uint8 -> [0, 1]


def _guarded_each(fn, elements, spec=None):
    """fn over each element of `elements` (tensors sharing a leading size n): (outputs, ok [n]).

    fn returns a tensor of TensorSpec `spec` (default: a (112, 112, 3) float32 image); where it
    fails (an unreadable or undecodable image), ok is False and the output zeros. A dataset over
    the n elements with ignore_errors keeps the ones fn got through, with their positions, so
    failures are found in the graph, without Python and without ending the pipeline. One such
    dataset per chunk of images, not per image: setting it up costs about as much as decoding a
    112x112 JPEG.
    """
    import tensorflow as tf

    spec = spec or tf.TensorSpec((IMAGE_SIZE, IMAGE_SIZE, 3), tf.float32)
    count = tf.shape(tf.nest.flatten(elements)[0])[0]
    attempt = tf.data.Dataset.from_tensor_slices((tf.range(count), elements)).map(
        lambda i, args: (i, fn(*args) if isinstance(args, tuple) else fn(args))).ignore_errors()
    nothing = tf.data.Dataset.from_tensors((tf.zeros([0], tf.int32),
                                            tf.zeros([0, *spec.shape], spec.dtype)))
    done, outputs = attempt.batch(tf.cast(count, tf.int64)).concatenate(nothing) \
        .take(1).get_single_element()
    where = done[:, None]
    return (tf.scatter_nd(where, outputs, [count, *spec.shape]),
            tf.scatter_nd(where, tf.ones_like(done, tf.bool), [count]))


def _image_loader(augment, is_ccrop, from_path):
    """fn(encoded bytes or path, seed) -> (112, 112, 3) training image, for `_guarded_each`."""
    def load(source, seed=None):
        return _transform(_read_decode(source, from_path), seed, augment, is_ccrop)
    return load


def _decodable(sources, from_path):
    """ok [n] of a batch of encoded images or paths: can each be read and decoded?"""
    import tensorflow as tf

    return _guarded_each(lambda source: tf.size(_read_decode(source, from_path)), sources,
                         tf.TensorSpec((), tf.int32))[1]


class BadImageError(UserError):
    """A training image could not be used and the config says `bad_images: fail`."""


def _bad_reason(path):
    if not path:
        return 'cannot be decoded (corrupt, truncated or not an image)'
    try:
        size = os.path.getsize(path)
    except OSError:
        return 'missing or unreadable file'
    return 'empty file' if size == 0 else 'cannot be decoded (corrupt, truncated or not an image)'


class BadImages:
    """Training images left out because they cannot be read or decoded (config `bad_images`).

    Each image counts once however often it is drawn; the first `SHOWN` are named on stderr.
    mode 'fail': `check()` raises a BadImageError naming the first one.
    """

    SHOWN = 5

    def __init__(self, mode='skip'):
        if mode not in ('skip', 'fail'):
            raise UserError(f"bad_images must be 'skip' or 'fail', got {mode!r}")
        self.mode = mode
        self._lock = threading.Lock()
        self._reasons = {}  # name -> reason, in the order met

    @property
    def count(self):
        """Number of distinct bad images met so far."""
        return len(self._reasons)

    @property
    def examples(self):
        """'name: reason' of the first SHOWN bad images."""
        with self._lock:
            return [f'{n}: {r}' for n, r in list(self._reasons.items())[:self.SHOWN]]

    def record(self, name, path=b''):
        """Note one bad image (`name` says where it is; `path`, if a file, gives the reason)."""
        name, path = os.fsdecode(name), os.fsdecode(path)
        with self._lock:
            if name in self._reasons:
                return
            self._reasons[name] = _bad_reason(path)
            number = len(self._reasons)
        if self.mode == 'skip' and number <= self.SHOWN:
            from tqdm import tqdm
            tqdm.write(f'warning: bad image left out: {name}: {self._reasons[name]}'
                       + (' (further ones are only counted)' if number == self.SHOWN else ''),
                       file=sys.stderr)

    def check(self):
        """In mode 'fail', raise a BadImageError naming the first bad image met."""
        if self.mode == 'fail' and self._reasons:
            name, reason = next(iter(self._reasons.items()))
            raise BadImageError(f'bad training image {name}: {reason} (bad_images: fail; '
                                'set bad_images: skip to leave such images out)')

    def summary(self):
        """Count and first offenders, for the run summary."""
        return {'bad_images': self.count, 'bad_image_examples': self.examples}


def _reported(bad_images, ok, names, paths):
    """True once the images where `ok` is False are recorded in `bad_images` (Python only then)."""
    import tensorflow as tf

    def report(ok, names, paths):
        ok = ok.numpy()
        for name, path in zip(names.numpy()[~ok], paths.numpy()[~ok]):
            bad_images.record(name, path)
        return True

    return tf.cond(tf.reduce_all(ok), lambda: tf.constant(True), lambda: tf.ensure_shape(
        tf.py_function(report, [ok, names, paths], tf.bool), []))


def _drop_bad(dataset, bad_images):
    """Chunks of (images, labels, ok, names, paths) to (image, label) elements of the good ones;
    the bad ones are recorded in `bad_images`."""
    import tensorflow as tf

    def keep(images, labels, ok, names, paths):
        ok = tf.logical_and(ok, _reported(bad_images, ok, names, paths))
        return tf.boolean_mask(images, ok), tf.boolean_mask(labels, ok)

    return dataset.map(keep).unbatch()


def _transform(image, seed, augment, is_ccrop):
    """Bring a decoded [0,1] image to (112, 112, 3), with optional augmentation and central crop.

    augment: resize to 128x128, random 112x112 crop, random horizontal flip, random saturation
    (0.6, 1.4), random brightness (+-0.4 on the 0..255 scale), clip to [0, 1]. is_ccrop: resize
    to 128x128 and take the central 112x112 instead of a random crop (the framing of test-time
    central cropping); the other augmentations still apply when `augment` is set. Neither: the
    image as is, resized to 112x112 if its size differs. Random ops are stateless, driven by the
    per-image `seed`.
    """
    import tensorflow as tf

    if augment or is_ccrop:
        image = tf.image.resize(image, (_AUG_RESIZE, _AUG_RESIZE))
        if is_ccrop:
            margin = (_AUG_RESIZE - IMAGE_SIZE) // 2
            image = image[margin:margin + IMAGE_SIZE, margin:margin + IMAGE_SIZE]
    else:
        shape = tf.shape(image)
        image = tf.cond(tf.logical_and(shape[0] == IMAGE_SIZE, shape[1] == IMAGE_SIZE),
                        lambda: image, lambda: tf.image.resize(image, (IMAGE_SIZE, IMAGE_SIZE)))
    if augment:
        seeds = tf.random.experimental.stateless_split(seed, num=4)
        if not is_ccrop:
            image = tf.image.stateless_random_crop(image, (IMAGE_SIZE, IMAGE_SIZE, 3), seeds[0])
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
        image = tf.image.stateless_random_saturation(image, *_SATURATION, seed=seeds[2])
        image = tf.image.stateless_random_brightness(image, _BRIGHTNESS_DELTA, seed=seeds[3])
    image = tf.clip_by_value(image, 0.0, 1.0)
    return tf.ensure_shape(image, (IMAGE_SIZE, IMAGE_SIZE, 3))


def image_file_dataset(paths, batch_size, is_ccrop=False, with_validity=False):
    """Batches of the images at `paths`, in order, decoded to (112, 112, 3) [0, 1] without augmentation.

    with_validity: batches of (images, ok); an image that cannot be read or decoded is all zeros
    with ok False, instead of an error that ends the iteration.
    """
    import tensorflow as tf

    load = _image_loader(False, is_ccrop, from_path=True)
    dataset = tf.data.Dataset.from_tensor_slices(list(paths))
    if with_validity:
        dataset = dataset.batch(_DECODE_CHUNK).map(
            lambda chunk: _guarded_each(load, chunk),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
    else:
        dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _with_seeds(batches, seed, size):
    """Pair every batch of (up to) `size` elements with [size, 2] int64 seeds, one per image for
    the stateless augmentations (the seed stream is the same whatever the batch size)."""
    import tensorflow as tf

    seeds = tf.data.Dataset.random(seed=seed).batch(2 * size, drop_remainder=True)
    return tf.data.Dataset.zip((batches, seeds.map(lambda s: tf.reshape(s, (size, 2)))))


def _require_file(path):
    if not path or not os.path.isfile(path):
        raise UserError(f'TFRecord file not found: {path} (create it with '
                        'data/convert_train_binary_tfrecord.py or data/convert_train_tfrecord.py)')


def _check_tfrecord_flavour(tfrecord_path, binary_img):
    """Read the first record so a wrong file or a binary_img mismatch fails now, and clearly."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError

    try:
        first = next(iter(tf.data.TFRecordDataset(tfrecord_path).take(1)), None)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError):
        raise UserError(f'{tfrecord_path}: not a TFRecord file (or it is corrupt)') from None
    if first is None:
        raise UserError(f'{tfrecord_path}: the TFRecord file holds no records')
    try:
        keys = set(tf.train.Example.FromString(first.numpy()).features.feature)
    except DecodeError:
        raise UserError(f'{tfrecord_path}: records are not tf.train.Example protos') from None
    want = 'image/encoded' if binary_img else 'image/img_path'
    if 'image/source_id' not in keys or want not in keys:
        other = 'image/img_path' if binary_img else 'image/encoded'
        hint = (f' (it holds {other}: set binary_img: {not binary_img} in the config)'
                if other in keys else '')
        raise UserError(f'{tfrecord_path}: records lack {want} needed for binary_img: '
                        f'{bool(binary_img)}{hint}')


_CONVERT_HINT = ('re-run data/convert_train_binary_tfrecord.py (or data/convert_train_tfrecord.py '
                 'for binary_img: False) to write it again')
# Files up to this size are scanned (CRC of every record) before a model is built: 4.6 s for
# 260 MB on two busy CPU cores. Bigger ones are checked as training reads them
# (dataset_checker.py --full scans them on request).
SCAN_LIMIT_BYTES = 1 << 30


class TFRecordDamaged(UserError):
    """A TFRecord cut short or damaged; `reason` says how, without naming the file or record."""

    def __init__(self, tfrecord_path, what, record_index=None):
        damage = f'the file is cut short or damaged; {_CONVERT_HINT}'
        self.reason = f'{what}: {damage}'
        where = f' (record {record_index})' if record_index is not None else ''
        super().__init__(f'{tfrecord_path}: {what}{where}: {damage}')


def tfrecord_read_error(tfrecord_path, err, record_index=None):
    """A TFRecordDamaged for a TFRecord read failure (truncated / corrupt): file, offset, record."""
    message = err.message if hasattr(err, 'message') else str(err)
    found = re.search(r'(truncated|corrupted) record at (\d+)', message)
    if found:
        what = f'{found.group(1)} record at byte offset {found.group(2)}'
    else:
        what = f"unreadable ({message.strip().splitlines()[0] if message.strip() else 'data loss'})"
    return TFRecordDamaged(tfrecord_path, what, record_index)


def _read_records(tfrecord_path):
    """(number of records readable, UserError for the first bad one or None), checking CRCs."""
    import tensorflow as tf

    _require_file(tfrecord_path)
    records = tf.data.TFRecordDataset(tfrecord_path, buffer_size=1 << 22)
    count = 0
    try:
        for lengths in records.map(tf.strings.length).batch(4096):
            count += int(lengths.shape[0])
    except tf.errors.DataLossError as err:
        index = count  # the failing batch is lost: find the record within it
        try:
            for _ in records.skip(count):
                index += 1
        except tf.errors.DataLossError:
            pass
        return index, tfrecord_read_error(tfrecord_path, err, index)
    return count, None


def scan_tfrecord(tfrecord_path):
    """Read every record of a TFRecord (checking its CRCs); return the count, or raise a UserError
    naming the byte offset and index of the first bad record."""
    count, error = _read_records(tfrecord_path)
    if error is not None:
        raise error
    return count


def load_tfrecord_dataset(tfrecord_path, batch_size, binary_img=True, is_ccrop=False, shuffle=True,
                          buffer_size=10240, augment=True, repeat=True, seed=None,
                          bad_images=None):
    """Stage-1 tf.data pipeline over a converted TFRecord: batches of (images, int64 labels).

    Images are RGB float32 in [0, 1], (batch_size, 112, 112, 3); see `_transform` for `augment`
    and `is_ccrop` (central crop: resize to 128 and keep the central 112x112). Records are
    shuffled (buffer of `buffer_size` serialized records) before decoding, decoded in parallel,
    batched with drop_remainder=True and prefetched. `seed` makes order and augmentation
    reproducible. binary_img=False reads each image from its stored path.

    Images that cannot be read or decoded are left out and recorded in `bad_images` (a BadImages;
    by default a new one in 'skip' mode), named by file + record index (+ image/filename or
    image/img_path). A truncated or corrupt file raises a tf.errors.DataLossError when met: turn
    it into a clear error with `tfrecord_read_error`.
    """
    import tensorflow as tf

    _require_file(tfrecord_path)
    if batch_size < 1:
        raise UserError(f'batch_size must be positive, got {batch_size}')
    _check_tfrecord_flavour(tfrecord_path, binary_img)
    bad_images = BadImages() if bad_images is None else bad_images
    if binary_img:
        features = {'image/source_id': tf.io.FixedLenFeature([], tf.int64),
                    'image/encoded': tf.io.FixedLenFeature([], tf.string),
                    'image/filename': tf.io.FixedLenFeature([], tf.string, default_value='')}
    else:
        features = {'image/source_id': tf.io.FixedLenFeature([], tf.int64),
                    'image/img_path': tf.io.FixedLenFeature([], tf.string)}

    load = _image_loader(augment, is_ccrop, from_path=not binary_img)

    def parse(records, seeds):
        index, record = records
        seeds = seeds[:tf.shape(record)[0]]  # the last chunk of a single pass may be short
        parsed = tf.io.parse_example(record, features)
        where = tf.strings.join([tfrecord_path, ' record ', tf.strings.as_string(index)])
        if binary_img:
            images, ok = _guarded_each(load, (parsed['image/encoded'], seeds))
            names = tf.strings.join([where, ' (', parsed['image/filename'], ')'])
            paths = tf.zeros_like(names)
        else:
            paths = parsed['image/img_path']
            images, ok = _guarded_each(load, (paths, seeds))
            names = tf.strings.join([paths, ' (', where, ')'])
        return images, parsed['image/source_id'], ok, names, paths

    dataset = tf.data.TFRecordDataset(tfrecord_path).enumerate()
    if shuffle:
        dataset = dataset.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    # Records are parsed and decoded a chunk at a time (see _guarded_each), in parallel.
    dataset = _with_seeds(dataset.batch(_DECODE_CHUNK), seed, _DECODE_CHUNK)
    dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=(seed is not None) or not shuffle)
    dataset = _drop_bad(dataset, bad_images).batch(batch_size, drop_remainder=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------------------
# Stage 2: PK batches of images (the index batches: modules.pk_sampling)
def load_pk_dataset(root, classes_per_batch, samples_per_class, img_ext='jpg', is_ccrop=False,
                    augment=True, seed=0, start_epoch=0, bad_images=None):
    """Stage-2 PK pipeline over identity folders (`root`: a path, or an already listed
    IdentityFolders, which saves listing a large tree twice).

    Returns (dataset, num_identities, num_images, steps_per_epoch). The dataset is infinite:
    batches of (images (P*K, 112, 112, 3) float32 [0, 1], int64 labels (P*K,)) built by
    `pk_index_batches` epoch after epoch (epoch numbers from `start_epoch`, so a resumed run can
    continue the sequence); take `steps_per_epoch` batches per epoch. num_identities counts all
    identity folders holding images; steps_per_epoch counts only identities with 2+ images.

    An image that cannot be read or decoded is recorded in `bad_images` (a BadImages; by default
    a new one in 'skip' mode) and its slot takes another image of the same identity from the
    batch, so batches keep their P x K shape; a batch where an identity has no usable image left
    is dropped.
    """
    import tensorflow as tf

    folders = root if isinstance(root, IdentityFolders) else list_identity_folders(root, img_ext)
    p, k = int(classes_per_batch), int(samples_per_class)
    summary = report_pk_sampling(folders, p, k)
    pk_require(summary['eligible'], p, k, seed, start_epoch)
    steps = summary['eligible'] // p
    rel_paths, labels = folders.rel_paths, folders.labels

    def batches():
        epoch = start_epoch
        while True:
            for idx in pk_index_batches(labels, p, k, seed, epoch):
                yield rel_paths[idx], labels[idx]
            epoch += 1

    prefix = os.fsencode(folders.root) + os.fsencode(os.sep)
    bad_images = BadImages() if bad_images is None else bad_images

    load = _image_loader(augment, is_ccrop, from_path=True)

    def load_batch(pair, seeds):
        rel_paths, labels = pair
        paths = tf.strings.join([prefix, rel_paths])
        images, ok = _guarded_each(load, (paths, seeds))
        ok_rows = tf.reshape(tf.logical_and(ok, _reported(bad_images, ok, paths, paths)), (p, k))
        # Identity-major layout: a bad slot takes the first good image of its own row.
        first_good = tf.argmax(tf.cast(ok_rows, tf.int32), axis=1, output_type=tf.int32)
        own = tf.reshape(tf.range(p * k), (p, k))
        source = tf.where(ok_rows, own, (tf.range(p) * k + first_good)[:, None])
        usable = tf.reduce_all(tf.reduce_any(ok_rows, axis=1))
        return tf.gather(images, tf.reshape(source, [-1])), labels, usable

    spec = (tf.TensorSpec((p * k,), tf.string), tf.TensorSpec((p * k,), tf.int64))
    dataset = _with_seeds(tf.data.Dataset.from_generator(batches, output_signature=spec),
                          seed, p * k)
    dataset = dataset.map(load_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.filter(lambda images, labels, usable: usable)
    dataset = dataset.map(lambda images, labels, usable: (images, labels))
    return dataset.prefetch(tf.data.AUTOTUNE), folders.num_identities, folders.num_images, steps
