"""iresnet ONNX graphs written from MXNet-layout parameters (no exporter needed), in the styles of
PyTorch's legacy and dynamo exports and of MXNet's, run by onnxruntime as references; and copies
of a graph relabelled with another opset or another declared input.
"""
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.iresnet import SMALL

TORCH_FEED = (1 / 127.5, -1.0)  # arcface_torch's (x - 127.5) / 127.5 on 0..255 pixels


def make_onnx(params, units, side, style, path, eps=None, opset=13):
    """An iresnet ONNX graph from MXNet-layout params.

    style 'pytorch': convs with folded BN (bias), BN eps 1e-5, no normalisation in the graph.
    style 'dynamo': as torch.onnx.export does it today: like 'pytorch', but a static batch of 1,
    Reshape to (1, C*H*W) instead of Flatten, the final BN folded into the Gemm, and the weights in
    an external `<name>.data` file beside the model.
    style 'mxnet': Sub 127.5 / Mul 1/128 first, Conv + BatchNormalization (eps 2e-5), and
    fc1's gamma fixed at 1 (MXNet fix_gamma). The parameters always mean BN with eps 2e-5; the
    BatchNormalization nodes' statistics are re-expressed for their own `eps`.
    """
    eps = eps or (2e-5 if style == 'mxnet' else 1e-5)
    nodes, inits = [], []
    counter = [0]

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(op, inputs, **attrs):
        counter[0] += 1
        out = f'{op.lower()}_{counter[0]}'
        nodes.append(helper.make_node(op, inputs, [out], name=f'{op}_{counter[0]}', **attrs))
        return out

    def bn_node(x, name, gamma=None):
        g = params[name + '_gamma'] if gamma is None else gamma
        # Re-express the MXNet statistics for this eps so both graphs compute the same thing.
        var = params[name + '_moving_var'].astype(np.float64) + 2e-5 - eps
        return node('BatchNormalization', [x, const(name + '.g', g),
                                           const(name + '.b', params[name + '_beta']),
                                           const(name + '.m', params[name + '_moving_mean']),
                                           const(name + '.v', var)], epsilon=eps)

    def conv_bn(x, conv, bn, k, s):
        w = params[conv + '_weight'].astype(np.float64)
        attrs = dict(kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4)
        if style == 'mxnet':
            return bn_node(node('Conv', [x, const(conv + '.w', w)], **attrs), bn)
        factor = params[bn + '_gamma'] / np.sqrt(params[bn + '_moving_var'].astype(np.float64)
                                                 + 2e-5)
        bias = params[bn + '_beta'] - params[bn + '_moving_mean'] * factor
        return node('Conv', [x, const(conv + '.w', w * factor[:, None, None, None]),
                             const(conv + '.bias', bias)], **attrs)

    def prelu(x, name):
        slope = params[name + '_gamma'].reshape(-1, 1, 1)
        return node('PRelu', [x, const(name + '.slope', slope)])

    x = 'input'
    if style == 'mxnet':
        x = node('Mul', [node('Sub', [x, const('mean', 127.5)]), const('scale', 1 / 128)])
    x = prelu(conv_bn(x, 'conv0', 'bn0', 3, 1), 'relu0')
    for s, count in enumerate(units, start=1):
        for u in range(1, count + 1):
            n = f'stage{s}_unit{u}'
            y = bn_node(x, n + '_bn1')
            y = prelu(conv_bn(y, n + '_conv1', n + '_bn2', 3, 1), n + '_relu1')
            y = conv_bn(y, n + '_conv2', n + '_bn3', 3, 2 if u == 1 else 1)
            short = conv_bn(x, n + '_conv1sc', n + '_sc', 1, 2) if u == 1 else x
            x = node('Add', [y, short])
    fc_w = params['pre_fc1_weight'].astype(np.float64)
    fc_b = params['pre_fc1_bias'].astype(np.float64)
    if style == 'dynamo':
        inits.append(numpy_helper.from_array(np.array([1, fc_w.shape[1]], np.int64), 'flat'))
        x = node('Reshape', [bn_node(x, 'bn1'), 'flat'])
        factor = params['fc1_gamma'] / np.sqrt(params['fc1_moving_var'].astype(np.float64) + 2e-5)
        out = node('Gemm', [x, const('fc.w', fc_w * factor[:, None]),
                            const('fc.b', (fc_b - params['fc1_moving_mean']) * factor
                                  + params['fc1_beta'])], transB=1)
    else:
        x = node('Flatten', [bn_node(x, 'bn1')], axis=1)
        x = node('Gemm', [x, const('fc.w', fc_w), const('fc.b', fc_b)], transB=1)
        gamma = np.ones(512) if style == 'mxnet' else None
        out = bn_node(x, 'fc1', gamma)
    nodes.append(helper.make_node('Identity', [out], ['embedding'], name='output'))
    # The feature-map side before the FC gives the input size (33 -> 3, 112 -> 7).
    batch, spatial = (1, {3: SMALL, 7: 112}[side]) if style == 'dynamo' else (None, None)
    graph = helper.make_graph(
        nodes, 'iresnet', [helper.make_tensor_value_info('input', TensorProto.FLOAT,
                                                          [batch, 3, spatial, spatial])],
        [helper.make_tensor_value_info('embedding', TensorProto.FLOAT, [batch, 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    if style == 'dynamo':
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + '.data', size_threshold=1024)
    else:
        onnx.save(model, path)
    return path


def run_onnx(path, x01, style):
    """onnxruntime embedding of RGB [0, 1] NHWC images, fed as the model expects."""
    pixels = np.transpose(x01.astype(np.float64) * 255.0, (0, 3, 1, 2))
    feed = pixels if style == 'mxnet' else (pixels - 127.5) / 127.5
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    return sess.run(None, {'input': feed.astype(np.float32)})[0]


def relabel(src, dst, opset, ir_version=10):
    """Copy an ONNX model (its external data file stays shared) with another default opset."""
    model = onnx.load(src, load_external_data=False)
    model.opset_import[0].version = opset
    model.ir_version = ir_version
    onnx.save(model, dst)
    return dst


def declare_input(src, dst, side=SMALL):
    """A copy of an ONNX model whose input (and output) batch is declared dynamic ('None', what
    arcface_torch's torch2onnx.py writes over a dynamo export, whose Reshape still fixes the batch
    to 1) and whose input is declared side x side."""
    model = onnx.load(src, load_external_data=False)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = 'None'
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_value = side
    onnx.save(model, dst)
    return dst
