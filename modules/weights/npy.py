"""The .npy weight dict: safe reading, writing, and loading into a Keras backbone.

The weight dict is a dict from our Keras layer names (InsightFace's MXNet names: conv0, bn0,
relu0, stage1_unit1_bn1, ..., pre_fc1, fc1) to the list of that layer's arrays in Keras layout,
saved with np.save (see pre_models/README.md). Loading it never runs plain pickle: a restricted
unpickler admits only numpy array reconstruction.
"""
import pickle

import numpy as np

from modules.utils import UserError, atomic_output
from modules.weights.canonical import FORMAT_TAG, META_KEY

# ---------------------------------------------------------------------------------------------
# Safe reading of .npy files that hold a pickled dict.


def _numpy_core():
    return getattr(np, '_core', None) or np.core


def _allowed_globals():
    core = _numpy_core()
    table = {}
    for mod in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        table[(mod, '_reconstruct')] = core.multiarray._reconstruct
        table[(mod, 'scalar')] = core.multiarray.scalar
    for mod in ('numpy.core.numeric', 'numpy._core.numeric'):
        table[(mod, '_frombuffer')] = core.numeric._frombuffer
    table[('numpy', 'ndarray')] = np.ndarray
    table[('numpy', 'dtype')] = np.dtype
    for mod in ('builtins', '__builtin__'):
        table[(mod, 'dict')] = dict
        table[(mod, 'list')] = list
    table[('collections', 'OrderedDict')] = dict
    # Protocol-2 pickles written by Python 3 encode bytes objects through _codecs.encode.
    table[('_codecs', 'encode')] = _codecs_encode
    return table


def _codecs_encode(text, encoding='latin1'):
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise pickle.UnpicklingError('_codecs.encode is only admitted for latin1 text')
    return text.encode('latin1')


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy-array globals and plain containers; nothing else runs."""

    _table = None

    def find_class(self, module, name):
        if _ArrayUnpickler._table is None:
            _ArrayUnpickler._table = _allowed_globals()
        try:
            return _ArrayUnpickler._table[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f'refused global {module}.{name}') from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError('persistent ids are not allowed')


def read_weight_dict(path):
    """Read a .npy file holding a pickled dict (np.save of a dict) with a restricted unpickler."""
    try:
        fh = open(path, 'rb')
    except FileNotFoundError:
        raise UserError(f'weights file not found: {path}') from None
    except IsADirectoryError:
        raise UserError(f'weights path is a directory: {path}') from None
    with fh:
        try:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise UserError(f'{path}: unsupported .npy version {version}')
        except ValueError as err:
            raise UserError(f'{path}: not a .npy file ({err})') from None
        if not dtype.hasobject:
            raise UserError(f'{path}: holds a plain {dtype} array of shape {shape}, not a dict of '
                            'layer weights')
        try:
            obj = _ArrayUnpickler(fh, encoding='latin1').load()
        except pickle.UnpicklingError as err:
            raise UserError(f'{path}: refused to load: {err} (only numpy arrays, dicts and lists '
                            'are admitted)') from None
        except Exception as err:  # noqa: BLE001 - any decoding failure is a bad file
            raise UserError(f'{path}: corrupt weights file ({type(err).__name__}: {err})') from None
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise UserError(f'{path}: expected a dict of layer name -> weights, got '
                        f'{type(obj).__name__}')
    return {(k.decode('latin1') if isinstance(k, bytes) else k): v for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------
# Matching a weight dict to a Keras backbone.

_ENTRY_KEYS = {
    'conv': (('weights', 'kernel', 'weight'),),
    'dense': (('weights', 'kernel', 'weight'), ('bias', 'b')),
    'bn': (('scale', 'gamma'), ('bias', 'beta'), ('mean', 'moving_mean', 'running_mean'),
           ('var', 'moving_variance', 'moving_var', 'running_var', 'variance')),
    'prelu': (('gamma', 'alpha', 'weights', 'slope'),),
}


def _kind(layer):
    # By the class and its bases, so our fused BatchNormalization (a subclass of Keras' own)
    # counts as 'bn'; names, not classes, so this module needs no TensorFlow import.
    bases = {cls.__name__ for cls in type(layer).__mro__}
    kinds = (('Conv2D', 'conv'), ('Dense', 'dense'), ('BatchNormalization', 'bn'), ('PReLU', 'prelu'))
    return next((kind for name, kind in kinds if name in bases), type(layer).__name__)


def _weighted_layers(model):
    return [layer for layer in model.layers if layer.weights]


def _decode_key(key):
    return key.decode('latin1') if isinstance(key, bytes) else key


def _entry_to_list(name, kind, entry, has_scale):
    """A weight-dict entry (list, single array or per-layer dict) as a list of arrays."""
    if isinstance(entry, np.ndarray) and entry.dtype != object:
        return [entry]
    if isinstance(entry, (list, tuple)):
        return list(entry)
    if not isinstance(entry, dict):
        raise UserError(f"layer '{name}': expected a list of arrays or a dict, got "
                        f'{type(entry).__name__}')
    entry = {_decode_key(k): v for k, v in entry.items()}
    spec = _ENTRY_KEYS.get(kind)
    if spec is None:
        raise UserError(f"layer '{name}': layers of type {kind} hold no weights")
    out, used = [], set()
    for i, aliases in enumerate(spec):
        found = [a for a in aliases if a in entry]
        if not found:
            if kind == 'bn' and i == 0:
                if has_scale:  # no scale given: the source fixed gamma at 1 (MXNet fix_gamma)
                    out.append(None)
                continue
            raise UserError(f"layer '{name}': entry has no '{aliases[0]}' "
                            f'(keys: {sorted(entry)})')
        used.add(found[0])
        out.append(entry[found[0]])
    extra = sorted(set(entry) - used)
    if extra:
        raise UserError(f"layer '{name}': unexpected keys {extra} in its entry (a {kind} layer "
                        'takes ' + ', '.join(a[0] for a in spec) + ')')
    return out


def _fit_layer(name, layer, entry):
    """Turn one entry into exactly the arrays `layer.set_weights` needs, or raise UserError."""
    kind = _kind(layer)
    expected = [tuple(w.shape) for w in layer.weights]
    has_scale = kind == 'bn' and getattr(layer, 'scale', True)
    arrays = _entry_to_list(name, kind, entry, has_scale)
    if kind == 'bn':
        if has_scale and len(arrays) == 3:
            arrays = [None] + arrays
        if arrays and arrays[0] is None:
            arrays[0] = np.ones(expected[0], np.float32)
        if not has_scale and len(arrays) == 4:
            gamma = np.asarray(arrays[0], np.float32)
            if gamma.shape != expected[0] or not np.all(gamma == 1):
                raise UserError(f"layer '{name}': this BatchNormalization has no scale (fixed "
                                'gamma = 1) but the file gives a gamma that is not all ones')
            arrays = arrays[1:]
    if kind == 'prelu' and len(arrays) == 1:
        alpha = np.asarray(arrays[0], np.float32)
        channels = expected[0][-1]
        if alpha.shape in ((channels,), (1, 1, channels)):
            arrays = [np.broadcast_to(alpha.reshape(-1), expected[0]).copy()]
    if len(arrays) != len(expected):
        raise UserError(f"layer '{name}': expected {len(expected)} arrays "
                        f'(shapes {expected}), got {len(arrays)}')
    out = []
    for i, (arr, shape) in enumerate(zip(arrays, expected)):
        arr = np.asarray(arr)
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
            raise UserError(f"layer '{name}': array {i} is not numeric ({arr.dtype})")
        if arr.shape != shape:
            hint = ''
            if kind == 'conv' and arr.ndim == 4 and arr.shape == (shape[3], shape[2], *shape[:2]):
                hint = (' (that is the MXNet/PyTorch OIHW layout: convert the checkpoint with '
                        'pre_models/convert_insightface.py)')
            raise UserError(f"layer '{name}' array {i} ({layer.weights[i].name}): expected shape "
                            f'{shape}, got {arr.shape}{hint}')
        arr = arr.astype(np.float32)
        if not np.all(np.isfinite(arr)):
            raise UserError(f"layer '{name}' array {i}: holds NaN or infinite values")
        out.append(arr)
    return out


def load_npy_weights(backbone_model, path):
    """Load a weight-dict .npy into an Insight backbone; raise UserError on any mismatch."""
    weights = read_weight_dict(path)
    meta = weights.pop(META_KEY, None)
    for key in list(weights):
        if not isinstance(key, str):
            raise UserError(f'{path}: layer names must be strings, got {key!r}')
        if key.startswith('__'):
            weights.pop(key)
    layers = {layer.name: layer for layer in _weighted_layers(backbone_model)}
    missing = [n for n in layers if n not in weights]
    extra = [n for n in weights if n not in layers]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f'no weights for layer {_name_list(missing)}')
        if extra:
            parts.append(f'unknown layer {_name_list(extra)}')
        backbone = meta.get('backbone') if isinstance(meta, dict) else None
        note = f' (the file was made for {backbone})' if backbone else ''
        raise UserError(f'{path}: does not fit model {backbone_model.name!r}{note}: '
                        + '; '.join(parts))
    fitted = {}
    for name, layer in layers.items():
        try:
            fitted[name] = _fit_layer(name, layer, weights[name])
        except UserError as err:
            raise UserError(f'{path}: {err}') from None
    for name, layer in layers.items():
        layer.set_weights(fitted[name])
    return len(layers)


def _name_list(names, limit=4):
    shown = ', '.join(f"'{n}'" for n in names[:limit])
    return shown + (f' and {len(names) - limit} more' if len(names) > limit else '')


def save_npy_weights(backbone_model, path, source='keras'):
    """Write a backbone's weights as a weight-dict .npy (atomically); return the layer count."""
    weights = {layer.name: [np.asarray(w, np.float32) for w in layer.get_weights()]
               for layer in _weighted_layers(backbone_model)}
    weights[META_KEY] = {'format': FORMAT_TAG, 'version': 1, 'source': source,
                         'backbone': backbone_model.name}
    write_weight_dict(weights, path)
    return len(weights) - 1


def write_weight_dict(weights, path):
    """np.save a weight dict to `path` atomically."""
    with atomic_output(path) as fh:
        np.save(fh, weights, allow_pickle=True)


# ---------------------------------------------------------------------------------------------
# The output block after the backbone, made an identity.


def apply_identity_output_layer(output_layer_model):
    """Make a 'BN, Dropout, Flatten, Dense, BN' block an exact identity at inference.

    Accepts the Keras sub-model or a list of its layers. Dense gets an identity kernel and zero
    bias (so it must be square); each BatchNormalization gets gamma 1, beta 0, moving mean 0 and
    moving variance 1 - epsilon, so that (x - 0) / sqrt(var + eps) is x itself.
    """
    layers = getattr(output_layer_model, 'layers', output_layer_model)
    count = 0
    for layer in layers:
        kind = _kind(layer)
        if not layer.weights:
            continue
        if kind == 'dense':
            kernel = layer.kernel
            n_in, n_out = kernel.shape
            if n_in != n_out:
                raise UserError(f"layer '{layer.name}': a {n_in}->{n_out} Dense cannot be an "
                                'identity (the backbone output and embd_shape differ)')
            values = [np.eye(n_in, dtype=np.float32)]
            if layer.use_bias:
                values.append(np.zeros(n_out, np.float32))
        elif kind == 'bn':
            n = layer.moving_mean.shape[-1]
            values = []
            if layer.scale:
                values.append(np.ones(n, np.float32))
            if layer.center:
                values.append(np.zeros(n, np.float32))
            values += [np.zeros(n, np.float32), np.full(n, 1.0 - layer.epsilon, np.float32)]
        else:
            raise UserError(f"layer '{layer.name}' ({type(layer).__name__}) cannot be made an "
                            'identity')
        layer.set_weights(values)
        count += 1
    if count == 0:
        raise UserError('apply_identity_output_layer: no Dense or BatchNormalization layer found')
    return count
