"""Run a converted backbone beside its ONNX source on real face photos and compare embeddings."""
import glob
import os

import numpy as np

from modules.utils import UserError, quiet_tensorflow

# A correct conversion agrees to 1 - cos ~ 1e-11 (float32 rounding); a /127.5 vs /128 input scale
# gives ~1e-5. The limit holds for every sample face, not on average.
MAX_ONE_MINUS_COS = 1e-6
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'data', 'samples')
_ORT_TYPES = {'tensor(float)': np.float32, 'tensor(float16)': np.float16,
              'tensor(double)': np.float64}


def sample_faces(size=112):
    """The project's aligned sample photos (data/samples/*.jpg) and their mirror images, RGB uint8."""
    import cv2
    paths = sorted(glob.glob(os.path.join(SAMPLE_DIR, '*.jpg')))
    if not paths:
        raise UserError(f'no sample photos in {SAMPLE_DIR} (data/align_sample_faces.py makes them)')
    faces = []
    for path in paths:
        bgr = cv2.imread(path)
        if bgr is None:
            raise UserError(f'{path}: not a readable image')
        if bgr.shape[:2] != (size, size):
            bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
        faces.append(bgr[:, :, ::-1])
    faces = np.stack(faces)
    return np.concatenate([faces, faces[:, :, ::-1]])


def _one_line(err):
    """The first line of an exception's message (onnxruntime's run over several)."""
    text = str(err).strip().splitlines()
    return f'{type(err).__name__}: {text[0] if text else ""}'


def onnx_embeddings(path, pixels, feed, batch=None):
    """onnxruntime embeddings of RGB uint8 NHWC `pixels`; `feed` = (a, b) maps pixels to the graph
    input (None: the graph normalises its input itself).

    The images go in runs of the batch the graph accepts: the input's declared batch if fixed,
    else `batch` (a batch fixed inside the graph, e.g. by a Reshape), else all at once. A short
    last run is filled with copies of its first image, whose outputs are dropped.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError('--verify needs onnxruntime (pip install -r requirements-dev.txt)') from None
    x = np.transpose(pixels.astype(np.float64), (0, 3, 1, 2))
    if feed is not None:
        x = feed[0] * x + feed[1]
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failure is reported once, below, not also logged
    try:
        sess = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UserError(f'{path}: onnxruntime cannot load it ({_one_line(err)})') from None
    inp = sess.get_inputs()[0]
    if inp.type not in _ORT_TYPES:
        raise UserError(f'{path}: its input {inp.name!r} is a {inp.type}, not a float image')
    x = x.astype(_ORT_TYPES[inp.type])
    declared = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    step = declared or batch or len(x)
    runs = []
    for start in range(0, len(x), step):
        chunk = x[start:start + step]
        filled = np.concatenate([chunk, np.repeat(chunk[:1], step - len(chunk), 0)])
        try:
            out = sess.run(None, {inp.name: filled})[0]
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UserError(f'{path}: onnxruntime cannot run it on a batch of {step} image(s) '
                            f'of shape {list(filled.shape[1:])} ({_one_line(err)})') from None
        runs.append(np.asarray(out)[:len(chunk)])
    return np.concatenate(runs), step


def input_size(path):
    """The square spatial size an ONNX model's input fixes, or 112 when it is dynamic."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    sizes = [d.dim_value for d in dims[2:4] if d.dim_value > 0]
    return sizes[0] if len(sizes) == 2 and sizes[0] == sizes[1] else 112


def verify_onnx(onnx_path, npy_path, backbone, feed, batch=None):
    """1 - cos between the ONNX source (onnxruntime) and the converted Keras backbone for each
    sample face, and the batch onnxruntime ran; UserError if one exceeds MAX_ONE_MINUS_COS."""
    size = input_size(onnx_path)
    pixels = sample_faces(size)
    reference, step = onnx_embeddings(onnx_path, pixels, feed, batch)
    reference = reference.astype(np.float64).reshape(len(pixels), -1)
    quiet_tensorflow()  # only now: a graph onnxruntime cannot run fails without TensorFlow
    from modules.backbones import insight_resnet
    from modules.weights.npy import load_npy_weights
    model = insight_resnet(backbone, (size, size, 3))
    load_npy_weights(model, npy_path)
    ours = model(pixels.astype(np.float32) / 255.0, training=False).numpy().astype(np.float64)
    if ours.shape != reference.shape:
        raise UserError(f'--verify: {onnx_path} gives embeddings of shape {reference.shape[1:]}, '
                        f'the converted model {ours.shape[1:]}')
    gap = 1.0 - np.sum(ours * reference, 1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(
        reference, axis=1)
    worst = int(np.nanargmax(gap)) if not np.all(np.isnan(gap)) else 0
    if not np.all(gap <= MAX_ONE_MINUS_COS):  # also catches NaN
        raise UserError(f'--verify: the converted model disagrees with {onnx_path}: 1 - cos = '
                        f'{gap[worst]:.2e} on sample face {worst + 1} of {len(gap)} (limit '
                        f'{MAX_ONE_MINUS_COS:g}); a correct conversion gives about 1e-11')
    return gap, step
