"""Align the public-domain sample photographs used by run_me.py to 112x112 ArcFace crops.

Sources are files that installed packages ship (nothing is downloaded):
  person A: matplotlib's mpl-data/sample_data/grace_hopper.jpg (US Navy photo of Grace Hopper),
  person B: scikit-image's skimage/data/astronaut.png (NASA photo of Eileen Collins).
No second photograph of either person ships in a package, so personA_2.jpg is derived from the
same Grace Hopper photograph (other crop, scale, rotation and lighting), then detected and aligned
again from scratch. See data/README.md.

Face and eyes are found with OpenCV's Haar cascades (cv2.data.haarcascades). OpenCV 5 dropped
CascadeClassifier, so run this in a separate environment with opencv-python-headless<5, e.g.
  python3 -m venv /tmp/skimg && /tmp/skimg/bin/pip install "opencv-python-headless<5" \
      scikit-image absl-py pyyaml
  /tmp/skimg/bin/python data/align_sample_faces.py \
      --person_a .venv/lib/python3.11/site-packages/matplotlib/mpl-data/sample_data/grace_hopper.jpg
"""
import importlib.util
import os
import sys

import cv2
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modules.utils import UserError, atomic_output, cli_guard  # noqa: E402

# Eye centres of the standard ArcFace 112x112 template (image left eye first).
TEMPLATE_LEFT_EYE = (38.2946, 51.6963)
TEMPLATE_RIGHT_EYE = (73.5318, 51.5014)
OUT_SIZE = 112


def _package_file(package, *parts):
    """Path of a data file inside an installed package, found without importing it (or '')."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return ''
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


FLAGS = flags.FLAGS


def define_flags():
    """Declare the CLI flags (only when run as a script, so importing this file has no effects)."""
    flags.DEFINE_string('person_a', None,
                        'photo of person A (default: matplotlib sample_data/grace_hopper.jpg)')
    flags.DEFINE_string('person_b', None,
                        'photo of person B (default: scikit-image data/astronaut.png)')
    flags.DEFINE_string('output_dir', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   'samples'), 'where the aligned JPEGs go')
    flags.DEFINE_integer('jpeg_quality', 95, 'JPEG quality of the aligned crops')


def _cascade(name):
    """Load one of OpenCV's shipped Haar cascades, or explain why it cannot be had."""
    if not hasattr(cv2, 'CascadeClassifier'):
        raise UserError(f'OpenCV {cv2.__version__} has no CascadeClassifier (removed in OpenCV 5); '
                        'run this script in a venv with opencv-python-headless<5 '
                        '(see the module docstring)')
    path = os.path.join(cv2.data.haarcascades, name)
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise UserError(f'cannot load the Haar cascade {path}')
    return cascade


def read_image(path):
    """Read a colour image (BGR uint8) or raise UserError naming the file."""
    if not path or not os.path.isfile(path):
        raise UserError(f'image not found: {path!r} (pass it with --person_a / --person_b)')
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f'cannot decode image: {path}')
    return img


def detect_eyes(img, label='image'):
    """Eye centres (image-left first) of the largest face, as a (2, 2) float array."""
    gray = cv2.equalizeHist(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    side = min(gray.shape)
    faces = _cascade('haarcascade_frontalface_default.xml').detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(side // 10, side // 10))
    if len(faces) == 0:
        raise UserError(f'{label}: no face found by the Haar cascade')
    x, y, w, h = (int(v) for v in max(faces, key=lambda f: f[2] * f[3]))
    # Eyes sit in the upper part of the face box; searching each half of that band separately (at
    # a fixed scale) avoids nostril/brow hits and copes with glasses better than one global search.
    top, bottom = y + int(0.15 * h), y + int(0.62 * h)
    ratio = 240.0 / w
    band = cv2.resize(gray[top:bottom, x:x + w], (240, int(round((bottom - top) * ratio))),
                      interpolation=cv2.INTER_AREA if ratio < 1 else cv2.INTER_CUBIC)
    expected_y = (y + 0.38 * h - top) * ratio
    picks = []
    for side, (lo, hi) in (('left', (0, 120)), ('right', (120, 240))):
        expected = np.array([(lo + hi) / 2.0, expected_y])
        found = None
        for cascade_name in ('haarcascade_eye.xml', 'haarcascade_eye_tree_eyeglasses.xml'):
            for neighbours in (5, 3, 1):
                hits = _cascade(cascade_name).detectMultiScale(
                    band[:, lo:hi], scaleFactor=1.05, minNeighbors=neighbours,
                    minSize=(24, 24), maxSize=(110, 110))
                if len(hits):
                    centres = np.array([[lo + ex + ew / 2.0, ey + eh / 2.0]
                                        for ex, ey, ew, eh in hits])
                    found = centres[np.argmin(np.linalg.norm(centres - expected, axis=1))]
                    break
            if found is not None:
                break
        if found is None:
            raise UserError(f'{label}: face found at {(x, y, w, h)} but no {side} eye detected')
        picks.append([x + found[0] / ratio, top + found[1] / ratio])
    return np.array(picks, dtype=np.float64)


def similarity_from_eyes(eyes, dst=(TEMPLATE_LEFT_EYE, TEMPLATE_RIGHT_EYE)):
    """2x3 similarity matrix (rotation, uniform scale, shift) mapping two eye points onto dst."""
    src = eyes[:, 0] + 1j * eyes[:, 1]
    dst = np.array([complex(*p) for p in dst])
    # Two point pairs fix a similarity exactly: z -> a z + b with complex a.
    a = (dst[1] - dst[0]) / (src[1] - src[0])
    b = dst[0] - a * src[0]
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def align_face(img, label='image'):
    """Detect face and eyes in a BGR image and warp it to a 112x112 ArcFace-aligned crop."""
    matrix = similarity_from_eyes(detect_eyes(img, label))
    return cv2.warpAffine(img, matrix, (OUT_SIZE, OUT_SIZE), flags=cv2.INTER_AREA,
                          borderMode=cv2.BORDER_REPLICATE)


def derive_second_shot(img):
    """A second 'shot' of the same photo: off-centre crop, lower resolution, tilt, side light."""
    h, w = img.shape[:2]
    crop = img[int(0.04 * h):int(0.82 * h), int(0.10 * w):w]
    ch, cw = crop.shape[:2]
    small = cv2.resize(crop, (int(cw * 0.75), int(ch * 0.75)), interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    rot = cv2.getRotationMatrix2D((sw / 2.0, sh / 2.0), 4.0, 1.0)
    tilted = cv2.warpAffine(small, rot, (sw, sh), borderMode=cv2.BORDER_REFLECT)
    # Light from the right and a darker, warmer overall tone, as from a different exposure.
    ramp = np.linspace(0.72, 1.12, sw, dtype=np.float32)[None, :, None]
    tone = np.array([0.92, 0.98, 1.04], dtype=np.float32)  # BGR
    lit = 255.0 * ((tilted.astype(np.float32) / 255.0) ** 1.15) * ramp * tone
    return np.clip(lit, 0, 255).astype(np.uint8)


def write_jpeg(path, img, quality):
    """Encode a BGR image as JPEG and write it atomically."""
    ok, buf = cv2.imencode('.jpg', img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise UserError(f'cannot encode {path}')
    with atomic_output(path) as fh:
        fh.write(buf.tobytes())


@cli_guard
def main(argv):
    """Align the two people's photos and write personA_1/2.jpg and personB_1.jpg."""
    del argv
    path_a = FLAGS.person_a or _package_file('matplotlib', 'mpl-data', 'sample_data',
                                             'grace_hopper.jpg')
    path_b = FLAGS.person_b or _package_file('skimage', 'data', 'astronaut.png')
    if not path_a:
        raise UserError('matplotlib is not installed here: '
                        'pass --person_a /path/to/grace_hopper.jpg')
    if not path_b:
        raise UserError('scikit-image is not installed here: '
                        'pass --person_b /path/to/astronaut.png')
    img_a, img_b = read_image(path_a), read_image(path_b)
    crops = {
        'personA_1.jpg': align_face(img_a, path_a),
        'personA_2.jpg': align_face(derive_second_shot(img_a), path_a + ' (derived shot)'),
        'personB_1.jpg': align_face(img_b, path_b),
    }
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    for name, crop in crops.items():
        write_jpeg(os.path.join(FLAGS.output_dir, name), crop, FLAGS.jpeg_quality)
    print(f'wrote {len(crops)} aligned 112x112 faces to {FLAGS.output_dir}: ' + ', '.join(crops))


if __name__ == '__main__':
    define_flags()
    app.run(main)
