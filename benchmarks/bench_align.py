"""Benchmark data/align_faces.py (modules.align.align_tree): photos/s on 640x480 photos, 1 and N workers.

Run: .venv/bin/python benchmarks/bench_align.py [--num_images 96 --workers 1 --workers 2]

The photos are the two portraits that installed packages ship (matplotlib's grace_hopper.jpg and
scikit-image's astronaut.png), each drawn into 640x480 frames under a different random rotation
(+-15 degrees), scale and position, saved as JPEG (quality 90) in identity folders, and aligned
into a fresh folder by each worker count. Start-up (importing TensorFlow and building MTCNN, in
every worker process) is the time to the first finished photo; the steady rate is taken between
the first and the last finished photo, and the time for 100k photos is extrapolated from both.
CPU s/photo (one in-process worker, steady part) does not depend on what else runs on the machine.
"""
import os
import sys
import tempfile
import time

import cv2
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.utils import UserError, cli_guard, quiet_tensorflow  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('num_images', 96, 'photos to align per worker count')
flags.DEFINE_multi_integer('workers', None, 'worker counts to time (default: 1 and all cores)')
flags.DEFINE_integer('seed', 0, 'random seed of the frames')
WIDTH, HEIGHT = 640, 480


def portraits():
    """The shipped portraits as RGB arrays."""
    import matplotlib
    import skimage

    from modules.align import read_photo
    return [read_photo(os.path.join(os.path.dirname(matplotlib.__file__), 'mpl-data',
                                    'sample_data', 'grace_hopper.jpg')),
            read_photo(os.path.join(os.path.dirname(skimage.__file__), 'data', 'astronaut.png'))]


def write_photos(root, count, seed):
    """`count` 640x480 JPEG frames of the portraits in root/id_<k>/ folders (8 per folder)."""
    rng = np.random.default_rng(seed)
    faces = portraits()
    for i in range(count):
        face = faces[i % len(faces)]
        h, w = face.shape[:2]
        scale = rng.uniform(0.6, 1.0) * HEIGHT / h
        matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), rng.uniform(-15, 15), scale)
        matrix[:, 2] += [WIDTH / 2.0 - w / 2.0 + rng.uniform(-120, 120),
                         HEIGHT / 2.0 - h / 2.0 + rng.uniform(-40, 40)]
        frame = cv2.warpAffine(face, matrix, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)
        folder = os.path.join(root, f'id_{i // 8:03d}')
        os.makedirs(folder, exist_ok=True)
        cv2.imwrite(os.path.join(folder, f'{i:05d}.jpg'), frame[:, :, ::-1],
                    [cv2.IMWRITE_JPEG_QUALITY, 90])


def timed_run(input_dir, output_dir, workers):
    """(start-up s, steady photos/s, wall s, CPU s/photo of this process in the steady part)."""
    from modules.align import align_tree
    stamps = []

    def record(rel, failure):
        if failure is not None:
            raise UserError(f'benchmark photo {rel} failed: {failure[1]}')
        stamps.append((time.perf_counter(), time.process_time()))

    start = time.perf_counter()
    align_tree(input_dir, output_dir, workers=workers, min_face=40, progress=False, on_done=record)
    wall = time.perf_counter() - start
    (first, cpu_first), (last, cpu_last) = stamps[0], stamps[-1]
    steady = (len(stamps) - 1) / (last - first)
    return first - start, steady, wall, (cpu_last - cpu_first) / (len(stamps) - 1)


@cli_guard
def main(_):
    """Write the photos, time every worker count, print one table."""
    if FLAGS.num_images < 8:
        raise UserError('--num_images must be at least 8')
    start = time.perf_counter()
    quiet_tensorflow()  # imports TensorFlow: part of the start-up of the in-process worker
    import_seconds = time.perf_counter() - start
    workers_list = FLAGS.workers or sorted({1, os.cpu_count() or 1})
    with tempfile.TemporaryDirectory(prefix='bench_align_') as tmp:
        photos = os.path.join(tmp, 'photos')
        write_photos(photos, FLAGS.num_images, FLAGS.seed)
        print(f'{FLAGS.num_images} photos of {WIDTH}x{HEIGHT}, {os.cpu_count()} CPU cores, '
              f'load average before: {" ".join(f"{v:.1f}" for v in os.getloadavg())}')
        print('| workers | photos | wall s | start-up s | photos/s (steady) | 100k photos '
              '| CPU s/photo |')
        print('| ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
        for workers in workers_list:
            startup, steady, wall, cpu = timed_run(photos, os.path.join(tmp, f'out_{workers}'),
                                                   workers)
            if workers == 1:
                # The in-process worker built its detector during the run; TensorFlow was imported
                # before it, by quiet_tensorflow.
                startup += import_seconds
                wall += import_seconds
            hours = (startup + 100_000 / steady) / 3600
            shown_cpu = f'{cpu:.3f}' if workers == 1 else '(in workers)'
            print(f'| {workers} | {FLAGS.num_images} | {wall:.1f} | {startup:.1f} | {steady:.2f} | '
                  f'{hours:.1f} h | {shown_cpu} |')
        print(f'load average after: {" ".join(f"{v:.1f}" for v in os.getloadavg())} (other '
              'processes on the machine slow the wall figures)')


if __name__ == '__main__':
    app.run(main)
