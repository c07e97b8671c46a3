"""Run a converted backbone beside its ONNX source on real face photos and compare embeddings."""
import glob
import os

import numpy as np

from modules.utils import UserError

MIN_COSINE = 0.9999
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'data', 'samples')


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


def onnx_embeddings(path, pixels, feed):
    """onnxruntime embeddings of RGB uint8 NHWC `pixels`; `feed` = (a, b) maps pixels to the graph
    input (None: the graph normalises its input itself)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError('--verify needs onnxruntime (pip install -r requirements-dev.txt)') from None
    x = np.transpose(pixels.astype(np.float64), (0, 3, 1, 2))
    if feed is not None:
        x = feed[0] * x + feed[1]
    try:
        sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise UserError(f'{path}: onnxruntime cannot load it ({err})') from None
    inp = sess.get_inputs()[0]
    x = x.astype(np.float32)
    if isinstance(inp.shape[0], int) and inp.shape[0] != len(x):
        # A static-batch export (the dynamo exporter's default): feed one image per run.
        return np.concatenate([sess.run(None, {inp.name: x[i:i + 1]})[0] for i in range(len(x))])
    return sess.run(None, {inp.name: x})[0]


def input_size(path):
    """The square spatial size an ONNX model's input fixes, or 112 when it is dynamic."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    sizes = [d.dim_value for d in dims[2:4] if d.dim_value > 0]
    return sizes[0] if len(sizes) == 2 and sizes[0] == sizes[1] else 112


def verify_onnx(onnx_path, npy_path, backbone, feed):
    """Cosine between the ONNX source (onnxruntime) and the converted Keras backbone per sample
    face; UserError if any is below MIN_COSINE."""
    from modules.backbones import insight_resnet
    from modules.weights.npy import load_npy_weights
    size = input_size(onnx_path)
    pixels = sample_faces(size)
    reference = onnx_embeddings(onnx_path, pixels, feed).astype(np.float64)
    model = insight_resnet(backbone, (size, size, 3))
    load_npy_weights(model, npy_path)
    ours = model(pixels.astype(np.float32) / 255.0, training=False).numpy().astype(np.float64)
    cos = np.sum(ours * reference, 1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(
        reference, axis=1)
    if cos.min() < MIN_COSINE:
        raise UserError(f'--verify: the converted model disagrees with {onnx_path} on the sample '
                        f'faces: min cosine {cos.min():.6f} < {MIN_COSINE}')
    return cos
