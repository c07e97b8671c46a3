"""ONNX iresnet models (InsightFace model zoo: PyTorch iresnet exports, or MXNet models exported
to ONNX)."""
import math
import os
import time

import numpy as np

from modules.utils import UserError
from modules.weights.canonical import (
    BN_EPS,
    FILTERS,
    META_KEY,
    affine_text,
    backbone_for_units,
    bn_after,
    canonical_to_npy,
    check_canonical,
    norm_scale,
    weight_meta,
)

_ONNX_PASS = ('Identity', 'Dropout')
# The ops an iresnet graph is made of, and the definitions of each (the opsets that changed it)
# this converter was checked against. Later definitions, up to opset 28 (onnx 1.23), changed only
# the element types an op admits. An op missing here, or a definition not listed (older ones with
# broadcast/spatial attributes, or a future change), is refused by name: the op decides, not the
# opset number.
_CHECKED_OPS = {
    'Conv': (1, 11, 22), 'BatchNormalization': (7, 9, 14, 15), 'PRelu': (6, 7, 9, 16),
    'Gemm': (7, 9, 11, 13), 'MatMul': (1, 9, 13), 'Flatten': (1, 9, 11, 13, 21, 23, 24, 25),
    'Reshape': (5, 13, 14, 19, 21, 23, 24, 25), 'Dropout': (7, 10, 12, 13, 22),
    'Identity': (1, 13, 14, 16, 19, 21, 23, 24, 25),
    'Constant': (1, 9, 11, 12, 13, 19, 21, 23, 24, 25),
    **{op: (7, 13, 14) for op in ('Add', 'Sub', 'Mul', 'Div')},
}
# Bytes per element as ONNX stores them (raw_data), by TensorProto data type: FLOAT, UINT8, INT8,
# UINT16, INT16, INT32, INT64, BOOL, FLOAT16, DOUBLE, UINT32, UINT64, BFLOAT16. Others are not read.
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}


class _OnnxGraph:
    """Producers/consumers and constant values of an ONNX graph, with pass-through ops hidden."""

    def __init__(self, path):
        import onnx
        from onnx import numpy_helper
        self.path = path
        try:
            model = onnx.load(path, load_external_data=False)
        except FileNotFoundError:
            raise UserError(f'ONNX file not found: {path}') from None
        except Exception as err:  # noqa: BLE001 - protobuf raises several types on bad input
            raise UserError(f'{path}: not a readable ONNX model ({type(err).__name__}: '
                            f'{err})') from None
        self.opset = _default_opset(model, path)
        _check_ops(model, self.opset, path)
        _check_tensors(model, path)
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
        for node in nodes:  # a Dropout is looked through only when it cannot be in training mode
            train = node.input[2] if node.op_type == 'Dropout' and len(node.input) > 2 else ''
            if train and (train not in self.consts or np.any(self.consts[train])):
                raise UserError(f'{path}: Dropout {node.name!r} may run in training mode '
                                f'(training_mode input {train!r} is not a constant false)')

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


def _default_opset(model, path):
    """The model's opset of the default ONNX domain; UserError if the onnx package here does not
    describe it."""
    import onnx
    versions = [o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')]
    if not versions:
        raise UserError(f'{path}: no opset of the default ONNX domain: not an ONNX model')
    known = onnx.defs.onnx_opset_version()
    if max(versions) > known:
        raise UserError(f'{path}: opset {max(versions)} is newer than the installed onnx '
                        f'{onnx.__version__} describes (up to {known}): its ops cannot be checked')
    return max(versions)


def _check_ops(model, opset, path):
    """UserError naming the first node whose op (at this opset) the converter was not checked
    against."""
    import onnx
    for node in model.graph.node:
        if node.domain not in ('', 'ai.onnx'):
            raise UserError(f'{path}: node {node.name!r} is {node.domain}.{node.op_type}, not a '
                            'standard ONNX op (an onnxruntime-optimised graph? convert the '
                            'exported one)')
        checked = _CHECKED_OPS.get(node.op_type)
        if checked is None:
            raise UserError(f'{path}: node {node.name!r} is a {node.op_type}, an op this converter '
                            'does not handle (an iresnet graph has only '
                            + ', '.join(sorted(_CHECKED_OPS)) + ')')
        since = onnx.defs.get_schema(node.op_type, opset, '').since_version
        if since not in checked:
            raise UserError(f'{path}: node {node.name!r}: {node.op_type} as defined in opset '
                            f'{since} (the graph declares opset {opset}) is not a definition this '
                            f'converter was checked against (opsets {list(checked)})')
        if node.op_type == 'BatchNormalization':
            spatial = [a.i for a in node.attribute if a.name == 'spatial']
            if spatial and spatial[0] != 1:
                raise UserError(f'{path}: BatchNormalization {node.name!r} has spatial=0 '
                                '(statistics per position): not an iresnet graph')


def _graph_tensors(model):
    """(what, TensorProto) of every initializer and Constant node value."""
    out = [(f'initializer {t.name!r}', t) for t in model.graph.initializer]
    for node in model.graph.node:
        if node.op_type == 'Constant':
            out += [(f'Constant {node.name!r}', a.t) for a in node.attribute if a.name == 'value']
    return out


def _check_tensors(model, path):
    """Every tensor's declared shape against the bytes really there (inline, or in its external
    data file at its offset), before anything is allocated; then external data is loaded."""
    import onnx
    from onnx import external_data_helper
    base = os.path.dirname(os.path.abspath(path))
    external = False
    for what, tensor in _graph_tensors(model):
        dims = list(tensor.dims)
        itemsize = _ITEMSIZE.get(tensor.data_type)
        if itemsize is None:
            raise UserError(f'{path}: {what} has element type '
                            f'{onnx.TensorProto.DataType.Name(tensor.data_type)}, not one an '
                            'iresnet\'s weights use')
        if any(d < 0 for d in dims):
            raise UserError(f'{path}: {what} declares a negative dimension {dims}')
        count = math.prod(dims)
        nbytes = count * itemsize
        declared = f'{what} declares shape {dims} ({nbytes} bytes)'
        if external_data_helper.uses_external_data(tensor):
            external = True
            try:
                info = external_data_helper.ExternalDataInfo(tensor)
            except ValueError as err:  # a negative or non-numeric offset or length
                raise UserError(f'{path}: {what}: bad external data entry ({err})') from None
            where = os.path.join(base, info.location)
            if (os.path.isabs(info.location)
                    or '..' in info.location.replace('\\', '/').split('/')
                    or os.path.commonpath([os.path.realpath(where), os.path.realpath(base)])
                    != os.path.realpath(base)):
                raise UserError(f'{path}: {what} points outside the model\'s folder '
                                f'({info.location!r})')
            if not os.path.isfile(where):
                raise UserError(f'{path}: {what} is stored in {where}, which does not exist '
                                '(keep the .onnx.data file beside the .onnx)')
            size, offset = os.path.getsize(where), info.offset or 0
            length = info.length if info.length is not None else size - offset
            if length != nbytes or offset + nbytes > size:
                raise UserError(f'{path}: {declared}, but its external data is {length} bytes '
                                f'at offset {offset} of {where}, a file of {size} bytes')
        elif tensor.raw_data or nbytes == 0:
            if len(tensor.raw_data) != nbytes:
                raise UserError(f'{path}: {declared} but holds {len(tensor.raw_data)} bytes')
        else:
            field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
            held = len(getattr(tensor, field))
            if held != count:
                raise UserError(f'{path}: {declared} but holds {held} values')
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, base)
        except Exception as err:  # noqa: BLE001 - onnx raises several types on bad data files
            raise UserError(f'{path}: cannot read its external data ({type(err).__name__}: '
                            f'{err})') from None


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
    conv = {'kernel': weight, 'bias': bias, 'node': node.name}
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
            'eps': float(a.get('epsilon', 1e-5)), 'node': node.name}


def _onnx_prelu(g, tensor, what, channels):
    node = g.only(tensor, ('PRelu',), what)
    slope = g.const(node, 1, 'the slope')
    # ONNX broadcasts the slope against (N, C, H, W) from the right: only these shapes mean
    # "one slope per channel"; (C,) would be taken per column and onnxruntime refuses it.
    if slope.size != 1 and slope.shape not in ((channels, 1, 1), (1, channels, 1, 1)):
        raise UserError(f'{g.path}: PRelu {node.name!r} ({what}): slope shape '
                        f'{tuple(slope.shape)} does not broadcast per channel over the '
                        f'(N, {channels}, H, W) input (expected ({channels}, 1, 1)): the graph '
                        'cannot run as an iresnet')
    return {'slope': slope, 'node': node.name}, node.output[0]


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
        return a, b, f'{affine_text(a, b)} inside the graph', tensor
    mean, std = assume or (127.5, 127.5)
    text = f'{affine_text(1 / std, -mean / std)} outside the graph (' + (
        'given by the user)' if assume else 'assumed: InsightFace model-zoo convention)')
    return 1 / std, -mean / std, text, tensor


def _check_flatten(g, node, weight):
    """A Flatten on axis 1, or a Reshape to (batch, C*H*W) with a constant target shape; returns
    the batch size a Reshape fixes (None: any)."""
    if node.op_type == 'Flatten':
        if g.attr(node).get('axis', 1) != 1:
            raise UserError(f'{g.path}: Flatten {node.name!r} must use axis 1')
        return None
    target = g.const(node, 1, 'the target shape')
    features = weight.shape[1]
    zero_is_zero = g.attr(node).get('allowzero', 0)  # opset 14: 0 means 0, not "copy the input"
    if (target.shape != (2,) or target[1] not in (-1, features)
            or (target[0] < 1 and target[0] not in ((-1,) if zero_is_zero else (0, -1)))):
        raise UserError(f'{g.path}: Reshape {node.name!r} to {target.astype(int).tolist()} is not '
                        f'a flatten to (batch, {features}) before the fully connected layer')
    return int(target[0]) if target[0] > 0 else None


class _Collected:
    """Canonical layers gathered from a graph, and how many conv biases had no BN to fold."""

    def __init__(self):
        self.canon, self.folded = {}, 0

    def conv(self, name, conv, bn):
        """Keep a convolution and the BatchNorm after it (None: a bias folded in)."""
        self.canon[name] = conv
        if bn is not None:
            self.canon[bn_after(name)] = bn
        elif conv['bias'] is not None:
            self.folded += 1


def onnx_to_npy(path, backbone=None, assume_norm=None):
    """Convert an InsightFace iresnet ONNX model to a weight dict; returns (weights, summary).

    `assume_norm` = (mean, std) is used only when the graph does not normalise its input itself
    (default (127.5, 127.5), the model zoo's convention).
    """
    start = time.perf_counter()
    g = _OnnxGraph(path)
    a, b, norm_text, t = _onnx_prenorm(g, g.inputs[0], assume_norm)
    in_graph = t != g.inputs[0]
    scale = norm_scale(a, b, norm_text, f'{path}: ')
    col = _Collected()
    conv0 = g.only(t, ('Conv',), 'the input')
    conv, bn, t = _onnx_conv(g, conv0, 3, 1, FILTERS[0], 'conv0')
    col.conv('conv0', conv, bn)
    col.canon['relu0'], t = _onnx_prelu(g, t, 'conv0', FILTERS[0])
    units, last_bn = _onnx_units(g, t, col, path)
    name = backbone_for_units(tuple(units), backbone, f'{path}: ')
    col.canon['bn1'] = _onnx_bn(g, last_bn)
    fixed_batch = _onnx_head(g, last_bn, col.canon, path)
    canon = col.canon
    sources = {k: v.pop('node') for k, v in canon.items() if 'node' in v}
    check_canonical(canon, tuple(units), f'{path}: ', sources)
    weights = canonical_to_npy(canon, tuple(units), scale)
    weights[META_KEY] = weight_meta('onnx', name, norm_text)
    summary = {'source': f'ONNX {path}', 'backbone': name, 'units': tuple(units),
               'layers': len(weights) - 1, 'input_norm': norm_text, 'conv0_scale': scale,
               'folded_bn': col.folded, 'ignored': [], 'opset': g.opset,
               'fixed_batch': fixed_batch, 'feed': None if in_graph else (a, b),
               'seconds': time.perf_counter() - start}
    return weights, summary


def _onnx_units(g, t, col, path):
    """Walk the residual units from tensor `t`: (units per stage, the final BatchNormalization)."""
    units, stage, unit = [], 0, 0
    while True:
        nodes = g.follow(t)
        bns = [n for n in nodes if n.op_type == 'BatchNormalization']
        if len(nodes) == 1 and bns:
            return units, bns[0]
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
        t = _onnx_unit(g, t, bns[0], others[0] if downsample else None, stage, unit, col, path)


def _onnx_unit(g, t, bn1, shortcut_conv, stage, unit, col, path):
    """One residual unit whose input is `t`; returns its output tensor."""
    p, filters = f'stage{stage}_unit{unit}', FILTERS[stage - 1]
    col.canon[p + '_bn1'] = _onnx_bn(g, bn1)
    node = g.only(bn1.output[0], ('Conv',), p + '_bn1')
    conv, bn, x = _onnx_conv(g, node, 3, 1, filters, p + '_conv1')
    col.conv(p + '_conv1', conv, bn)
    col.canon[p + '_relu1'], x = _onnx_prelu(g, x, p + '_conv1', filters)
    node = g.only(x, ('Conv',), p + '_relu1')
    conv, bn, x = _onnx_conv(g, node, 3, 1 if shortcut_conv is None else 2, filters, p + '_conv2')
    col.conv(p + '_conv2', conv, bn)
    shortcut = t
    if shortcut_conv is not None:
        conv, bn, shortcut = _onnx_conv(g, shortcut_conv, 1, 2, filters, p + '_conv1sc')
        col.conv(p + '_conv1sc', conv, bn)
    add = g.only(x, ('Add',), p + '_conv2')
    if sorted(g.source(i) for i in add.input) != sorted((g.source(x), g.source(shortcut))):
        raise UserError(f'{path}: Add {add.name!r} does not join {p} with its shortcut')
    return add.output[0]


def _onnx_head(g, last_bn, canon, path):
    """Flatten, the fully connected layer and its BatchNorm into `canon`; returns fixed_batch."""
    flatten = g.only(last_bn.output[0], ('Flatten', 'Reshape'), 'the last BatchNormalization')
    node = g.only(flatten.output[0], ('Gemm', 'MatMul'), flatten.op_type)
    fc_node = node.name
    weight, bias, t = (_onnx_gemm(g, node, path) if node.op_type == 'Gemm' else
                       _onnx_matmul_add(g, node, path))
    fixed_batch = _check_flatten(g, flatten, weight)
    canon['pre_fc1'] = {'weight': weight, 'bias': bias, 'node': fc_node}
    tail = g.follow(t)
    if tail and tail[0].op_type == 'BatchNormalization':
        node = g.only(t, ('BatchNormalization',), 'the fully connected layer')
        canon['fc1'] = _onnx_bn(g, node)
        tail = g.follow(node.output[0])
        what = 'the final BatchNormalization'
    else:  # the exporter folded the features BatchNorm1d into the Gemm: fc1 is an identity
        n = weight.shape[0]
        canon['fc1'] = {'gamma': None, 'beta': np.zeros(n), 'mean': np.zeros(n),
                        'var': np.full(n, 1.0 - BN_EPS), 'eps': BN_EPS}
        what = 'the fully connected layer (its BatchNormalization folded in)'
    if tail:
        raise UserError(f'{path}: unsupported layers after {what}: '
                        + ', '.join(f'{n.op_type} {n.name!r}' for n in tail))
    return fixed_batch


def _onnx_gemm(g, node, path):
    """(weight (out, in), bias, output tensor) of a Gemm fully connected layer."""
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
    return weight, bias, node.output[0]


def _onnx_matmul_add(g, node, path):
    """(weight (out, in), bias, output tensor) of a MatMul + Add fully connected layer."""
    weight = g.const(node, 1, 'the weight').T
    node = g.only(node.output[0], ('Add',), 'MatMul')
    const_in = [i for i in node.input if i in g.consts]
    if len(const_in) != 1:
        raise UserError(f'{path}: Add {node.name!r} after MatMul needs a constant bias')
    bias = np.asarray(g.consts[const_in[0]], np.float64).reshape(-1)
    return weight, bias, node.output[0]
