"""MXNet checkpoints (-symbol.json and .params) written from the format description
(pre_models/README.md), not by MXNet."""
import json
import struct

import numpy as np

from modules.weights import ND_LIST_MAGIC, ND_V1_MAGIC, ND_V2_MAGIC
from tests.helpers.iresnet import FILTERS

MX_DTYPE_FLAGS = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2,
                  np.dtype(np.uint8): 3, np.dtype(np.int32): 4, np.dtype(np.int64): 6}


def write_mx_params(path, named, legacy_v1=()):
    """NDArray list: u64 0x112, u64 0, u64 n, n arrays, u64 n, n (u64 length, utf-8 name)."""
    out = [struct.pack('<QQQ', ND_LIST_MAGIC, 0, len(named))]
    for name, arr in named.items():
        arr = np.ascontiguousarray(arr)
        if name in legacy_v1:
            out.append(struct.pack('<II', ND_V1_MAGIC, arr.ndim))
        else:
            out.append(struct.pack('<Iii', ND_V2_MAGIC, 0, arr.ndim))
        out.append(struct.pack(f'<{arr.ndim}q', *arr.shape))
        out.append(struct.pack('<iii', 1, 0, MX_DTYPE_FLAGS[arr.dtype]))
        out.append(arr.astype(arr.dtype.newbyteorder('<')).tobytes())
    out.append(struct.pack('<Q', len(named)))
    for name in named:
        raw = name.encode()
        out.append(struct.pack('<Q', len(raw)) + raw)
    with open(path, 'wb') as fh:
        fh.write(b''.join(out))


def write_mx_symbol(path, units, train_head=False):
    """A -symbol.json as InsightFace's fresnet writes it (normalisation, 'E' output block)."""
    nodes = []

    def add(op, name, inputs=(), attrs=None, params=()):
        refs = [[i, 0, 0] for i in inputs]
        for param in params:
            nodes.append({'op': 'null', 'name': f'{name}_{param}', 'inputs': []})
            refs.append([len(nodes) - 1, 0, 0])
        nodes.append({'op': op, 'name': name, 'attrs': attrs or {}, 'inputs': refs})
        return len(nodes) - 1

    def conv(name, x, f, k, s):
        return add('Convolution', name, [x], {'kernel': f'({k}, {k})', 'stride': f'({s}, {s})',
                                              'pad': f'({k // 2}, {k // 2})',
                                              'num_filter': str(f), 'no_bias': 'True'},
                   ['weight'])

    def bn(name, x, fix_gamma='False'):
        return add('BatchNorm', name, [x], {'eps': '2e-05', 'fix_gamma': fix_gamma,
                                            'momentum': '0.9'},
                   ['gamma', 'beta', 'moving_mean', 'moving_var'])

    def prelu(name, x):
        return add('LeakyReLU', name, [x], {'act_type': 'prelu'}, ['gamma'])

    x = add('null', 'data')
    nodes[x].pop('attrs')
    x = add('identity', 'id', [x])
    x = add('_minus_scalar', '_minusscalar0', [x], {'scalar': '127.5'})
    x = add('_mul_scalar', '_mulscalar0', [x], {'scalar': '0.0078125'})
    x = prelu('relu0', bn('bn0', conv('conv0', x, 64, 3, 1)))
    plus = 0
    for s, (count, f) in enumerate(zip(units, FILTERS), start=1):
        for u in range(1, count + 1):
            n = f'stage{s}_unit{u}'
            y = bn(n + '_bn1', x)
            y = prelu(n + '_relu1', bn(n + '_bn2', conv(n + '_conv1', y, f, 3, 1)))
            y = bn(n + '_bn3', conv(n + '_conv2', y, f, 3, 2 if u == 1 else 1))
            short = bn(n + '_sc', conv(n + '_conv1sc', x, f, 1, 2)) if u == 1 else x
            x = add('elemwise_add', f'_plus{plus}', [y, short])
            plus += 1
    x = add('Dropout', 'dropout0', [bn('bn1', x)], {'p': '0.4'})
    x = add('FullyConnected', 'pre_fc1', [x], {'num_hidden': '512'}, ['weight', 'bias'])
    x = bn('fc1', x, fix_gamma='True')
    if train_head:  # a training checkpoint's classifier after the embedding
        x = add('FullyConnected', 'fc7', [x], {'num_hidden': '10', 'no_bias': 'True'}, ['weight'])
        x = add('SoftmaxOutput', 'softmax', [x])
    with open(path, 'w') as fh:
        json.dump({'nodes': nodes, 'arg_nodes': [], 'heads': [[x, 0, 0]],
                   'attrs': {'mxnet_version': ['int', 10300]}}, fh)
