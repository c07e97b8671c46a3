"""Face detection (MTCNN) and five-point similarity alignment to InsightFace's ArcFace 112x112 crop."""
import threading

import numpy as np

from modules.utils import UserError

# InsightFace's ArcFace 112x112 five-point template: left eye, right eye, nose, left and right mouth
# corner (image left/right), in (x, y) pixels of the output crop.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963],
                             [73.5318, 51.5014],
                             [56.0252, 71.7366],
                             [41.5493, 92.3655],
                             [70.7299, 92.2041]], dtype=np.float32)
ARCFACE_SIZE = 112
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
# MTCNN searches faces down to this box side (its own default); smaller ones count as "no face".
MIN_DETECT_SIZE = 20

_detector = None
_detector_lock = threading.Lock()


class FaceError(UserError):
    """An image that gives no usable face; `reason` is 'unreadable', 'no_face' or 'small_face'."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def read_photo(path):
    """A photo file as an RGB uint8 (H, W, 3) array: EXIF orientation applied, grey/RGBA/palette
    converted; FaceError('unreadable') naming the file when it is missing, corrupt or not an image."""
    from PIL import Image, ImageOps
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
        raise FaceError(f'{path}: file not found', 'unreadable') from None
    except IsADirectoryError:
        raise FaceError(f'{path}: is a directory, not an image', 'unreadable') from None
    except Image.UnidentifiedImageError:
        raise FaceError(f'{path}: not an image (unknown format)', 'unreadable') from None
    except Image.DecompressionBombError as err:
        raise FaceError(f'{path}: image too large ({err})', 'unreadable') from None
    except (OSError, SyntaxError, ValueError) as err:
        # PIL reports truncated or damaged data as OSError/SyntaxError/ValueError while decoding.
        raise FaceError(f'{path}: corrupt image ({err})', 'unreadable') from None


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


def detect_faces(image, min_face_size=MIN_DETECT_SIZE):
    """Faces in an RGB uint8 image, largest box first: dicts with `box` (x, y, w, h), `landmarks`
    (5, 2) float32 in ARCFACE_TEMPLATE order and `score`."""
    image = as_rgb(image)
    if min(image.shape[:2]) < 12:  # below MTCNN's 12-pixel network input nothing can be found
        return []
    # The numpy output keeps sub-pixel landmarks (the json output rounds them to integers). Rows:
    # image id, x1, y1, x2, y2, score, the five x then the five y (left eye, right eye, nose, left
    # and right mouth corner, image left/right: ARCFACE_TEMPLATE order).
    rows = np.asarray(_get_detector().detect_faces(image, min_face_size=min_face_size,
                                                    box_format='xyxy', output_type='numpy'))
    faces = [{'box': (int(round(row[1])), int(round(row[2])), int(round(row[3] - row[1])),
                      int(round(row[4] - row[2]))),
              'landmarks': row[6:16].reshape(2, 5).T.astype(np.float32),
              'score': float(row[5])} for row in rows.reshape(-1, 16)]
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
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def align_image(image, source='image', min_face=0, size=ARCFACE_SIZE):
    """The size x size ArcFace crop of the largest face; FaceError naming `source` when there is none
    or when its box is smaller than min_face pixels."""
    image = as_rgb(image, source)
    faces = detect_faces(image)
    if not faces:
        raise FaceError(f'{source}: no face found (faces under {MIN_DETECT_SIZE} px are not searched)',
                        'no_face')
    x, y, w, h = faces[0]['box']
    if min(w, h) < min_face:
        raise FaceError(f'{source}: largest face is {w}x{h} px, below the minimum of {min_face} px',
                        'small_face')
    return align_face(image, faces[0]['landmarks'], size)
