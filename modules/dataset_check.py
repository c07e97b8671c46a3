"""Dataset checker: a few decoded batches as an image grid, or every image decoded and reported.

Used by `dataset_checker.py`; it reads data exactly as training does (the pipelines and the
decode/validity helpers of `modules.dataset`).
"""
import os

import numpy as np

from modules.config import setting
from modules.dataset import (
    SCAN_LIMIT_BYTES,
    BadImages,
    _bad_reason,
    _check_tfrecord_flavour,
    _decodable,
    _read_records,
    _require_file,
    list_identity_folders,
    load_pk_dataset,
    load_tfrecord_dataset,
    tfrecord_read_error,
)
from modules.utils import UserError, atomic_output


def save_image_grid(images, labels, output_path, columns=8):
    """Write a PNG grid of [0,1] RGB images titled with their labels (matplotlib Agg, atomic)."""
    from matplotlib.figure import Figure

    images = np.asarray(images)
    count = len(images)
    if count == 0:
        raise UserError('no images to draw')
    columns = min(columns, count)
    rows = -(-count // columns)
    fig = Figure(figsize=(1.6 * columns, 1.8 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis('off')
    for ax, image, label in zip(axes.ravel(), images, labels):
        ax.imshow(np.clip(image, 0.0, 1.0))
        ax.set_title(str(label), fontsize=8)
    fig.tight_layout()
    with atomic_output(output_path) as fh:
        fig.savefig(fh, format='png', dpi=80)


def check_dataset(cfg, num_batches=2, output_path='logs/dataset_check.png', augment=True,
                  max_images=32):
    """Decode a few training batches of `cfg`, print shapes/dtypes/ranges, save an image grid.

    `cfg['train_dataset']` is a TFRecord (stage 1, `binary_img` from the config) or an
    identity-folder root (stage 2, PK batches with classes_per_batch x samples_per_class).
    Returns a dict of the measured statistics.
    """
    import tensorflow as tf

    if num_batches < 1:
        raise UserError(f'--num_batches must be positive, got {num_batches}')
    source = cfg['train_dataset']
    is_ccrop = setting(cfg, 'is_ccrop')
    if os.path.isdir(source):
        dataset = load_pk_dataset(source, setting(cfg, 'classes_per_batch'),
                                  setting(cfg, 'samples_per_class'), img_ext=setting(cfg, 'img_ext'),
                                  is_ccrop=is_ccrop, augment=augment)[0]
        kind = 'identity folders (PK batches)'
    else:
        dataset = load_tfrecord_dataset(source, cfg['batch_size'],
                                        binary_img=setting(cfg, 'binary_img'), is_ccrop=is_ccrop,
                                        buffer_size=setting(cfg, 'shuffle_buffer'),
                                        augment=augment, seed=0)
        kind = f"TFRecord ({'binary' if setting(cfg, 'binary_img') else 'image paths'})"
    print(f'checking {source}: {kind}')
    shown_images, shown_labels = [], []
    lows, highs, label_lows, label_highs = [], [], [], []
    seen = 0
    try:
        for step, (images, labels) in enumerate(dataset.take(num_batches)):
            images, labels = images.numpy(), labels.numpy()
            print(f'batch {step}: images {images.shape} {images.dtype} '
                  f'range [{images.min():.3f}, {images.max():.3f}]; labels {labels.shape} '
                  f'{labels.dtype} range [{labels.min()}, {labels.max()}]')
            lows.append(images.min())
            highs.append(images.max())
            label_lows.append(labels.min())
            label_highs.append(labels.max())
            room = max_images - sum(len(x) for x in shown_images)
            shown_images.append(images[:room])
            shown_labels.append(labels[:room])
            seen += 1
    except tf.errors.OpError as err:
        raise UserError(f'{source}: reading the data failed: {err.message.splitlines()[0]}') \
            from None
    if seen == 0:
        raise UserError(f'{source}: no complete batch of {cfg["batch_size"]} images')
    save_image_grid(np.concatenate(shown_images), np.concatenate(shown_labels), output_path)
    stats = {'batches': seen, 'image_shape': tuple(images.shape), 'image_dtype': str(images.dtype),
             'min': float(min(lows)), 'max': float(max(highs)),
             'label_min': int(min(label_lows)), 'label_max': int(max(label_highs))}
    print(f"value range [{stats['min']:.3f}, {stats['max']:.3f}], label range "
          f"[{stats['label_min']}, {stats['label_max']}] over {seen} batch(es)")
    print(f'wrote {output_path}')
    return stats


def _scan_flags(dataset, total, desc):
    """Iterate batches of (ok, name, path) with a progress bar; return (count, [(name, reason)])."""
    from tqdm import tqdm

    bad, count = [], 0
    with tqdm(total=total, unit='img', desc=desc, dynamic_ncols=True) as bar:
        for ok, names, paths in dataset:
            ok = ok.numpy()
            for name, path in zip(names.numpy()[~ok], paths.numpy()[~ok]):
                bad.append((os.fsdecode(name), _bad_reason(os.fsdecode(path))))
            bar.update(len(ok))
            count += len(ok)
    return count, bad


def full_check(cfg, report_path='logs/dataset_full_check.txt', batch_size=256):
    """Decode every training image of `cfg` (TFRecord or identity folders) in parallel, as training
    would; write a report of every bad record or file and why; return (checked, bad list)."""
    import tensorflow as tf

    source = cfg['train_dataset']
    if os.path.isdir(source):
        folders = list_identity_folders(source, setting(cfg, 'img_ext'))
        paths = [folders.path(i) for i in range(folders.num_images)]

        def check_files(paths):
            return _decodable(paths, from_path=True), paths, paths

        dataset = tf.data.Dataset.from_tensor_slices(paths).batch(batch_size).map(
            check_files, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        checked, bad = _scan_flags(dataset.prefetch(2), len(paths), 'check images')
    else:
        binary_img = setting(cfg, 'binary_img')
        _require_file(source)
        _check_tfrecord_flavour(source, binary_img)
        total, damage = None, None
        if os.path.getsize(source) <= SCAN_LIMIT_BYTES:
            total, damage = _read_records(source)
        features = {'image/encoded': tf.io.FixedLenFeature([], tf.string, default_value=''),
                    'image/filename': tf.io.FixedLenFeature([], tf.string, default_value=''),
                    'image/img_path': tf.io.FixedLenFeature([], tf.string, default_value='')}

        def check_records(index, records):
            parsed = tf.io.parse_example(records, features)
            where = tf.strings.join([source, ' record ', tf.strings.as_string(index)])
            if binary_img:
                names = tf.strings.join([where, ' (', parsed['image/filename'], ')'])
                return (_decodable(parsed['image/encoded'], from_path=False), names,
                        tf.zeros_like(names))
            paths = parsed['image/img_path']
            return (_decodable(paths, from_path=True),
                    tf.strings.join([paths, ' (', where, ')']), paths)

        dataset = tf.data.TFRecordDataset(source).enumerate()
        if damage is not None:  # check the records before the damage, then report it
            dataset = dataset.take(total)
        dataset = dataset.batch(batch_size).map(check_records, num_parallel_calls=tf.data.AUTOTUNE,
                                                deterministic=False)
        try:
            checked, bad = _scan_flags(dataset.prefetch(2), total, 'check records')
        except tf.errors.DataLossError as err:  # a file above SCAN_LIMIT_BYTES, met while reading
            raise tfrecord_read_error(source, err) from None
        if damage is not None:
            bad.append((f'{source} record {total}', damage.reason))
    with atomic_output(report_path, 'w') as fh:
        fh.write(f'# {len(bad)} bad of {checked} images in {source}\n')
        fh.writelines(f'{name}\t{reason}\n' for name, reason in sorted(bad))
    print(f'checked {checked} images in {source}: {len(bad)} bad')
    for name, reason in sorted(bad)[:BadImages.SHOWN]:
        print(f'  {name}: {reason}')
    print(f'wrote {report_path}')
    return checked, bad
