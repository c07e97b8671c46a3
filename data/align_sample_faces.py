"""Re-make the public-domain sample faces of run_me.py (data/samples/) with the project's aligner.

Sources are photographs that installed packages ship (nothing is downloaded):
  person A: matplotlib's mpl-data/sample_data/grace_hopper.jpg (US Navy photo of Grace Hopper),
  person B: scikit-image's skimage/data/astronaut.png (NASA photo of Eileen Collins).
No second photograph of either person ships in a package, so personA_2.jpg is derived from the
same Grace Hopper photograph (other crop, scale, rotation and lighting), then detected and aligned
again from scratch. Faces are found with MTCNN and aligned to the ArcFace five-point template by
modules.align, as everywhere else in the project. See data/README.md.

  .venv/bin/python data/align_sample_faces.py
"""
import importlib.util
import os
import sys

import cv2
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modules.utils import UserError, atomic_output, cli_guard, quiet_tensorflow  # noqa: E402

FLAGS = flags.FLAGS


def package_file(package, *parts):
    """Path of a data file inside an installed package, found without importing it (or '')."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return ''
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


def define_flags():
    """Declare the CLI flags (only when run as a script, so importing this file has no effects)."""
    flags.DEFINE_string('person_a', None,
                        'photo of person A (default: matplotlib sample_data/grace_hopper.jpg)')
    flags.DEFINE_string('person_b', None,
                        'photo of person B (default: scikit-image data/astronaut.png)')
    flags.DEFINE_string('output_dir', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   'samples'), 'where the aligned JPEGs go')
    flags.DEFINE_integer('jpeg_quality', 95, 'JPEG quality of the aligned crops')


def derive_second_shot(rgb):
    """A second 'shot' of the same RGB photo: off-centre crop, lower resolution, tilt, side light."""
    h, w = rgb.shape[:2]
    crop = rgb[int(0.04 * h):int(0.82 * h), int(0.10 * w):w]
    ch, cw = crop.shape[:2]
    small = cv2.resize(crop, (int(cw * 0.75), int(ch * 0.75)), interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    rot = cv2.getRotationMatrix2D((sw / 2.0, sh / 2.0), 4.0, 1.0)
    tilted = cv2.warpAffine(small, rot, (sw, sh), borderMode=cv2.BORDER_REFLECT)
    # Light from the right and a darker, warmer overall tone, as from a different exposure.
    ramp = np.linspace(0.72, 1.12, sw, dtype=np.float32)[None, :, None]
    tone = np.array([1.04, 0.98, 0.92], dtype=np.float32)  # RGB
    lit = 255.0 * ((tilted.astype(np.float32) / 255.0) ** 1.15) * ramp * tone
    return np.clip(lit, 0, 255).astype(np.uint8)


def write_jpeg(path, rgb, quality):
    """Encode an RGB image as JPEG and write it atomically."""
    ok, buf = cv2.imencode('.jpg', rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise UserError(f'cannot encode {path}')
    with atomic_output(path) as fh:
        fh.write(buf.tobytes())


@cli_guard
def main(argv):
    """Align the two people's photos and write personA_1/2.jpg and personB_1.jpg."""
    del argv
    path_a = FLAGS.person_a or package_file('matplotlib', 'mpl-data', 'sample_data',
                                            'grace_hopper.jpg')
    path_b = FLAGS.person_b or package_file('skimage', 'data', 'astronaut.png')
    if not path_a:
        raise UserError('matplotlib is not installed here: pass --person_a /path/to/grace_hopper.jpg')
    if not path_b:
        raise UserError('scikit-image is not installed here: pass --person_b /path/to/astronaut.png')
    quiet_tensorflow()
    from modules.align import align_image, read_photo
    photo_a, photo_b = read_photo(path_a), read_photo(path_b)
    crops = {
        'personA_1.jpg': align_image(photo_a, source=path_a),
        'personA_2.jpg': align_image(derive_second_shot(photo_a), source=path_a + ' (derived shot)'),
        'personB_1.jpg': align_image(photo_b, source=path_b),
    }
    for name, crop in crops.items():
        write_jpeg(os.path.join(FLAGS.output_dir, name), crop, FLAGS.jpeg_quality)
    print(f'wrote {len(crops)} aligned 112x112 faces to {FLAGS.output_dir}: ' + ', '.join(crops))


if __name__ == '__main__':
    define_flags()
    app.run(main)
