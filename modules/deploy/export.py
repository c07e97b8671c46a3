"""Export the hashing model (or the float embedding model) as SavedModel, TFLite or ONNX.

Every export has one signature: uint8 RGB images (N, size, size, 3), N dynamic, scaled to [0, 1]
inside the graph; out come int32 IoM codes (N, m), or float32 embeddings (N, embd_shape) with
`embedding=True`. The permutation of the config's `perm_key` is a constant of the graph.

`parity` runs the written file on the sample photos and synthetic faces and compares it with the
Keras model: the fraction of identical indices (codes) or the smallest cosine similarity
(embeddings).
"""
import contextlib
import os
import shutil
import tempfile

import numpy as np

from modules.utils import UserError

FORMATS = ('saved_model', 'tflite', 'onnx')
QUANTIZE = ('none', 'dynamic')
# Required agreement of the export with the Keras model (float exports; dynamic-range quantised
# TFLite changes the arithmetic, so its agreement is reported, not required).
MIN_CODE_AGREEMENT = {'saved_model': 1.0, 'tflite': 0.999, 'onnx': 0.999}
MAX_COSINE_GAP = 1e-4
ONNX_OPSET = 17
NUM_SYNTHETIC = 64
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def serving_function(model, size, embedding=False):
    """tf.function uint8 (N, size, size, 3) -> int32 codes or float32 embeddings of `model`."""
    import tensorflow as tf
    net = model.get_layer('arcface_model') if embedding else model

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name='images')])
    def serve(images):
        out = net(tf.cast(images, tf.float32) / 255.0, training=False)
        return {'embeddings' if embedding else 'codes':
                tf.cast(out, tf.float32 if embedding else tf.int32)}

    serve.net = net
    return serve


@contextlib.contextmanager
def staged_output(path):
    """Yield a temporary path beside `path` (file or folder); move it into place on success."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix='.' + os.path.basename(path) + '.', dir=parent)
    try:
        tmp = os.path.join(stage, os.path.basename(path))
        yield tmp
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _save_model(serve, path):
    import tensorflow as tf
    module = tf.Module()
    module.serve = serve
    # The SavedModel must own the weights the function captures.
    module.weights = [w.value if hasattr(w, 'value') else w for w in serve.net.weights]
    tf.saved_model.save(module, path, signatures={'serving_default': serve.get_concrete_function()})


def check_options(fmt, quantize):
    """UserError for an unknown format or a quantisation the format does not have."""
    if fmt not in FORMATS:
        raise UserError(f'export format must be one of {", ".join(FORMATS)}, got {fmt!r}')
    if quantize not in QUANTIZE or (quantize != 'none' and fmt != 'tflite'):
        raise UserError(f'--quantize {quantize}: only tflite exports can be quantised (dynamic)')


def write_export(model, size, fmt, path, embedding=False, quantize='none'):
    """Write the export file (or SavedModel folder) at `path`."""
    check_options(fmt, quantize)
    serve = serving_function(model, size, embedding)
    if fmt == 'saved_model':
        _save_model(serve, path)
    elif fmt == 'tflite':
        import tensorflow as tf
        with tempfile.TemporaryDirectory() as tmp:
            _save_model(serve, tmp)
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
            if quantize == 'dynamic':
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            flat = converter.convert()
        with open(path, 'wb') as fh:
            fh.write(flat)
    else:
        try:
            import tf2onnx
        except ImportError as err:
            raise UserError(f'--format onnx needs tf2onnx (pip install tf2onnx): {err}') from None
        tf2onnx.convert.from_function(serve, input_signature=serve.input_signature,
                                      opset=ONNX_OPSET, output_path=path)


def run_export(fmt, path, images):
    """Outputs of the export at `path` on uint8 `images` (one batch, N dynamic)."""
    if fmt == 'saved_model':
        import tensorflow as tf
        fn = tf.saved_model.load(path).signatures['serving_default']
        return next(iter(fn(images=tf.constant(images)).values())).numpy()
    if fmt == 'tflite':
        import warnings

        import tensorflow as tf
        with warnings.catch_warnings():  # tf.lite.Interpreter's notice about moving to LiteRT
            warnings.simplefilter('ignore', UserWarning)
            interpreter = tf.lite.Interpreter(model_path=path, num_threads=2)
        index = interpreter.get_input_details()[0]['index']
        interpreter.resize_tensor_input(index, images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(index, images)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]['index'])
    try:
        import onnxruntime
    except ImportError as err:
        raise UserError(f'checking an ONNX export needs onnxruntime: {err}') from None
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def parity_images(size, sample_dir=None):
    """uint8 faces (N, size, size, 3): the sample photos (aligned) and 64 synthetic faces."""
    sample_dir = sample_dir or os.path.join(_ROOT, 'data', 'samples')
    import importlib.util

    import cv2

    from modules.align import IMAGE_EXTENSIONS, load_face
    photos = [load_face(os.path.join(sample_dir, name), size)
              for name in sorted(os.listdir(sample_dir)) if name.lower().endswith(IMAGE_EXTENSIONS)]
    spec = importlib.util.spec_from_file_location(
        'make_synthetic_faces', os.path.join(_ROOT, 'data', 'make_synthetic_faces.py'))
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    ids = np.arange(NUM_SYNTHETIC)
    bgr, _ = generator.draw_images(0, 'lfw', ids // 2, ids % 2)
    synthetic = [cv2.resize(face[..., ::-1], (size, size), interpolation=cv2.INTER_AREA)
                 for face in bgr]
    return np.ascontiguousarray(np.stack(photos + synthetic), np.uint8)


def parity(model, size, fmt, path, images, embedding=False):
    """{'agreement': identical-index fraction or smallest cosine, 'worst': ..., 'n': images}."""
    import tensorflow as tf
    net = model.get_layer('arcface_model') if embedding else model
    reference = net(tf.constant(images, tf.float32) / 255.0, training=False).numpy()
    exported = np.asarray(run_export(fmt, path, images))
    if exported.shape != reference.shape:
        raise UserError(f'{path}: export gives shape {exported.shape}, Keras {reference.shape}')
    if embedding:
        a = reference / np.linalg.norm(reference, axis=1, keepdims=True)
        b = exported / np.linalg.norm(exported, axis=1, keepdims=True)
        cosine = np.sum(a * b, axis=1)
        return {'measure': 'cosine similarity (min)', 'agreement': float(cosine.min()),
                'n': len(images), 'ok': bool(1.0 - cosine.min() <= MAX_COSINE_GAP)}
    same = reference == exported
    return {'measure': 'identical indices', 'agreement': float(same.mean()),
            'worst': float(same.mean(axis=1).min()), 'n': len(images), 'ok': None}


def export_model(model, size, fmt, output, embedding=False, quantize='none', images=None):
    """Write the export, check it against the Keras model, and move it into place only if the
    agreement reaches the required level (quantised TFLite: reported only). Returns the parity."""
    if images is None:
        images = parity_images(size)
    with staged_output(output) as tmp:
        write_export(model, size, fmt, tmp, embedding, quantize)
        result = parity(model, size, fmt, tmp, images, embedding)
        if not embedding:
            required = MIN_CODE_AGREEMENT[fmt] if quantize == 'none' else None
            result['ok'] = required is None or result['agreement'] >= required
            result['required'] = required
        if result['ok'] is False:
            raise UserError(f"{output}: the {fmt} export disagrees with the Keras model "
                            f"({result['measure']} {result['agreement']:.6f}); nothing written")
    return result
