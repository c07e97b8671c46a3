"""arcface_torch .pth files (torch.save's zip format) written without PyTorch.

The pickle names `torch._utils._rebuild_tensor_v2` and `torch.<Type>Storage` through stand-in
modules that exist only while pickling. `write_pth` stores a state dict of numpy arrays;
`write_raw_pth` declares any storage and tensor geometry it is asked to, whatever bytes it holds.
"""
import collections
import contextlib
import io
import pickle
import sys
import types
import zipfile

import numpy as np

from tests.helpers.iresnet import R18, source_params


class _Storage:
    def __init__(self, array):
        self.array = array


class _Tensor:
    """Pickles as torch does: _rebuild_tensor_v2(storage, offset, size, stride, False, {})."""

    def __init__(self, array):
        self.array = np.ascontiguousarray(array)

    def __reduce__(self):
        a = self.array
        stride = tuple(s // a.itemsize for s in a.strides)
        return (sys.modules['torch._utils']._rebuild_tensor_v2,
                (_Storage(a.reshape(-1)), 0, a.shape, stride, False, collections.OrderedDict()))


@contextlib.contextmanager
def _torch_names():
    """Stand-in `torch` / `torch._utils` modules, so pickle can name their globals."""
    torch, utils = types.ModuleType('torch'), types.ModuleType('torch._utils')

    def _rebuild_tensor_v2(*args):
        raise AssertionError('never called while writing')

    _rebuild_tensor_v2.__module__ = 'torch._utils'
    _rebuild_tensor_v2.__qualname__ = '_rebuild_tensor_v2'
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    for name in ('FloatStorage', 'HalfStorage', 'LongStorage'):
        setattr(torch, name, type(name, (), {'__module__': 'torch'}))
    torch._utils = utils
    saved = {k: sys.modules.get(k) for k in ('torch', 'torch._utils')}
    sys.modules.update({'torch': torch, 'torch._utils': utils})
    try:
        yield torch
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def write_pth(path, state, root='archive', payload=None):
    """A torch.save (zip, pickle protocol 2) file of `state` {key: numpy array}."""
    storages = []
    with _torch_names() as torch:
        storage_type = {np.dtype(np.float32): torch.FloatStorage,
                        np.dtype(np.float16): torch.HalfStorage,
                        np.dtype(np.int64): torch.LongStorage}

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _Storage):
                    storages.append(obj.array)
                    return ('storage', storage_type[obj.array.dtype], str(len(storages) - 1),
                            'cpu', obj.array.size)
                return None

        od = collections.OrderedDict((k, _Tensor(v)) for k, v in state.items())
        if payload is not None:
            od['bn1.weight'] = payload
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(od)
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
        zf.writestr(f'{root}/data.pkl', buf.getvalue())
        zf.writestr(f'{root}/byteorder', 'little')
        for i, array in enumerate(storages):
            zf.writestr(f'{root}/data/{i}', array.astype(array.dtype.newbyteorder('<')).tobytes())
        zf.writestr(f'{root}/version', '3\n')
    return path


def torch_state(params, units, half=()):
    """arcface_torch iresnet state dict of MXNet-named params (BN eps 2e-5 -> torch's 1e-5).

    Keys whose module name contains one of `half` are stored as float16.
    """
    names = {'conv0': 'conv1', 'bn0': 'bn1', 'relu0': 'prelu', 'bn1': 'bn2', 'pre_fc1': 'fc',
             'fc1': 'features'}
    for s, count in enumerate(units, start=1):
        for u in range(1, count + 1):
            for a, b in (('bn1', 'bn1'), ('conv1', 'conv1'), ('bn2', 'bn2'), ('relu1', 'prelu'),
                         ('conv2', 'conv2'), ('bn3', 'bn3'), ('conv1sc', 'downsample.0'),
                         ('sc', 'downsample.1')):
                names[f'stage{s}_unit{u}_{a}'] = f'layer{s}.{u - 1}.{b}'
    suffix = {'weight': 'weight', 'bias': 'bias', 'gamma': 'weight', 'beta': 'bias',
              'moving_mean': 'running_mean', 'moving_var': 'running_var'}
    state = collections.OrderedDict()
    for key, value in params.items():
        layer, _, kind = key.rpartition('_')
        if kind in ('mean', 'var'):
            layer, kind = layer[:-len('_moving')], 'moving_' + kind
        module = names[layer]
        if kind == 'moving_var':
            value = value.astype(np.float64) + 2e-5 - 1e-5
        dtype = np.float16 if any(h in module for h in half) else np.float32
        state[f'{module}.{suffix[kind]}'] = np.asarray(value).astype(dtype)
        if kind == 'moving_var':
            state[f'{module}.num_batches_tracked'] = np.array(1000, np.int64)
    return state


def params_of_state(params, state, units):
    """The MXNet-named parameters the (possibly float16-rounded) state dict really holds."""
    ref = torch_state(params, units)
    out = {}
    for key, (tkey, tvalue) in zip(params, (kv for kv in state.items()
                                                               if 'num_batches' not in kv[0])):
        assert tkey in ref
        tvalue = tvalue.astype(np.float64)
        out[key] = (tvalue - 2e-5 + 1e-5 if key.endswith('_moving_var') else tvalue)
    return {k: v.astype(np.float32) for k, v in out.items()}


def iresnet18_pth(tmp):
    """A random iresnet18 at 112x112 as <tmp>/backbone.pth (convs float16, as fp16-trained files
    are): (the MXNet-named parameters the file really holds, its path)."""
    params = source_params(R18, 7, seed=21, fc1_gamma_random=False)
    state = torch_state(params, R18, half=('conv', 'downsample.0', 'fc'))
    params = params_of_state(params, state, R18)  # what the float16 file holds, exactly
    return params, write_pth(str(tmp / 'backbone.pth'), state, root='backbone')

class RawStorage:
    def __init__(self, dtype, numel):
        self.dtype, self.numel = np.dtype(dtype), numel


class RawTensor:
    """Pickles as _rebuild_tensor_v2(storage, offset, size, stride, ...) with any geometry."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return sys.modules['torch._utils']._rebuild_tensor_v2, self.args


def write_raw_pth(path, tensors, entries):
    """A torch.save zip whose data.pkl declares `tensors` {key: RawTensor}, and whose storage
    entries hold `entries` {storage index: bytes} whatever the storages declare."""
    storages = []
    with _torch_names() as torch:
        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, RawStorage):
                    if obj not in storages:
                        storages.append(obj)
                    return ('storage', torch.FloatStorage, str(storages.index(obj)), 'cpu',
                            obj.numel)
                return None

        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(collections.OrderedDict(tensors))
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
        zf.writestr('archive/data.pkl', buf.getvalue())
        zf.writestr('archive/byteorder', 'little')
        for index, data in entries.items():
            zf.writestr(f'archive/data/{index}', data)
    return path
