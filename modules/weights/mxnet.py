"""MXNet checkpoints (.params NDArray list + -symbol.json), read without MXNet."""
import json
import re
import struct
import time

import numpy as np

from modules.utils import UserError
from modules.weights.canonical import (
    META_KEY,
    affine_text,
    backbone_for_units,
    canonical_to_npy,
    check_canonical,
    layer_plan,
    norm_scale,
    weight_meta,
)

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
    attrs = {name: _mx_layer_attrs(by_name.get(name), name, kind, spec, path)
             for name, kind, spec in plan}
    _mx_check_wiring(nodes, by_name, units, path)
    return attrs


def _mx_layer_attrs(node, name, kind, spec, path):
    """The attrs of the planned layer `name`, checked against what an LResNet-IR has there."""
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
    return a


def _mx_check_wiring(nodes, by_name, units, path):
    """UserError unless every layer takes its input from where an LResNet-IR has it."""
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
        return a, b, f'{affine_text(a, b)} inside the graph'
    mean, std = assume or (127.5, 128.0)
    return 1 / std, -mean / std, (f'{affine_text(1 / std, -mean / std)} (not in the graph: '
                                  + ('given by the user)' if assume else 'assumed, InsightFace '
                                     'MXNet convention)'))



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
    scale = norm_scale(a, b, norm_text, f'{sym_path}: ')
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
    check_canonical(canon, units, f'{params_path}: ')
    weights = canonical_to_npy(canon, units, scale)
    weights[META_KEY] = weight_meta('mxnet', name, norm_text)
    summary = {'source': f'MXNet {params_path}', 'backbone': name, 'units': units,
               'layers': len(weights) - 1, 'input_norm': norm_text, 'conv0_scale': scale,
               'folded_bn': 0, 'ignored': sorted(set(params) - used),
               'seconds': time.perf_counter() - start}
    return weights, summary
