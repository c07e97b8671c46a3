"""Pre-built InsightFace weights: the .npy weight dict, MXNet checkpoints and ONNX models.

Every source ends up as one format, the "weight dict" (see pre_models/README.md): a dict from
our Keras layer names (InsightFace's MXNet names: conv0, bn0, relu0, stage1_unit1_bn1, ...,
pre_fc1, fc1) to the list of that layer's arrays in Keras layout, saved with np.save. Loading it
never runs plain pickle: a restricted unpickler admits only numpy array reconstruction.
"""
import json
import math
import os
import pickle
import re
import struct
import time

import numpy as np

from modules.utils import UserError, atomic_output

BN_EPS = 2e-5  # the Keras backbone's BatchNormalization epsilon (modules/backbones.py)
FILTERS = (64, 128, 256, 512)
FORMAT_TAG = 'iomface-insight-weights'
META_KEY = '__meta__'

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
    name = type(layer).__name__
    return {'Conv2D': 'conv', 'Dense': 'dense', 'BatchNormalization': 'bn',
            'PReLU': 'prelu'}.get(name, name)


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


# ---------------------------------------------------------------------------------------------
# Source-independent description of an LResNet-IR: our layer names -> parameters in the
# source's channel-first layout. Both converters fill it; `canonical_to_npy` does the rest.
#   conv:  {'kernel': (O, I, kh, kw), 'bias': (O,) or None}
#   bn:    {'gamma': (C,) or None (fixed at 1), 'beta', 'mean', 'var', 'eps'}
#   prelu: {'slope': (C,)}
#   fc:    {'weight': (out, in) with in in (C, H, W) order, 'bias': (out,)}


def layer_plan(units):
    """Our layer names in order, as (name, kind, conv-specs) for a backbone with `units`."""
    plan = [('conv0', 'conv', (3, 1, 64)), ('bn0', 'bn', None), ('relu0', 'prelu', None)]
    for stage, (count, filters) in enumerate(zip(units, FILTERS), start=1):
        for unit in range(1, count + 1):
            p = f'stage{stage}_unit{unit}'
            stride = 2 if unit == 1 else 1
            plan += [(p + '_bn1', 'bn', None), (p + '_conv1', 'conv', (3, 1, filters)),
                     (p + '_bn2', 'bn', None), (p + '_relu1', 'prelu', None),
                     (p + '_conv2', 'conv', (3, stride, filters)), (p + '_bn3', 'bn', None)]
            if unit == 1:
                plan += [(p + '_conv1sc', 'conv', (1, 2, filters)), (p + '_sc', 'bn', None)]
    plan += [('bn1', 'bn', None), ('pre_fc1', 'fc', None), ('fc1', 'bn', None)]
    return plan


def _bn_after(conv_name):
    """The BatchNormalization that follows a conv in our graph (where a folded bias goes)."""
    if conv_name == 'conv0':
        return 'bn0'
    if conv_name.endswith('_conv1sc'):
        return conv_name[:-len('_conv1sc')] + '_sc'
    if conv_name.endswith('_conv1'):
        return conv_name[:-len('_conv1')] + '_bn2'
    return conv_name[:-len('_conv2')] + '_bn3'


def supported_units():
    """Backbone name -> unit counts per stage, as modules/backbones.py defines them."""
    from modules.backbones import INSIGHT_UNITS
    return dict(INSIGHT_UNITS)


def backbone_for_units(units, requested=None, where=''):
    """Name of the Insight backbone with these unit counts; UserError if none (or not `requested`)."""
    table = supported_units()
    if requested is not None:
        if requested not in table:
            raise UserError(f'unknown backbone {requested!r}; choose from {sorted(table)}')
        if tuple(table[requested]) != tuple(units):
            raise UserError(f'{where}the network has {list(units)} units per stage, but '
                            f'{requested} has {list(table[requested])}')
        return requested
    for name, counts in table.items():
        if tuple(counts) == tuple(units):
            return name
    raise UserError(f'{where}unsupported depth: {list(units)} units per stage (supported: '
                    + ', '.join(f'{n} {list(c)}' for n, c in table.items()) + ')')


def canonical_to_npy(canon, units, input_scale=1.0):
    """Convert canonical (channel-first) parameters into the Keras-layout weight dict.

    `input_scale` multiplies conv0's kernel: the source expects (x - 127.5) * 128 * input_scale /
    128, our input_norm layer gives (x - 127.5) / 128, and conv0 is linear without bias.
    """
    out = {}
    canon = dict(canon)
    for name, kind, _ in layer_plan(units):
        if kind != 'conv':
            continue
        bias = canon[name].get('bias')
        if bias is None:
            continue
        bn_name = _bn_after(name)
        bn = canon.get(bn_name)
        if bn is None:  # folded away by the exporter: an identity BN carries the conv bias
            canon[bn_name] = {'gamma': None, 'beta': np.asarray(bias, np.float64),
                              'mean': np.zeros_like(bias, np.float64),
                              'var': np.full(bias.shape, 1.0 - BN_EPS), 'eps': BN_EPS}
        else:  # BN(z + b) normalises z with mean - b
            canon[bn_name] = dict(bn, mean=np.asarray(bn['mean'], np.float64) - bias)
    fc = canon['pre_fc1']
    fc_bn = canon['fc1']
    weight = np.asarray(fc['weight'], np.float64)
    fc_bias = np.asarray(fc['bias'], np.float64)
    channels = FILTERS[-1]
    spatial = weight.shape[1] // channels
    side = math.isqrt(spatial)
    if side * side * channels != weight.shape[1]:
        raise UserError(f'pre_fc1: {weight.shape[1]} inputs is not {channels} channels on a '
                        'square feature map')
    # Channel-first flatten (C, H, W) -> Keras flatten of NHWC (H, W, C).
    kernel = weight.reshape(-1, channels, side, side).transpose(2, 3, 1, 0).reshape(
        -1, weight.shape[0])
    gamma = fc_bn.get('gamma')
    if gamma is not None and not np.all(np.asarray(gamma) == 1):
        # Our fc1 has no scale: fold the whole BN into pre_fc1 and leave fc1 neutral.
        factor = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(fc_bn['var'], np.float64)
                                                         + fc_bn['eps'])
        kernel = kernel * factor
        fc_bias = (fc_bias - fc_bn['mean']) * factor + fc_bn['beta']
        n = fc_bias.shape[0]
        canon['fc1'] = {'gamma': None, 'beta': np.zeros(n), 'mean': np.zeros(n),
                        'var': np.full(n, 1.0 - BN_EPS), 'eps': BN_EPS}
    for name, kind, _ in layer_plan(units):
        item = canon[name]
        if kind == 'conv':
            k = np.asarray(item['kernel'], np.float64).transpose(2, 3, 1, 0)
            if name == 'conv0':
                k = k * input_scale
            out[name] = [k.astype(np.float32)]
        elif kind == 'prelu':
            out[name] = [np.asarray(item['slope'], np.float32).reshape(-1)]
        elif kind == 'fc':
            out[name] = [kernel.astype(np.float32), fc_bias.astype(np.float32)]
        else:
            # Keras divides by sqrt(var + 2e-5): shift var so the source's eps is reproduced.
            var = np.asarray(item['var'], np.float64) + item['eps'] - BN_EPS
            arrays = [item['beta'], item['mean'], var]
            if name != 'fc1':
                gamma = item['gamma']
                arrays.insert(0, np.ones_like(var) if gamma is None else gamma)
            out[name] = [np.asarray(a, np.float32) for a in arrays]
    return out


# ---------------------------------------------------------------------------------------------
# MXNet: .params (NDArray list) and -symbol.json, read without MXNet.

ND_LIST_MAGIC = 0x112
ND_V1_MAGIC = 0xF993FAC8
ND_V2_MAGIC = 0xF993FAC9
ND_V3_MAGIC = 0xF993FACA
MX_DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8,
             6: np.int64}


class _Stream:
    """Little-endian reader over the bytes of an MXNet file, with bounds checks."""

    def __init__(self, data, path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n):
        if n < 0 or self.pos + n > len(self.data):
            raise UserError(f'{self.path}: truncated or corrupt MXNet file (wanted {n} bytes at '
                            f'offset {self.pos}, file has {len(self.data)})')
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt):
        return struct.unpack('<' + fmt, self.take(struct.calcsize('<' + fmt)))

    def count(self, what):
        (n,) = self.unpack('Q')
        if n > len(self.data) - self.pos:
            raise UserError(f'{self.path}: corrupt MXNet file ({what} count {n} at offset '
                            f'{self.pos - 8})')
        return n


def _read_ndarray(st, index):
    (magic,) = st.unpack('I')
    if magic in (ND_V2_MAGIC, ND_V3_MAGIC):
        (stype,) = st.unpack('i')
        if stype != 0:
            raise UserError(f'{st.path}: array {index} uses sparse storage type {stype}; only '
                            'dense arrays are supported')
        (ndim,) = st.unpack('i')
        if ndim < 0 or (ndim == 0 and magic == ND_V2_MAGIC):
            return None
        shape = st.unpack(f'{ndim}q')
    elif magic == ND_V1_MAGIC:
        (ndim,) = st.unpack('I')
        if ndim == 0:
            return None
        shape = st.unpack(f'{ndim}q')
    else:  # pre-v1 files: the first word was the number of dimensions, dims are uint32
        ndim = magic
        if ndim > 32:
            raise UserError(f'{st.path}: array {index}: unknown NDArray magic {magic:#x}')
        if ndim == 0:
            return None
        shape = st.unpack(f'{ndim}I')
    if any(d < 0 for d in shape):
        raise UserError(f'{st.path}: array {index}: negative dimension in shape {shape}')
    st.unpack('ii')  # context (dev_type, dev_id): arrays are always read to the CPU
    (flag,) = st.unpack('i')
    if flag not in MX_DTYPES:
        raise UserError(f'{st.path}: array {index}: unsupported dtype flag {flag}')
    dtype = np.dtype(MX_DTYPES[flag]).newbyteorder('<')
    size = int(np.prod(shape, dtype=np.int64))
    raw = st.take(size * dtype.itemsize)
    return np.frombuffer(raw, dtype).reshape(shape).astype(dtype.newbyteorder('='))


def read_mxnet_params(path):
    """Read an MXNet NDArray-list file (.params) into {name: numpy array}, without MXNet."""
    try:
        with open(path, 'rb') as fh:
            data = fh.read()
    except FileNotFoundError:
        raise UserError(f'MXNet params file not found: {path}') from None
    st = _Stream(data, path)
    header, _reserved = st.unpack('QQ')
    if header != ND_LIST_MAGIC:
        raise UserError(f'{path}: not an MXNet NDArray file (header {header:#x}, expected '
                        f'{ND_LIST_MAGIC:#x})')
    arrays = [_read_ndarray(st, i) for i in range(st.count('array'))]
    names = []
    for _ in range(st.count('name')):
        (length,) = st.unpack('Q')
        names.append(st.take(length).decode('utf-8', 'replace'))
    if st.pos != len(data):
        raise UserError(f'{path}: {len(data) - st.pos} unexpected bytes after the name list')
    if len(names) != len(arrays):
        raise UserError(f'{path}: {len(arrays)} arrays but {len(names)} names')
    if len(set(names)) != len(names):
        raise UserError(f'{path}: a parameter name appears twice')
    return dict(zip(names, arrays))


_PASS_OPS = {'Dropout', 'identity', '_copy', 'Flatten', 'flatten', 'Cast', 'BlockGrad'}
_NORM_OPS = {'_minus_scalar', '_plus_scalar', '_mul_scalar', '_div_scalar'}
_MX_OPS = {'conv': 'Convolution', 'bn': 'BatchNorm', 'prelu': 'LeakyReLU', 'fc': 'FullyConnected'}
_TRUE = ('true', '1')


def _tuple_attr(attrs, key, default):
    text = attrs.get(key)
    if text is None:
        return tuple(default)
    return tuple(int(v) for v in re.findall(r'-?\d+', str(text)))


def _read_symbol(path):
    try:
        with open(path, encoding='utf-8') as fh:
            sym = json.load(fh)
    except FileNotFoundError:
        raise UserError(f'MXNet symbol file not found: {path}') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f'{path}: not a JSON symbol file ({err})') from None
    nodes = sym.get('nodes') if isinstance(sym, dict) else None
    if not isinstance(nodes, list):
        raise UserError(f"{path}: no 'nodes' list: not an MXNet symbol file")
    for node in nodes:
        node['attrs'] = node.get('attrs') or node.get('attr') or node.get('param') or {}
    return nodes



def _units_from_names(names, where):
    found = {}
    for name in names:
        m = re.match(r'stage(\d+)_unit(\d+)_', name)
        if m:
            stage, unit = int(m.group(1)), int(m.group(2))
            found[stage] = max(found.get(stage, 0), unit)
    if sorted(found) != [1, 2, 3, 4]:
        raise UserError(f'{where}expected stages 1-4 (stage<s>_unit<u>_ nodes), found '
                        f'{sorted(found) or "none"}: not an InsightFace LResNet-IR')
    return tuple(found[s] for s in (1, 2, 3, 4))


def _norm_scale(a, b, described, where):
    """Scale for conv0 so that our (x - 127.5) / 128 input gives the source's a * x + b."""
    if a == 0 or abs(-b / a - 127.5) > 1e-3:
        raise UserError(f'{where}input normalisation {described} is not (x - 127.5) * s: only a '
                        '127.5 offset can be folded into conv0 exactly')
    return a * 128.0


def _affine_text(a, b):
    return f'(x - {-b / a:g}) / {1 / a:g}'


def _mx_src(nodes, node, i=0):
    """The node feeding data input i of `node` (parameters skipped, pass-through ops crossed)."""
    data_inputs = [e for e in node.get('inputs', [])
                   if nodes[e[0]]['op'] != 'null' or not nodes[e[0]]['name'].startswith(
                       node['name'] + '_')]
    if i >= len(data_inputs):
        return None
    src = nodes[data_inputs[i][0]]
    while src['op'] in _PASS_OPS and src.get('inputs'):
        src = nodes[src['inputs'][0][0]]
    return src


def _mx_src_name(nodes, node, i=0):
    src = _mx_src(nodes, node, i)
    return None if src is None else src['name']


def _mx_check_graph(nodes, units, path):
    """Check the MXNet symbol is an LResNet-IR with `units`; return {layer name: attrs}."""
    by_name = {n['name']: n for n in nodes}
    plan = layer_plan(units)
    planned = {name for name, _, _ in plan}
    if 'fc1' not in by_name:
        raise UserError(f"{path}: no node named 'fc1': not an InsightFace LResNet-IR")
    # Only what feeds fc1 matters: a training head after it (fc7, softmax) is ignored.
    feeding, todo = set(), [nodes.index(by_name['fc1'])]
    while todo:
        idx = todo.pop()
        if idx not in feeding:
            feeding.add(idx)
            todo += [e[0] for e in nodes[idx].get('inputs', [])]
    for node in (nodes[i] for i in sorted(feeding)):
        if node['op'] in _MX_OPS.values() and node['name'] not in planned:
            raise UserError(f"{path}: node '{node['name']}' ({node['op']}) is not part of an "
                            'LResNet-IR: unsupported network')
    attrs = {}
    for name, kind, spec in plan:
        node = by_name.get(name)
        if node is None:
            raise UserError(f"{path}: no node named '{name}': not an InsightFace LResNet-IR")
        if node['op'] != _MX_OPS[kind]:
            raise UserError(f"{path}: node '{name}' is {node['op']}, expected {_MX_OPS[kind]}")
        a = node['attrs']
        if kind == 'prelu' and a.get('act_type') != 'prelu':
            raise UserError(f"{path}: node '{name}' has act_type {a.get('act_type')!r}, "
                            "expected 'prelu'")
        if kind == 'conv':
            k, stride, filters = spec
            got = (_tuple_attr(a, 'kernel', ()), _tuple_attr(a, 'stride', (1, 1)),
                   _tuple_attr(a, 'pad', (0, 0)), int(a.get('num_filter', -1)),
                   int(a.get('num_group', 1)), _tuple_attr(a, 'dilate', (1, 1)))
            want = ((k, k), (stride, stride), (k // 2, k // 2), filters, 1, (1, 1))
            if got != want:
                raise UserError(f"{path}: node '{name}': (kernel, stride, pad, num_filter, "
                                f'num_group, dilate) = {got}, expected {want}')
        if kind == 'fc' and str(a.get('flatten', 'True')).lower() not in _TRUE:
            raise UserError(f"{path}: node '{name}' has flatten=False: unsupported")
        attrs[name] = a

    def expect_src(name, want):
        got = _mx_src_name(nodes, by_name[name])
        if got != want:
            raise UserError(f"{path}: node '{name}' takes its input from '{got}', expected "
                            f"'{want}': not an LResNet-IR graph")

    expect_src('bn0', 'conv0')
    expect_src('relu0', 'bn0')
    unit_in = 'relu0'
    adds = [n for n in nodes if n['op'] in ('elemwise_add', '_Plus', '_plus', 'broadcast_add')]
    for stage, count in enumerate(units, start=1):
        for unit in range(1, count + 1):
            p = f'stage{stage}_unit{unit}'
            expect_src(p + '_bn1', unit_in)
            for name, src in (('_conv1', '_bn1'), ('_bn2', '_conv1'), ('_relu1', '_bn2'),
                              ('_conv2', '_relu1'), ('_bn3', '_conv2')):
                expect_src(p + name, p + src)
            shortcut = unit_in
            if unit == 1:
                expect_src(p + '_conv1sc', unit_in)
                expect_src(p + '_sc', p + '_conv1sc')
                shortcut = p + '_sc'
            out = [n for n in adds if {_mx_src_name(nodes, n, 0), _mx_src_name(nodes, n, 1)}
                   == {p + '_bn3', shortcut}]
            if len(out) != 1:
                raise UserError(f"{path}: unit '{p}': no add of '{p}_bn3' and '{shortcut}'")
            unit_in = out[0]['name']
    expect_src('bn1', unit_in)
    expect_src('pre_fc1', 'bn1')
    expect_src('fc1', 'pre_fc1')
    return attrs


def _mx_input_norm(nodes, path, assume):
    """(a, b, text) of the input normalisation a * x + b found before conv0."""
    by_name = {n['name']: n for n in nodes}
    chain, node = [], by_name['conv0']
    while True:
        data = [e for e in node.get('inputs', []) if nodes[e[0]]['name'] != 'conv0_weight']
        if not data:
            break
        node = nodes[data[0][0]]
        if node['op'] == 'null':
            break
        if node['op'] in _NORM_OPS:
            chain.append(node)
        elif node['op'] not in _PASS_OPS:
            raise UserError(f"{path}: unsupported op '{node['op']}' (node '{node['name']}') "
                            'between the input and conv0')
    a, b = 1.0, 0.0
    for node in reversed(chain):
        s = float(node['attrs'].get('scalar', 'nan'))
        op = node['op']
        if op == '_minus_scalar':
            b -= s
        elif op == '_plus_scalar':
            b += s
        elif op == '_mul_scalar':
            a, b = a * s, b * s
        else:
            a, b = a / s, b / s
    if chain:
        return a, b, f'{_affine_text(a, b)} inside the graph'
    mean, std = assume or (127.5, 128.0)
    return 1 / std, -mean / std, (f'{_affine_text(1 / std, -mean / std)} (not in the graph: '
                                  + ('given by the user)' if assume else 'assumed, InsightFace '
                                     'MXNet convention)'))


def _layer_channels(units):
    """{layer name: (input channels, output channels)} for the LResNet-IR with `units`."""
    chans = {'conv0': (3, FILTERS[0]), 'bn0': (FILTERS[0],) * 2, 'relu0': (FILTERS[0],) * 2}
    cur = FILTERS[0]
    for stage, (count, filters) in enumerate(zip(units, FILTERS), start=1):
        for unit in range(1, count + 1):
            p = f'stage{stage}_unit{unit}'
            chans[p + '_bn1'] = (cur, cur)
            chans[p + '_conv1'] = chans[p + '_conv1sc'] = (cur, filters)
            for suffix in ('_bn2', '_relu1', '_conv2', '_bn3', '_sc'):
                chans[p + suffix] = (filters, filters)
            cur = filters
    chans['bn1'] = (cur, cur)
    chans['pre_fc1'] = (None, 512)
    chans['fc1'] = (512, 512)
    return chans


def _check_canonical(canon, units, where):
    """Shape checks of canonical parameters against the LResNet-IR with `units`."""
    chans = _layer_channels(units)
    for name, kind, spec in layer_plan(units):
        item = canon.get(name)
        if item is None:
            continue  # a BN folded into its conv
        in_ch, out_ch = chans[name]
        if kind == 'conv':
            want = (out_ch, in_ch, spec[0], spec[0])
            if tuple(item['kernel'].shape) != want:
                raise UserError(f"{where}layer '{name}': kernel shape {item['kernel'].shape}, "
                                f'expected {want} (O, I, kh, kw)')
            if item.get('bias') is not None and item['bias'].shape != (out_ch,):
                raise UserError(f"{where}layer '{name}': bias shape {item['bias'].shape}, "
                                f'expected ({out_ch},)')
        elif kind == 'bn':
            for key in ('gamma', 'beta', 'mean', 'var'):
                value = item.get(key)
                if value is not None and value.shape != (out_ch,):
                    raise UserError(f"{where}layer '{name}': {key} shape {value.shape}, "
                                    f'expected ({out_ch},)')
        elif kind == 'prelu':
            slope = np.asarray(item['slope']).reshape(-1)
            if slope.size == 1:
                slope = np.full(out_ch, slope[0])
            if slope.shape != (out_ch,):
                raise UserError(f"{where}layer '{name}': {slope.size} PReLU slopes, expected "
                                f'{out_ch}')
            item['slope'] = slope
        else:
            if item['weight'].ndim != 2 or item['weight'].shape[0] != out_ch:
                raise UserError(f"{where}layer 'pre_fc1': weight shape {item['weight'].shape}, "
                                f'expected ({out_ch}, {FILTERS[-1]} * H * W)')
            if item['bias'].shape != (out_ch,):
                raise UserError(f"{where}layer 'pre_fc1': bias shape {item['bias'].shape}, "
                                f'expected ({out_ch},)')


def _meta(source, backbone, norm_text):
    return {'format': FORMAT_TAG, 'version': 1, 'source': source, 'backbone': backbone,
            'input_norm': norm_text}


def mxnet_to_npy(prefix, epoch=0, backbone=None, assume_norm=None):
    """Convert an MXNet checkpoint (prefix-symbol.json + prefix-EEEE.params) to a weight dict.

    Returns (weights, summary). `assume_norm` = (mean, std) is used only when the graph has no
    normalisation nodes before conv0.
    """
    start = time.perf_counter()
    sym_path, params_path = f'{prefix}-symbol.json', f'{prefix}-{epoch:04d}.params'
    nodes = _read_symbol(sym_path)
    units = _units_from_names([n['name'] for n in nodes], f'{sym_path}: ')
    name = backbone_for_units(units, backbone, f'{sym_path}: ')
    attrs = _mx_check_graph(nodes, units, sym_path)
    a, b, norm_text = _mx_input_norm(nodes, sym_path, assume_norm)
    scale = _norm_scale(a, b, norm_text, f'{sym_path}: ')
    raw = read_mxnet_params(params_path)
    params = {}
    for key, value in raw.items():
        params[key.split(':', 1)[1] if key[:4] in ('arg:', 'aux:') else key] = value
    used = set()

    def get(key):
        if key not in params or params[key] is None:
            raise UserError(f"{params_path}: missing parameter '{key}'")
        used.add(key)
        return np.asarray(params[key], np.float64)

    canon = {}
    for lname, kind, _ in layer_plan(units):
        a_ = attrs[lname]
        if kind == 'conv':
            bias = None
            if str(a_.get('no_bias', 'False')).lower() not in _TRUE:
                bias = get(lname + '_bias')
            canon[lname] = {'kernel': get(lname + '_weight'), 'bias': bias}
        elif kind == 'bn':
            fix_gamma = str(a_.get('fix_gamma', 'True')).lower() in _TRUE
            gamma = None if fix_gamma else get(lname + '_gamma')
            if fix_gamma and lname + '_gamma' in params:
                used.add(lname + '_gamma')  # stored but ignored by MXNet: gamma is 1
            canon[lname] = {'gamma': gamma, 'beta': get(lname + '_beta'),
                            'mean': get(lname + '_moving_mean'),
                            'var': get(lname + '_moving_var'),
                            'eps': float(a_.get('eps', 1e-3))}
        elif kind == 'prelu':
            canon[lname] = {'slope': get(lname + '_gamma')}
        else:
            no_bias = str(a_.get('no_bias', 'False')).lower() in _TRUE
            weight = get(lname + '_weight')
            canon[lname] = {'weight': weight,
                            'bias': np.zeros(weight.shape[0]) if no_bias else get(lname + '_bias')}
    _check_canonical(canon, units, f'{params_path}: ')
    weights = canonical_to_npy(canon, units, scale)
    weights[META_KEY] = _meta('mxnet', name, norm_text)
    summary = {'source': f'MXNet {params_path}', 'backbone': name, 'units': units,
               'layers': len(weights) - 1, 'input_norm': norm_text, 'conv0_scale': scale,
               'folded_bn': 0, 'ignored': sorted(set(params) - used),
               'seconds': time.perf_counter() - start}
    return weights, summary


# ---------------------------------------------------------------------------------------------
# ONNX (InsightFace model zoo: PyTorch iresnet exports, or MXNet models exported to ONNX).

_ONNX_PASS = ('Identity', 'Dropout')


class _OnnxGraph:
    """Producers/consumers and constant values of an ONNX graph, with pass-through ops hidden."""

    def __init__(self, path):
        import onnx
        from onnx import numpy_helper
        self.path = path
        try:
            model = onnx.load(path)
        except FileNotFoundError:
            raise UserError(f'ONNX file not found: {path}') from None
        except Exception as err:  # noqa: BLE001 - protobuf raises several types on bad input
            raise UserError(f'{path}: not a readable ONNX model ({type(err).__name__}: '
                            f'{err})') from None
        graph = model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producer, self.consumers, nodes = {}, {}, []
        for node in graph.node:
            if node.op_type == 'Constant':
                for attr in node.attribute:
                    if attr.name == 'value':
                        self.consts[node.output[0]] = numpy_helper.to_array(attr.t)
                    elif attr.name in ('value_float', 'value_floats', 'value_int', 'value_ints'):
                        self.consts[node.output[0]] = np.asarray(
                            onnx.helper.get_attribute_value(attr))
                continue
            nodes.append(node)
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
        self.inputs = [i.name for i in graph.input if i.name not in self.consts]
        self.outputs = [o.name for o in graph.output]
        self.attr = lambda node: {a.name: onnx.helper.get_attribute_value(a)
                                  for a in node.attribute}
        if len(self.inputs) != 1:
            raise UserError(f'{path}: expected one image input, found {self.inputs}')

    def follow(self, tensor):
        """Consumers of `tensor`, looking through Identity/Dropout."""
        out = []
        for node in self.consumers.get(tensor, []):
            if node.op_type in _ONNX_PASS:
                out += self.follow(node.output[0])
            else:
                out.append(node)
        return out

    def source(self, tensor):
        """The tensor that `tensor` is, once Identity/Dropout are looked through."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in _ONNX_PASS:
            tensor = node.input[0]
            node = self.producer.get(tensor)
        return tensor

    def only(self, tensor, ops, what):
        """The single consumer of `tensor`, which must be one of `ops`."""
        nodes = self.follow(tensor)
        if len(nodes) != 1 or nodes[0].op_type not in ops:
            found = [f'{n.op_type} {n.name!r}' for n in nodes] or ['nothing']
            raise UserError(f'{self.path}: after {what} expected {"/".join(ops)}, found '
                            + ', '.join(found) + ': not an iresnet graph')
        return nodes[0]

    def const(self, node, index, what):
        """Input `index` of `node` as a float64 array (None if absent); it must be constant."""
        name = node.input[index] if index < len(node.input) else ''
        if name == '':
            return None
        if name not in self.consts:
            raise UserError(f'{self.path}: {what} of node {node.name!r} is not a constant')
        return np.asarray(self.consts[name], np.float64)


def _onnx_conv(g, node, k, stride, filters, where):
    a = g.attr(node)
    weight = g.const(node, 1, 'the weight')
    bias = g.const(node, 2, 'the bias')
    got = (tuple(a.get('kernel_shape', weight.shape[2:])), tuple(a.get('strides', (1, 1))),
           tuple(a.get('pads', (0, 0, 0, 0))), int(a.get('group', 1)),
           tuple(a.get('dilations', (1, 1))), weight.shape[0])
    want = ((k, k), (stride, stride), (k // 2,) * 4, 1, (1, 1), filters)
    auto_pad = a.get('auto_pad', b'NOTSET')
    if got != want or auto_pad not in (b'NOTSET', 'NOTSET'):
        raise UserError(f'{g.path}: Conv {node.name!r} ({where}): (kernel, strides, pads, group, '
                        f'dilations, filters) = {got}, expected {want}')
    conv = {'kernel': weight, 'bias': bias}
    out = node.output[0]
    bn = None
    nxt = g.follow(out)
    if len(nxt) == 1 and nxt[0].op_type == 'BatchNormalization':
        bn = _onnx_bn(g, nxt[0])
        out = nxt[0].output[0]
    return conv, bn, out


def _onnx_bn(g, node):
    a = g.attr(node)
    if a.get('training_mode', 0):
        raise UserError(f'{g.path}: BatchNormalization {node.name!r} is in training mode')
    return {'gamma': g.const(node, 1, 'the scale'), 'beta': g.const(node, 2, 'the bias'),
            'mean': g.const(node, 3, 'the mean'), 'var': g.const(node, 4, 'the variance'),
            'eps': float(a.get('epsilon', 1e-5))}


def _onnx_prelu(g, tensor, what):
    node = g.only(tensor, ('PRelu',), what)
    return {'slope': g.const(node, 1, 'the slope')}, node.output[0]


def _onnx_prenorm(g, tensor, assume):
    """Leading scalar Sub/Add/Mul/Div nodes: (a, b, text, tensor after them)."""
    a, b, seen = 1.0, 0.0, 0
    while True:
        nodes = g.follow(tensor)
        if len(nodes) != 1 or nodes[0].op_type not in ('Sub', 'Add', 'Mul', 'Div'):
            break
        node = nodes[0]
        ins = [g.source(i) for i in node.input]
        if ins[0] != tensor or ins[1] not in g.consts:
            raise UserError(f'{g.path}: input normalisation node {node.name!r} '
                            f'({node.op_type}) must take the image first and a constant second')
        c = np.asarray(g.consts[ins[1]], np.float64)
        if c.size == 0 or not np.all(c == c.flat[0]):
            raise UserError(f'{g.path}: node {node.name!r} ({node.op_type}) uses per-channel '
                            'constants: unsupported input normalisation')
        c = float(c.flat[0])
        if node.op_type == 'Sub':
            b -= c
        elif node.op_type == 'Add':
            b += c
        elif node.op_type == 'Mul':
            a, b = a * c, b * c
        else:
            a, b = a / c, b / c
        seen += 1
        tensor = node.output[0]
    if seen:
        return a, b, f'{_affine_text(a, b)} inside the graph', tensor
    mean, std = assume or (127.5, 127.5)
    text = f'{_affine_text(1 / std, -mean / std)} outside the graph (' + (
        'given by the user)' if assume else 'assumed: InsightFace model-zoo convention)')
    return 1 / std, -mean / std, text, tensor


def onnx_to_npy(path, backbone=None, assume_norm=None):
    """Convert an InsightFace iresnet ONNX model to a weight dict; returns (weights, summary).

    `assume_norm` = (mean, std) is used only when the graph does not normalise its input itself
    (default (127.5, 127.5), the model zoo's convention).
    """
    start = time.perf_counter()
    g = _OnnxGraph(path)
    a, b, norm_text, t = _onnx_prenorm(g, g.inputs[0], assume_norm)
    scale = _norm_scale(a, b, norm_text, f'{path}: ')
    canon, folded = {}, 0

    def put_conv(name, conv, bn):
        nonlocal folded
        canon[name] = conv
        if bn is not None:
            canon[_bn_after(name)] = bn
        elif conv['bias'] is not None:
            folded += 1

    conv0 = g.only(t, ('Conv',), 'the input')
    conv, bn, t = _onnx_conv(g, conv0, 3, 1, FILTERS[0], 'conv0')
    put_conv('conv0', conv, bn)
    canon['relu0'], t = _onnx_prelu(g, t, 'conv0')
    units, stage, unit = [], 0, 0
    while True:
        nodes = g.follow(t)
        bns = [n for n in nodes if n.op_type == 'BatchNormalization']
        if len(nodes) == 1 and bns:
            break
        others = [n for n in nodes if n.op_type != 'BatchNormalization']
        if len(nodes) != 2 or len(bns) != 1 or others[0].op_type not in ('Add', 'Conv'):
            found = ', '.join(f'{n.op_type} {n.name!r}' for n in nodes) or 'nothing'
            raise UserError(f'{path}: a residual unit input feeds {found}: expected '
                            'BatchNormalization plus Add or a 1x1 Conv: not an iresnet graph')
        downsample = others[0].op_type == 'Conv'
        if downsample:
            stage, unit = stage + 1, 1
            if stage > 4:
                raise UserError(f'{path}: more than 4 downsampling stages: not an iresnet graph')
            units.append(0)
        elif stage == 0:
            raise UserError(f'{path}: the first residual unit has no downsampling shortcut')
        else:
            unit += 1
        units[-1] += 1
        p, filters = f'stage{stage}_unit{unit}', FILTERS[stage - 1]
        canon[p + '_bn1'] = _onnx_bn(g, bns[0])
        node = g.only(bns[0].output[0], ('Conv',), p + '_bn1')
        conv, bn, x = _onnx_conv(g, node, 3, 1, filters, p + '_conv1')
        put_conv(p + '_conv1', conv, bn)
        canon[p + '_relu1'], x = _onnx_prelu(g, x, p + '_conv1')
        node = g.only(x, ('Conv',), p + '_relu1')
        conv, bn, x = _onnx_conv(g, node, 3, 2 if downsample else 1, filters, p + '_conv2')
        put_conv(p + '_conv2', conv, bn)
        shortcut = t
        if downsample:
            conv, bn, shortcut = _onnx_conv(g, others[0], 1, 2, filters, p + '_conv1sc')
            put_conv(p + '_conv1sc', conv, bn)
        add = g.only(x, ('Add',), p + '_conv2')
        if sorted(g.source(i) for i in add.input) != sorted((g.source(x), g.source(shortcut))):
            raise UserError(f'{path}: Add {add.name!r} does not join {p} with its shortcut')
        t = add.output[0]
    name = backbone_for_units(tuple(units), backbone, f'{path}: ')
    canon['bn1'] = _onnx_bn(g, bns[0])
    node = g.only(bns[0].output[0], ('Flatten', 'Reshape'), 'the last BatchNormalization')
    if node.op_type == 'Flatten' and g.attr(node).get('axis', 1) != 1:
        raise UserError(f'{path}: Flatten {node.name!r} must use axis 1')
    node = g.only(node.output[0], ('Gemm', 'MatMul'), node.op_type)
    if node.op_type == 'Gemm':
        ga = g.attr(node)
        if ga.get('transA', 0):
            raise UserError(f'{path}: Gemm {node.name!r} with transA is unsupported')
        w = g.const(node, 1, 'the weight')
        weight = ga.get('alpha', 1.0) * (w if ga.get('transB', 0) else w.T)
        c = g.const(node, 2, 'the bias')
        c = np.zeros(1) if c is None else c.reshape(-1)
        if c.size not in (1, weight.shape[0]):
            raise UserError(f'{path}: Gemm {node.name!r} bias has {c.size} values')
        bias = np.broadcast_to(ga.get('beta', 1.0) * c, (weight.shape[0],)).astype(np.float64)
        t = node.output[0]
    else:
        weight = g.const(node, 1, 'the weight').T
        node = g.only(node.output[0], ('Add',), 'MatMul')
        const_in = [i for i in node.input if i in g.consts]
        if len(const_in) != 1:
            raise UserError(f'{path}: Add {node.name!r} after MatMul needs a constant bias')
        bias = np.asarray(g.consts[const_in[0]], np.float64).reshape(-1)
        t = node.output[0]
    canon['pre_fc1'] = {'weight': weight, 'bias': bias}
    node = g.only(t, ('BatchNormalization',), 'the fully connected layer')
    canon['fc1'] = _onnx_bn(g, node)
    tail = g.follow(node.output[0])
    if tail:
        raise UserError(f'{path}: unsupported layers after the final BatchNormalization: '
                        + ', '.join(f'{n.op_type} {n.name!r}' for n in tail))
    _check_canonical(canon, tuple(units), f'{path}: ')
    weights = canonical_to_npy(canon, tuple(units), scale)
    weights[META_KEY] = _meta('onnx', name, norm_text)
    summary = {'source': f'ONNX {path}', 'backbone': name, 'units': tuple(units),
               'layers': len(weights) - 1, 'input_norm': norm_text, 'conv0_scale': scale,
               'folded_bn': folded, 'ignored': [], 'seconds': time.perf_counter() - start}
    return weights, summary


def convert_checkpoint(source, output, epoch=0, backbone=None, assume_norm=None):
    """Convert an ONNX file or an MXNet checkpoint prefix into a weight-dict .npy at `output`."""
    start = time.perf_counter()
    if source.lower().endswith('.onnx'):
        weights, summary = onnx_to_npy(source, backbone, assume_norm)
    else:
        prefix = source
        named_epoch = re.search(r'-(\d{4})\.params$', prefix)
        if named_epoch:  # a .params file was given: its name says the epoch
            epoch = int(named_epoch.group(1))
        prefix = re.sub(r'(-\d{4}\.params|-symbol\.json)$', '', prefix)
        weights, summary = mxnet_to_npy(prefix, epoch, backbone, assume_norm)
    write_weight_dict(weights, output)
    summary['output'] = output
    summary['bytes'] = os.path.getsize(output)
    summary['total_seconds'] = time.perf_counter() - start
    return summary


def format_summary(summary):
    """Human-readable lines describing a conversion."""
    lines = [f"source:      {summary['source']}",
             f"backbone:    {summary['backbone']} (units per stage {list(summary['units'])})",
             f"layers:      {summary['layers']} weighted layers mapped"
             + (f", {summary['folded_bn']} conv biases folded into the following BN"
                if summary['folded_bn'] else ''),
             f"input norm:  {summary['input_norm']}; conv0 kernel scaled by "
             f"{summary['conv0_scale']:.8g} to fit our (x - 127.5) / 128"]
    if summary['ignored']:
        lines.append('ignored:     ' + ', '.join(summary['ignored']) + ' (not in the backbone)')
    if 'output' in summary:
        lines.append(f"output:      {summary['output']} ({summary['bytes'] / 2**20:.1f} MiB)")
        lines.append(f"time:        {summary['total_seconds']:.2f} s (reading and mapping "
                     f"{summary['seconds']:.2f} s)")
    return '\n'.join(lines)

