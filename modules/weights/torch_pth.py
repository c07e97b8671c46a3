"""PyTorch `torch.save` state dicts of arcface_torch's iresnet (backbone.pth), read without torch.

The zip format (torch >= 1.6): one top folder holding `data.pkl` (the pickled state dict),
`data/<key>` (raw storage bytes) and `byteorder`. In `data.pkl` every tensor is
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` and every
storage a persistent id `('storage', torch.<Type>Storage, key, location, numel)`. The unpickler
below admits exactly those globals plus `collections.OrderedDict`; anything else is refused before
it can run.
"""
import collections
import pickle
import re
import time
import zipfile

import numpy as np

from modules.utils import UserError
from modules.weights.canonical import (
    META_KEY,
    backbone_for_units,
    canonical_to_npy,
    check_canonical,
    layer_plan,
    norm_scale,
    weight_meta,
)

TORCH_BN_EPS = 1e-5  # arcface_torch builds every BatchNorm with eps 1e-5
TORCH_INPUT_NORM = (127.5, 127.5)  # arcface_torch feeds (x - 127.5) / 127.5
_STORAGE_DTYPES = {'FloatStorage': '<f4', 'HalfStorage': '<f2', 'DoubleStorage': '<f8',
                   'BFloat16Storage': '<u2', 'LongStorage': '<i8', 'IntStorage': '<i4',
                   'ByteStorage': '|u1', 'BoolStorage': '|b1'}


class _StorageType:
    """A storage class named in the pickle: only its name is kept, nothing of torch runs."""

    def __init__(self, name):
        self.name = name


_STORAGE_TYPES = {name: _StorageType(name) for name in _STORAGE_DTYPES}


class _Storage:
    """One `data/<key>` entry of the zip, decoded to a flat numpy array on first use."""

    def __init__(self, reader, storage_type, key, numel):
        self.reader, self.type, self.key, self.numel = reader, storage_type, key, numel


class _Tensor:
    """A rebuilt tensor: numpy values plus the storage type it came from."""

    def __init__(self, array, storage_type):
        self.array, self.type = array, storage_type


class _PthReader:
    """Reads one torch.save zip; its unpickler resolves only state-dict globals."""

    def __init__(self, path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise UserError(f'PyTorch file not found: {path}') from None
        except zipfile.BadZipFile:
            with open(path, 'rb') as fh:
                head = fh.read(2)
            legacy = head[:1] == b'\x80'
            raise UserError(f'{path}: ' + (
                'a legacy (torch < 1.6) torch.save file: re-save it with a current torch '
                '(torch.save(torch.load(f), f)) or export ONNX' if legacy
                else 'not a torch.save zip file')) from None
        names = self.zip.namelist()
        pkl = [n for n in names if re.fullmatch(r'[^/]+/data\.pkl', n)]
        if len(pkl) != 1:
            raise UserError(f'{path}: expected one <folder>/data.pkl in the zip, found '
                            f'{pkl or "none"}: not a torch.save file')
        self.root = pkl[0][:-len('data.pkl')]
        order = self.root + 'byteorder'
        if order in names and self.zip.read(order).strip() != b'little':
            raise UserError(f'{path}: big-endian storages are not supported')
        self.cache = {}

    def storage_array(self, storage):
        """The flat array behind a storage (read once, length checked against numel)."""
        if storage.key not in self.cache:
            entry = f'{self.root}data/{storage.key}'
            try:
                raw = self.zip.read(entry)
            except KeyError:
                raise UserError(f'{self.path}: storage {entry} is missing from the zip') from None
            dtype = np.dtype(_STORAGE_DTYPES[storage.type.name])
            if len(raw) != storage.numel * dtype.itemsize:
                raise UserError(f'{self.path}: storage {entry} has {len(raw)} bytes, expected '
                                f'{storage.numel} x {dtype.itemsize}')
            array = np.frombuffer(raw, dtype)
            if storage.type.name == 'BFloat16Storage':  # bfloat16 is the top half of a float32
                array = (array.astype(np.uint32) << 16).view(np.float32)
            self.cache[storage.key] = array
        return self.cache[storage.key]

    def rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None,
                       *_metadata):
        """torch._utils._rebuild_tensor_v2, in numpy: a strided view copied out of the storage."""
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError('_rebuild_tensor_v2 without a storage')
        ints = (offset, *size, *stride)
        if not all(isinstance(v, int) and v >= 0 for v in ints) or len(size) != len(stride):
            raise pickle.UnpicklingError(f'bad tensor geometry offset={offset} size={size} '
                                         f'stride={stride}')
        flat = self.storage_array(storage)
        if any(n == 0 for n in size):
            return _Tensor(np.zeros(size, flat.dtype), storage.type)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.size:
            raise pickle.UnpicklingError(f'tensor reaches element {last} of a storage of '
                                         f'{flat.size}')
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=tuple(size), strides=tuple(s * flat.itemsize for s in stride),
            writeable=False)
        return _Tensor(np.array(view), storage.type)

    def load(self):
        """The unpickled top-level object of data.pkl."""
        reader = self

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) == ('collections', 'OrderedDict'):
                    return collections.OrderedDict
                if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
                    return reader.rebuild_tensor
                if module == 'torch' and name in _STORAGE_TYPES:
                    return _STORAGE_TYPES[name]
                raise pickle.UnpicklingError(f'refused global {module}.{name}')

            def persistent_load(self, pid):
                if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != 'storage'
                        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
                        or not isinstance(pid[4], int) or pid[4] < 0):
                    raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')
                return _Storage(reader, pid[1], pid[2], pid[4])

        with self.zip.open(self.root + 'data.pkl') as fh:
            try:
                return Unpickler(fh, encoding='utf-8').load()
            except pickle.UnpicklingError as err:
                raise UserError(f'{self.path}: refused to load: {err} (only a state dict of '
                                'tensors is admitted)') from None
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - any decoding failure is a bad file
                raise UserError(f'{self.path}: corrupt data.pkl ({type(err).__name__}: '
                                f'{err})') from None


def read_state_dict(path):
    """{key: float64 numpy array} of a torch.save state dict; integer buffers are dropped."""
    reader = _PthReader(path)
    obj = reader.load()
    if not isinstance(obj, dict) or not all(isinstance(v, _Tensor) for v in obj.values()):
        kind = type(obj).__name__
        keys = f' with keys {sorted(map(str, obj))[:6]}' if isinstance(obj, dict) else ''
        raise UserError(f'{path}: expected a state dict (name -> tensor), got a {kind}{keys}: '
                        'save model.state_dict()')
    out = {}
    for key, tensor in obj.items():
        if not isinstance(key, str):
            raise UserError(f'{path}: state dict key {key!r} is not a string')
        if tensor.array.dtype.kind in 'iub':
            if not key.endswith('num_batches_tracked'):
                raise UserError(f"{path}: '{key}' holds integers ({tensor.type.name})")
            continue
        out[key] = tensor.array.astype(np.float64)
    if out and all(k.startswith('module.') for k in out):  # saved from nn.DataParallel
        out = {k[len('module.'):]: v for k, v in out.items()}
    return out


def _units_from_keys(keys, path):
    found = {}
    for key in keys:
        m = re.match(r'layer(\d+)\.(\d+)\.', key)
        if m:
            stage, index = int(m.group(1)), int(m.group(2))
            found.setdefault(stage, set()).add(index)
    if sorted(found) != [1, 2, 3, 4]:
        raise UserError(f'{path}: expected layer1 ... layer4 blocks, found '
                        f'{[f"layer{s}" for s in sorted(found)] or "none"}: not an '
                        'arcface_torch iresnet state dict')
    for stage, indices in found.items():
        if indices != set(range(len(indices))):
            raise UserError(f'{path}: layer{stage} blocks are numbered {sorted(indices)}: '
                            'expected 0, 1, 2, ...')
    return tuple(len(found[s]) for s in (1, 2, 3, 4))


def _torch_names(units):
    """Our layer name -> arcface_torch module name, for every weighted layer."""
    names = {'conv0': 'conv1', 'bn0': 'bn1', 'relu0': 'prelu', 'bn1': 'bn2', 'pre_fc1': 'fc',
             'fc1': 'features'}
    for stage, count in enumerate(units, start=1):
        for unit in range(1, count + 1):
            ours, theirs = f'stage{stage}_unit{unit}_', f'layer{stage}.{unit - 1}.'
            for a, b in (('bn1', 'bn1'), ('conv1', 'conv1'), ('bn2', 'bn2'), ('relu1', 'prelu'),
                         ('conv2', 'conv2'), ('bn3', 'bn3'), ('conv1sc', 'downsample.0'),
                         ('sc', 'downsample.1')):
                names[ours + a] = theirs + b
    return names


def pth_to_npy(path, backbone=None, assume_norm=None):
    """Convert an arcface_torch iresnet state dict (.pth) to a weight dict; (weights, summary).

    `assume_norm` = (mean, std) replaces arcface_torch's (127.5, 127.5) input convention.
    """
    start = time.perf_counter()
    state = read_state_dict(path)
    units = _units_from_keys(state, path)
    name = backbone_for_units(units, backbone, f'{path}: ')
    torch_names = _torch_names(units)
    used = set()

    def get(key, required=True):
        if key not in state:
            if not required:
                return None
            raise UserError(f"{path}: missing tensor '{key}'")
        used.add(key)
        return state[key]

    canon = {}
    for ours, kind, _ in layer_plan(units):
        theirs = torch_names[ours]
        if kind == 'conv':
            canon[ours] = {'kernel': get(theirs + '.weight'), 'bias': get(theirs + '.bias', False)}
        elif kind == 'bn':
            canon[ours] = {'gamma': get(theirs + '.weight'), 'beta': get(theirs + '.bias'),
                           'mean': get(theirs + '.running_mean'),
                           'var': get(theirs + '.running_var'), 'eps': TORCH_BN_EPS}
        elif kind == 'prelu':
            canon[ours] = {'slope': get(theirs + '.weight')}
        else:
            canon[ours] = {'weight': get(theirs + '.weight'), 'bias': get(theirs + '.bias')}
    extra = sorted(set(state) - used)
    if extra:
        raise UserError(f'{path}: tensors that are not part of an iresnet: '
                        + ', '.join(extra[:5]) + (f' and {len(extra) - 5} more'
                                                  if len(extra) > 5 else ''))
    check_canonical(canon, units, f'{path}: ', torch_names)
    mean, std = assume_norm or TORCH_INPUT_NORM
    norm_text = (f'(x - {mean:g}) / {std:g} outside the graph ('
                 + ('given by the user)' if assume_norm else 'arcface_torch convention)'))
    scale = norm_scale(1 / std, -mean / std, norm_text, f'{path}: ')
    weights = canonical_to_npy(canon, units, scale)
    weights[META_KEY] = weight_meta('pth', name, norm_text)
    summary = {'source': f'PyTorch {path}', 'backbone': name, 'units': units,
               'layers': len(weights) - 1, 'input_norm': norm_text, 'conv0_scale': scale,
               'folded_bn': 0, 'ignored': [], 'seconds': time.perf_counter() - start}
    return weights, summary
