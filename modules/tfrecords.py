"""Identity folders to TFRecords: every image vetted first (readable, a format both OpenCV and
tf.io.decode_image know), written in a seeded shuffled order on a thread pool."""
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from modules.dataset import list_identity_folders
from modules.utils import UserError, atomic_path

# Formats both OpenCV (used to vet images) and tf.io.decode_image (used in training) understand.
_MAGIC = (b'\xff\xd8', b'\x89PNG', b'BM')
_CHUNK = 512


def check_image_file(path):
    """Read an image file; return (bytes, None) if it decodes, else (None, reason)."""
    import cv2

    try:
        with open(path, 'rb') as fh:
            data = fh.read()
    except OSError as err:
        return None, f'unreadable ({err.strerror})'
    if not data.startswith(_MAGIC):
        return None, 'not a JPEG, PNG or BMP image'
    # A reduced-size decode walks the whole compressed stream (truncation is caught) at a
    # fraction of the cost of a full decode.
    if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_4) is None:
        return None, 'cannot be decoded (corrupt or truncated)'
    return data, None


def _example(label, binary, data=None, rel_path=b'', abs_path=b''):
    import tensorflow as tf

    def as_bytes(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    feature = {'image/source_id': tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}
    if binary:
        feature['image/filename'] = as_bytes(rel_path)
        feature['image/encoded'] = as_bytes(data)
    else:
        feature['image/img_path'] = as_bytes(abs_path)
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString()


def write_tfrecord(root, output_path, binary, seed=0, img_ext=None, num_threads=8):
    """Convert identity folders to a stage-1 TFRecord; return counts of identities/images/skipped.

    binary=True: records hold `image/source_id` (label), `image/filename` ('<identity>/<file>') and
    `image/encoded` (the file's bytes as stored). binary=False: `image/source_id` and
    `image/img_path` (absolute path, read at training time). Records are written in a seeded random
    order so that a shuffle buffer mixes identities. Images that cannot be read or decoded are
    reported and skipped. The file appears only when the conversion completes.
    """
    import tensorflow as tf
    from tqdm import tqdm

    folders = list_identity_folders(root, img_ext)
    print(f'{folders.num_identities} identities, {folders.num_images} images under {folders.root}')
    order = np.random.default_rng(seed).permutation(folders.num_images)
    skipped = []
    written = 0
    with atomic_path(output_path) as tmp:
        with tf.io.TFRecordWriter(tmp) as writer, \
                ThreadPoolExecutor(max(1, num_threads)) as pool, \
                tqdm(total=folders.num_images, unit='img', desc='convert') as bar:
            for start in range(0, len(order), _CHUNK):
                idx = order[start:start + _CHUNK]
                paths = [folders.path(i) for i in idx]
                # OpenCV releases the GIL while decoding, so threads check images in parallel.
                for i, path, (data, reason) in zip(idx, paths, pool.map(check_image_file, paths)):
                    if data is None:
                        skipped.append(path)
                        tqdm.write(f'skipped {path}: {reason}', file=sys.stderr)
                        continue
                    if binary:
                        record = _example(int(folders.labels[i]), True, data=data,
                                          rel_path=bytes(folders.rel_paths[i]))
                    else:
                        record = _example(int(folders.labels[i]), False,
                                          abs_path=os.fsencode(path))
                    writer.write(record)
                    written += 1
                bar.update(len(idx))
        if written == 0:
            raise UserError(f'{folders.root}: none of the {folders.num_images} images could be '
                            'decoded; nothing written')
    print(f'skipped {len(skipped)} unreadable image(s)')
    print(f'wrote {written} records ({"binary" if binary else "image paths"}) to {output_path}')
    print(f'config: num_classes: {folders.num_identities}, num_samples: {written}, '
          f'binary_img: {bool(binary)}')
    return {'identities': folders.num_identities, 'images': written, 'skipped': len(skipped),
            'skipped_paths': skipped}
