"""Face detection (MTCNN) and five-point similarity alignment to InsightFace's ArcFace 112x112 crop."""
import collections
import contextlib
import csv
import dataclasses
import os
import re
import threading

import numpy as np

from modules.utils import UserError, atomic_output

# InsightFace's ArcFace 112x112 five-point template: left eye, right eye, nose, left and right mouth
# corner (image left/right), in (x, y) pixels of the output crop.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963],
                             [73.5318, 51.5014],
                             [56.0252, 71.7366],
                             [41.5493, 92.3655],
                             [70.7299, 92.2041]], dtype=np.float32)
ARCFACE_SIZE = 112
ALIGN_MODES = ('auto', 'always', 'never')
# File name endings (lower case) that folder scanners take for photos (gallery, export parity).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
# The refinement view: a _VIEW_SIDE square with the face at _VIEW_SCALE times the 112 template.
_VIEW_SIDE = 224
_VIEW_SCALE = 1.0
# MTCNN searches faces down to this box side (its own default: mtcnn 1.0.0 finds nothing at all
# with a larger min_face_size, its pyramid then runs below the 12-pixel network input).
MIN_DETECT_SIZE = 20
# Photos whose shorter side is longer are searched on a copy scaled down to it (a 4000x3000 photo:
# 4.9 s at full size, the smallest face searched then 56 px instead of 20).
DETECT_MAX_SHORT_SIDE = 1080
# Where MTCNN's face box (centre x, centre y, width, height) lies in the 112x112 ArcFace crop: the
# median over 249 CFP frontal photos of the detected box mapped by the face's own alignment
# (interquartile range 2.9, 8.5, 3.9, 18 px). A face known only by its box (--cropped, the
# verification packer's fallback) is mapped onto it.
TEMPLATE_FACE_BOX = (56.3, 72.6, 77.8, 88.0)

_detector = None
_detector_lock = threading.Lock()


class FaceError(UserError):
    """An image that gives no usable face; `reason` is 'unreadable', 'no_face' or 'small_face'."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def read_photo(path, source=None):
    """A photo file (or binary file object) as RGB uint8 (EXIF-rotated; grey, alpha, palette,
    16-bit converted), or FaceError naming `source` (default: the path)."""
    from PIL import Image, ImageOps
    source = path if source is None else source
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            # Palette/alpha images get a white background, as viewers show them; the rest just RGB.
            if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
                img = img.convert('RGBA')
                canvas = Image.new('RGBA', img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(canvas, img)
            if img.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
                # 16-bit grey: convert('RGB') would clip, so scale to 8 bits first.
                img = Image.fromarray((np.asarray(img, dtype=np.float64) / 256.0).clip(0, 255)
                                      .astype(np.uint8))
            return np.asarray(img.convert('RGB'), dtype=np.uint8)
    except FileNotFoundError:
        raise FaceError(f'{source}: file not found', 'unreadable') from None
    except IsADirectoryError:
        raise FaceError(f'{source}: is a directory, not an image', 'unreadable') from None
    except Image.UnidentifiedImageError:
        raise FaceError(f'{source}: not an image (unknown format)', 'unreadable') from None
    except Image.DecompressionBombError as err:
        raise FaceError(f'{source}: image too large ({err})', 'unreadable') from None
    except (OSError, SyntaxError, ValueError) as err:
        # PIL reports truncated or damaged data as OSError/SyntaxError/ValueError while decoding.
        raise FaceError(f'{source}: corrupt image ({err})', 'unreadable') from None


def as_rgb(image, source='image'):
    """A (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 array as contiguous RGB uint8 (alpha dropped)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise UserError(f'{source}: expected a uint8 image, got dtype {image.dtype}')
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise UserError(f'{source}: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, '
                        f'got shape {image.shape}')
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def _get_detector():
    """The process's one MTCNN detector, built on first use (its weights ship in the wheel)."""
    global _detector
    with _detector_lock:
        if _detector is None:
            from mtcnn import MTCNN
            _detector = MTCNN(device='CPU:0')
        return _detector


def smallest_face(image_shape):
    """Side in pixels of the smallest face detect_faces searches in an image of this shape."""
    return MIN_DETECT_SIZE * max(1.0, min(image_shape[:2]) / DETECT_MAX_SHORT_SIDE)


def detect_faces(image):
    """Faces, largest box first: dicts of `box` (x, y, w, h), `landmarks` (5, 2) float32, `score`."""
    import cv2
    image = as_rgb(image)
    if min(image.shape[:2]) < 12:  # below MTCNN's 12-pixel network input nothing can be found
        return []
    scale = min(1.0, DETECT_MAX_SHORT_SIDE / min(image.shape[:2]))
    if scale < 1.0:
        image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                           interpolation=cv2.INTER_AREA)
    # The numpy output keeps sub-pixel landmarks (the json output rounds them to integers). Rows:
    # image id, x1, y1, x2, y2, score, the five x then the five y (left eye, right eye, nose, left
    # and right mouth corner, image left/right: ARCFACE_TEMPLATE order).
    rows = np.asarray(_get_detector().detect_faces(image, box_format='xyxy', output_type='numpy'),
                      dtype=np.float64).reshape(-1, 16)
    rows[:, 1:5] /= scale
    rows[:, 6:16] /= scale
    faces = [{'box': (int(round(row[1])), int(round(row[2])), int(round(row[3] - row[1])),
                      int(round(row[4] - row[2]))),
              'landmarks': row[6:16].reshape(2, 5).T.astype(np.float32),
              'score': float(row[5])} for row in rows]
    return sorted(faces, key=lambda face: face['box'][2] * face['box'][3], reverse=True)


def similarity_matrix(landmarks, size=ARCFACE_SIZE):
    """2x3 least-squares similarity (Umeyama, all five points) mapping landmarks onto the template."""
    from skimage.transform import SimilarityTransform
    src = np.asarray(landmarks, dtype=np.float64)
    if src.shape != (5, 2) or not np.all(np.isfinite(src)):
        raise UserError(f'landmarks must be five finite (x, y) points, got shape {src.shape}')
    dst = ARCFACE_TEMPLATE.astype(np.float64) * (size / ARCFACE_SIZE)
    # from_estimate is the plain Umeyama fit on all points (no RANSAC); it reports degenerate input.
    transform = SimilarityTransform.from_estimate(src, dst)
    if not transform:
        raise UserError(f'landmarks {src.round(1).tolist()} do not fix a similarity transform '
                        '(all points coincide)')
    return transform.params[:2].astype(np.float64)


def align_face(image, landmarks, size=ARCFACE_SIZE):
    """The size x size RGB uint8 ArcFace crop of `image` given its five (x, y) landmarks."""
    import cv2
    matrix = similarity_matrix(landmarks, size)
    return cv2.warpAffine(as_rgb(image), matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def refine_landmarks(image, landmarks):
    """The landmarks detected again on an upright view of the face (the given ones if none is found)."""
    import cv2
    # MTCNN's points drift on tilted faces (measured on rotations of 25-30 degrees: 6-8% of the
    # eye distance, worst point 16%); a second pass on the de-rotated face costs one small
    # detection and brings that to 2-3% (worst point 7%), see tests/test_align.py.
    image = as_rgb(image)
    matrix = np.vstack([similarity_matrix(landmarks, _VIEW_SCALE * ARCFACE_SIZE), [0.0, 0.0, 1.0]])
    matrix[:2, 2] += _VIEW_SIDE / 2.0 - _VIEW_SCALE * ARCFACE_SIZE / 2.0
    view = cv2.warpAffine(image, matrix[:2], (_VIEW_SIDE, _VIEW_SIDE), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    faces = detect_faces(view)
    if not faces:
        return np.asarray(landmarks, dtype=np.float32)
    expected = ARCFACE_TEMPLATE * _VIEW_SCALE + (_VIEW_SIDE / 2.0 - _VIEW_SCALE * ARCFACE_SIZE / 2.0)
    # The face we warped sits at the template's place; a neighbour in the view does not.
    found = np.stack([face['landmarks'] for face in faces])
    points = found[np.argmin(np.abs(found - expected).sum(axis=(1, 2)))]
    inverse = np.linalg.inv(matrix)
    return (points @ inverse[:2, :2].T + inverse[:2, 2]).astype(np.float32)


def find_face(image, pad=0.0):
    """The largest face (a detect_faces dict, plus `padded`), or None. With `pad` > 0, a photo
    where nothing is found is searched again inside a border of pad x its longer side (edge
    pixels repeated): MTCNN misses faces that fill the frame, and finds them with some context."""
    import cv2
    image = as_rgb(image)
    faces = detect_faces(image)
    if faces:
        return dict(faces[0], padded=False)
    if pad <= 0:
        return None
    border = max(1, int(round(pad * max(image.shape[:2]))))
    faces = detect_faces(cv2.copyMakeBorder(image, border, border, border, border,
                                            cv2.BORDER_REPLICATE))
    if not faces:
        return None
    x, y, w, h = faces[0]['box']
    return dict(faces[0], box=(x - border, y - border, w, h),
                landmarks=faces[0]['landmarks'] - np.float32(border), padded=True)


def align_image(image, source='image', min_face=0, size=ARCFACE_SIZE, pad=0.0):
    """The ArcFace crop of the largest face; FaceError naming `source` if none or under min_face px.

    `pad`: see find_face (a border for faces that fill the frame)."""
    return _align_largest(image, source, min_face, size, pad)[0]


def _align_largest(image, source, min_face, size, pad):
    """(crop, whether the face was found only inside the pad border): align_image's work."""
    image = as_rgb(image, source)
    face = find_face(image, pad)
    if face is None:
        retry = f', nor inside a {pad:g} border' if pad > 0 else ''
        raise FaceError(f'{source}: no face found (faces under {smallest_face(image.shape):.0f} px '
                        f'are not searched{retry})', 'no_face')
    x, y, w, h = face['box']
    if min(w, h) < min_face:
        raise FaceError(f'{source}: largest face is {w}x{h} px, below the minimum of {min_face} px',
                        'small_face')
    return align_face(image, refine_landmarks(image, face['landmarks']), size), face['padded']


def box_matrix(box, size=ARCFACE_SIZE):
    """2x3 matrix (scale and shift) putting a face box (x, y, w, h) where MTCNN's box of an aligned
    face lies (TEMPLATE_FACE_BOX), scaled by the geometric mean of the two side ratios."""
    x, y, w, h = (float(v) for v in box)
    if not (w > 0 and h > 0):
        raise UserError(f'a face box needs a positive width and height, got {box}')
    cx, cy, tw, th = (v * size / ARCFACE_SIZE for v in TEMPLATE_FACE_BOX)
    scale = np.sqrt(tw * th / (w * h))
    return np.array([[scale, 0.0, cx - scale * (x + w / 2)],
                     [0.0, scale, cy - scale * (y + h / 2)]])


def box_crop(image, box=None, size=ARCFACE_SIZE):
    """The size x size RGB uint8 crop of a face known only by its box (x, y, w, h; None: the whole
    photo), placed as an aligned face's detection box would be (no rotation)."""
    import cv2
    image = as_rgb(image)
    if box is None:
        box = (0, 0, image.shape[1], image.shape[0])
    return cv2.warpAffine(image, box_matrix(box, size), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def load_face(path, size=ARCFACE_SIZE, align='auto'):
    """A photo file as a size x size RGB uint8 face; `align`: auto (unless size x size), always, never."""
    return face_crop(read_photo(path), size, align, source=path)


def face_crop(image, size=ARCFACE_SIZE, align='auto', source='image'):
    """An RGB uint8 photo as a size x size face: aligned (always, or with auto unless it is already
    size x size) or, with never, resized; FaceError naming `source`."""
    import cv2
    if align not in ALIGN_MODES:
        raise UserError(f'align must be one of {", ".join(ALIGN_MODES)}, got {align!r}')
    if align == 'always' or (align == 'auto' and image.shape[:2] != (size, size)):
        return align_image(image, source=source, size=size)
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return image


# ---------------------------------------------------------------------------------------------
# Whole folder trees (data/align_faces.py).
REPORT_NAME = 'align_report.csv'
# mkstemp names of atomic_output's temporary files ('.<name>.<8 random characters>'), left behind
# only when a run is killed outright.
_STALE_TEMP = re.compile(r'^\..+\.jpg\.[a-z0-9_]{8}$')


@dataclasses.dataclass
class TreeSummary:
    """Counts of one align_tree run; `failures` holds (relative path, reason, message) rows,
    `padded` the faces found only inside the --pad border, `listing` the lister's skip line."""

    total: int = 0
    aligned: int = 0
    skipped: int = 0
    failures: list = dataclasses.field(default_factory=list)
    padded: int = 0
    listing: str = ''

    def by_reason(self):
        """{reason: count} of the failed images."""
        return dict(collections.Counter(reason for _, reason, _ in self.failures))

    def line(self):
        """One printable summary line."""
        failed = ', '.join(f'{n} {reason}' for reason, n in sorted(self.by_reason().items()))
        padded = f' ({self.padded} inside the --pad border)' if self.padded else ''
        return (f'{self.total} images: {self.aligned} aligned{padded}, {self.skipped} already '
                f'done, {len(self.failures)} failed' + (f' ({failed})' if failed else ''))


def plan_tree(input_dir, output_dir):
    """(relative path, output path) per non-hidden file under input_dir (any depth, symbolic links
    followed), name_clash failure rows, and the lister's FolderScan."""
    from modules.folders import scan_tree
    if not os.path.isdir(input_dir):
        raise UserError(f'input folder not found: {input_dir}')
    src_root, out_root = os.path.realpath(input_dir), os.path.realpath(output_dir)
    if out_root == src_root or out_root.startswith(src_root + os.sep):
        raise UserError(f'output folder {output_dir} lies inside the input folder {input_dir}: '
                        'choose a folder outside it')
    scan, files = scan_tree(input_dir)
    jobs, clashes, taken = [], [], set()
    for rel in files:
        out = os.path.join(out_root, os.path.splitext(rel)[0] + '.jpg')
        if out in taken:
            clashes.append((rel, 'name_clash', f'{rel}: another file of the same name already '
                            'gives ' + os.path.relpath(out, out_root)))
            continue
        taken.add(out)
        jobs.append((rel, out))
    return jobs, clashes, scan


def align_file(src, dst, min_face=0, jpeg_quality=95, pad=0.0, cropped=False):
    """Align the photo `src` into the JPEG `dst` (written atomically); None, 'padded' (found only
    inside the pad border), or (reason, message). `cropped`: the photo is the face box."""
    import cv2
    padded = False
    try:
        image = read_photo(src)
        if cropped:
            crop = box_crop(image)
        else:
            crop, padded = _align_largest(image, src, min_face, ARCFACE_SIZE, pad)
    except FaceError as err:
        return err.reason, str(err)
    ok, buf = cv2.imencode('.jpg', crop[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        return 'error', f'{src}: cannot encode the aligned crop as JPEG'
    with atomic_output(dst) as fh:
        fh.write(buf.tobytes())
    return 'padded' if padded else None


def _init_worker(threads):
    # Each worker process gets its share of the cores instead of all of them (oversubscription).
    from modules.utils import quiet_tensorflow
    quiet_tensorflow()
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def _align_job(args):
    src = args[0]
    try:
        return align_file(*args)
    except Exception as err:  # one odd image must not end a 100k-image run: report it instead
        return 'error', f'{src}: {type(err).__name__}: {err}'


def process_pool(workers):
    """A spawn-context process pool of `workers` MTCNN workers, each with its share of the cores."""
    import concurrent.futures
    import multiprocessing
    # spawn, not fork: TensorFlow's threads do not survive a fork.
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn'), initializer=_init_worker,
        initargs=(max(1, (os.cpu_count() or 1) // workers),))


def align_tree(input_dir, output_dir, workers=1, min_face=40, jpeg_quality=95, progress=True,
               on_done=None, pad=0.0, cropped=False):
    """Mirror a photo tree into aligned JPEGs (existing outputs kept), write the report; a TreeSummary.

    `on_done(relative path, None or (reason, message))` is called as each file finishes. `pad`
    and `cropped` as in align_file.
    """
    jobs, clashes, scan = plan_tree(input_dir, output_dir)
    if not jobs:
        raise UserError(f'{input_dir}: no files to align ({scan.skip_line(named=False)})')
    out_root = os.path.realpath(output_dir)
    os.makedirs(out_root, exist_ok=True)
    for folder, _, files in os.walk(out_root):
        for name in files:
            if _STALE_TEMP.match(name):
                os.remove(os.path.join(folder, name))
    summary = TreeSummary(total=len(jobs) + len(clashes), failures=list(clashes),
                          listing=scan.skip_line())
    todo = [(rel, dst) for rel, dst in jobs if not os.path.isfile(dst)]
    summary.skipped = len(jobs) - len(todo)
    # Sources keep the folder as the user gave it, so the report names files the way they know them.
    args = [(os.path.join(input_dir, rel), dst, min_face, jpeg_quality, pad, cropped)
            for rel, dst in todo]
    from tqdm import tqdm
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(args) > 1:
            results = stack.enter_context(process_pool(workers)).map(_align_job, args)
        else:
            results = map(_align_job, args)
        bar = stack.enter_context(tqdm(total=len(args), desc='aligning', unit='img',
                                       disable=not progress))
        for (rel, _), result in zip(todo, results):
            if result is None or result == 'padded':
                summary.aligned += 1
                summary.padded += result == 'padded'
                result = None
            else:
                summary.failures.append((rel, *result))
            bar.update()
            if on_done is not None:
                on_done(rel, result)
    summary.failures.sort()
    with atomic_output(os.path.join(out_root, REPORT_NAME), 'w') as fh:
        writer = csv.writer(fh)
        writer.writerow(('path', 'reason', 'message'))
        writer.writerows(summary.failures)
    return summary
