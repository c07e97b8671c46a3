"""PyTorch `torch.save` state dicts of arcface_torch's iresnet (backbone.pth), read without torch.

The zip format (torch >= 1.6): one top folder holding `data.pkl` (the pickled state dict),
`data/<key>` (raw storage bytes) and `byteorder`. In `data.pkl` every tensor is
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` and every
storage a persistent id `('storage', torch.<Type>Storage, key, location, numel)`. The unpickler
below admits exactly those globals plus `collections.OrderedDict`; anything else is refused before
it can run.

Unpickling allocates nothing: a tensor is kept as its declared geometry (offset, size, stride) and
read only once that geometry fits its storage, the storage's numel fits the bytes of its zip entry
and the shape is the one the named iresnet layer needs. So a few-byte file cannot declare its way
to gigabytes.
"""
import collections
import math
import pickle
import re
import time
import zipfile
import zlib

import numpy as np

from modules.utils import UserError
from modules.weights.canonical import (
    META_KEY,
    backbone_for_units,
    canonical_to_npy,
    check_canonical,
    layer_channels,
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
    """A storage named by a persistent id: its zip entry and declared element count."""

    def __init__(self, storage_type, key, numel):
        self.type, self.key, self.numel = storage_type, key, numel
        self.dtype = np.dtype(_STORAGE_DTYPES[storage_type.name])


class _Tensor:
    """A tensor as declared in data.pkl: storage, offset, size, stride; nothing read yet."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.type = storage.type


_ZIP_MAGIC = b'PK\x03\x04'  # a zip archive's first local file header


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
                head = fh.read(4)
                size = fh.seek(0, 2)
            if head[:1] == b'\x80':
                why = ('a legacy (torch < 1.6) torch.save file: re-save it with a current torch '
                       '(torch.save(torch.load(f), f)) or export ONNX')
            elif head == _ZIP_MAGIC:
                why = (f'truncated or damaged: it starts as a torch.save zip file but its zip '
                       f'directory, written last, is missing or broken ({size} bytes); the '
                       'download or copy was probably cut short: fetch or save it again')
            elif size == 0:
                why = 'empty file (0 bytes)'
            else:
                why = 'not a torch.save zip file'
            raise UserError(f'{path}: {why}') from None
        names = self.zip.namelist()
        pkl = [n for n in names if re.fullmatch(r'[^/]+/data\.pkl', n)]
        if len(pkl) != 1:
            raise UserError(f'{path}: expected one <folder>/data.pkl in the zip, found '
                            f'{pkl or "none"}: not a torch.save file')
        self.root = pkl[0][:-len('data.pkl')]
        order = self.root + 'byteorder'
        if order in names and self._read(order).strip() != b'little':
            raise UserError(f'{path}: big-endian storages are not supported')
        self.cache = {}

    def _read(self, entry):
        """The bytes of one zip entry; UserError if the archive is damaged there."""
        try:
            return self.zip.read(entry)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
            raise UserError(f'{self.path}: truncated or damaged: zip entry {entry} cannot be read '
                            f'({err}); fetch or save the file again') from None

    def check_storage(self, storage):
        """The zip entry of a storage; UserError unless it holds exactly numel elements.

        Checked on the zip directory's sizes, before a byte is read or decompressed.
        """
        entry = f'{self.root}data/{storage.key}'
        try:
            info = self.zip.getinfo(entry)
        except KeyError:
            raise UserError(f'{self.path}: storage {entry} is missing from the zip') from None
        if info.file_size != storage.numel * storage.dtype.itemsize:
            raise UserError(f'{self.path}: storage {entry} has {info.file_size} bytes, expected '
                            f'{storage.numel} x {storage.dtype.itemsize}')
        return entry

    def storage_array(self, storage):
        """The flat array behind a storage (read once)."""
        if storage.key not in self.cache:
            raw = self._read(self.check_storage(storage))
            if len(raw) != storage.numel * storage.dtype.itemsize:  # the directory lied
                raise UserError(f'{self.path}: truncated or damaged: storage {storage.key} holds '
                                f'{len(raw)} bytes, its zip directory says otherwise')
            array = np.frombuffer(raw, storage.dtype)
            if storage.type.name == 'BFloat16Storage':  # bfloat16 is the top half of a float32
                array = (array.astype(np.uint32) << 16).view(np.float32)
            self.cache[storage.key] = array
        return self.cache[storage.key]

    def rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, hooks=None,
                       *_metadata):
        """torch._utils._rebuild_tensor_v2, without reading: the declared geometry, checked."""
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError('_rebuild_tensor_v2 without a storage')
        if not (isinstance(size, tuple) and isinstance(stride, tuple)):
            raise pickle.UnpicklingError(f'bad tensor geometry size={size!r} stride={stride!r}')
        ints = (offset, *size, *stride)
        if not all(type(v) is int and v >= 0 for v in ints) or len(size) != len(stride):
            raise pickle.UnpicklingError(f'bad tensor geometry offset={offset} size={size} '
                                         f'stride={stride}')
        count = math.prod(size)
        if count:
            # A tensor may view part of a storage, never more elements than the storage has:
            # that bounds every tensor by bytes really in the file (a stride of 0 cannot
            # stretch 4 bytes into 16384 x 16384).
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if count > storage.numel - offset or last >= storage.numel:
                raise pickle.UnpicklingError(
                    f'a tensor of shape {size} (stride {stride}, offset {offset}) does not fit '
                    f'its storage {storage.key!r} of {storage.numel} elements')
        return _Tensor(storage, offset, size, stride)

    def tensor_array(self, tensor):
        """The numpy values of a declared tensor (a copy out of its storage)."""
        flat = self.storage_array(tensor.storage)
        if not math.prod(tensor.size):
            return np.zeros(tensor.size, flat.dtype)
        view = np.lib.stride_tricks.as_strided(
            flat[tensor.offset:], shape=tensor.size,
            strides=tuple(s * flat.itemsize for s in tensor.stride), writeable=False)
        return np.array(view)

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
                        or type(pid[4]) is not int or pid[4] < 0):
                    raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')
                return _Storage(pid[1], pid[2], pid[4])

        try:
            with self.zip.open(self.root + 'data.pkl') as fh:
                return Unpickler(fh, encoding='utf-8').load()
        except pickle.UnpicklingError as err:
            raise UserError(f'{self.path}: refused to load: {err} (only a state dict of '
                            'tensors is admitted)') from None
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise UserError(f'{self.path}: truncated or damaged: {self.root}data.pkl cannot be '
                            f'read ({err}); fetch or save the file again') from None
        except Exception as err:  # noqa: BLE001 - any decoding failure is a bad file
            raise UserError(f'{self.path}: corrupt data.pkl ({type(err).__name__}: '
                            f'{err})') from None


def _declared_state(path):
    """(reader, {key: declared _Tensor}) of a torch.save state dict, nothing read yet; integer
    buffers (num_batches_tracked) are dropped and a DataParallel 'module.' prefix removed."""
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
        if tensor.storage.dtype.kind in 'iub':
            if not key.endswith('num_batches_tracked'):
                raise UserError(f"{path}: '{key}' holds integers ({tensor.type.name})")
            continue
        reader.check_storage(tensor.storage)
        out[key] = tensor
    _check_storage_use(path, out.values())
    if out and all(k.startswith('module.') for k in out):  # saved from nn.DataParallel
        out = {k[len('module.'):]: v for k, v in out.items()}
    return reader, out


def _check_storage_use(path, tensors):
    """UserError if a storage holds more elements than its tensors reach: a state dict saves each
    parameter in its own storage, and reading more than the (layer-checked) tensors need would
    let a small deflated zip entry expand to any size."""
    reach, numel = {}, {}
    for t in tensors:
        extent = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) + 1
        reach[t.storage.key] = max(reach.get(t.storage.key, 0), extent if math.prod(t.size) else 0)
        numel[t.storage.key] = max(numel.get(t.storage.key, 0), t.storage.numel)
    for key, count in numel.items():
        if count > reach[key]:
            raise UserError(f'{path}: storage data/{key} holds {count} elements, but its tensors use '
                            f'only {reach[key]} (a view into a larger buffer? save a state dict '
                            'of standalone tensors, e.g. {k: v.clone() for k, v in ...})')


def _read_tensor(reader, key, tensor):
    """float64 values of a declared tensor; UserError naming it if any is NaN or infinite."""
    array = reader.tensor_array(tensor).astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        where = np.unravel_index(bad[0], array.shape) if array.ndim else ()
        raise UserError(f"{reader.path}: tensor '{key}' holds {bad.size} NaN or infinite "
                        f'value(s) (the first at index {tuple(map(int, where))}: '
                        f'{array.flat[bad[0]]}): a damaged or diverged model, not converted')
    return array


def read_state_dict(path):
    """{key: float64 numpy array} of a torch.save state dict; integer buffers are dropped."""
    reader, declared = _declared_state(path)
    return {key: _read_tensor(reader, key, tensor) for key, tensor in declared.items()}


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


IRESNET_LAYOUT = ('conv1, bn1, prelu, layer<s>.<i>.{bn1, conv1, bn2, prelu, conv2, bn3, '
                  'downsample.0, downsample.1}, bn2, fc, features')


def _foreign_architecture(declared):
    """What a state dict without an iresnet's PReLUs looks like, in words (None: no guess)."""
    if any(k == 'prelu.weight' or k.endswith('.prelu.weight') for k in declared):
        return None
    blocks = collections.defaultdict(set)
    for key in declared:
        m = re.match(r'layer([1-4])\.(\d+)\.(\w+)\.', key)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
            blocks['modules'].add(m.group(3))
    modules = blocks.pop('modules', set())
    if sorted(blocks) != [1, 2, 3, 4] or not {'conv1', 'bn1', 'conv2', 'bn2'} <= modules:
        return None
    units = [len(blocks[s]) for s in (1, 2, 3, 4)]
    bottleneck = 'conv3' in modules
    depth = (3 if bottleneck else 2) * sum(units) + 2
    fc = declared.get('fc.weight')
    head = (f', a {fc.size[0]}-way fc classifier on {fc.size[1]} features'
            if fc is not None and len(fc.size) == 2 else '')
    block = ('Bottleneck blocks conv1-bn1-conv2-bn2-conv3-bn3' if bottleneck
             else 'BasicBlock blocks conv1-bn1-conv2-bn2')
    return (f'a torchvision-style ResNet-{depth} ({block}, units per stage {units}, ReLU '
            f'without weights{head})')


def _tensor_plan(units, torch_names):
    """(our layer, field, state dict key, expected shape, required) for every tensor of an
    iresnet with `units`; pre_fc1's input width is None (512 * H * W)."""
    chans = layer_channels(units)
    plan = []
    for ours, kind, spec in layer_plan(units):
        theirs, (in_ch, out_ch) = torch_names[ours], chans[ours]
        if kind == 'conv':
            plan += [(ours, 'kernel', theirs + '.weight', (out_ch, in_ch, spec[0], spec[0]), True),
                     (ours, 'bias', theirs + '.bias', (out_ch,), False)]
        elif kind == 'bn':
            plan += [(ours, field, f'{theirs}.{suffix}', (out_ch,), True)
                     for field, suffix in (('gamma', 'weight'), ('beta', 'bias'),
                                           ('mean', 'running_mean'), ('var', 'running_var'))]
        elif kind == 'prelu':
            plan.append((ours, 'slope', theirs + '.weight', (out_ch,), True))
        else:
            plan += [(ours, 'weight', theirs + '.weight', (out_ch, None), True),
                     (ours, 'bias', theirs + '.bias', (out_ch,), True)]
    return plan


def _check_declared_shape(path, key, size, want, ours):
    """UserError unless a declared tensor size fits the shape the named layer needs."""
    if want[-1] is None:  # pre_fc1: (512, 512 * H * W) for a square H x W feature map
        width = size[1] if len(size) == 2 else 0
        side = math.isqrt(width // 512)
        fits = len(size) == 2 and size[0] == want[0] and width and side * side * 512 == width
        want_text = f'({want[0]}, 512 * H * W)'
    else:
        fits = size == want or (key.endswith('prelu.weight') and size == (1,))
        want_text = str(want)
    if not fits:
        raise UserError(f"{path}: layer '{ours}' (source '{key.rpartition('.')[0]}'): tensor "
                        f"'{key}' is declared {size}, expected {want_text}")


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
    reader, declared = _declared_state(path)
    foreign = _foreign_architecture(declared)
    if foreign:
        raise UserError(f'{path}: this looks like {foreign}, not an arcface_torch iresnet: the '
                        'converter reads iresnet18/34/50/100/200 state dicts (BatchNorm before '
                        f'each conv, PReLU; keys {IRESNET_LAYOUT})')
    units = _units_from_keys(declared, path)
    name = backbone_for_units(units, backbone, f'{path}: ')
    torch_names = _torch_names(units)
    plan = _tensor_plan(units, torch_names)
    missing = [key for _, _, key, _, required in plan if required and key not in declared]
    if missing:
        raise UserError(f"{path}: missing tensor '{missing[0]}'"
                        + (f' and {len(missing) - 1} more' if len(missing) > 1 else ''))
    extra = sorted(set(declared) - {key for _, _, key, _, _ in plan})
    if extra:
        raise UserError(f'{path}: tensors that are not part of an iresnet: '
                        + ', '.join(extra[:5]) + (f' and {len(extra) - 5} more'
                                                  if len(extra) > 5 else ''))
    for ours, _, key, want, _ in plan:  # every declared shape, before a single tensor is read
        if key in declared:
            _check_declared_shape(path, key, declared[key].size, want, ours)
    canon = {ours: {'eps': TORCH_BN_EPS} if kind == 'bn' else {}
             for ours, kind, _ in layer_plan(units)}
    for ours, field, key, _, _ in plan:  # only a conv bias may be absent
        canon[ours][field] = _read_tensor(reader, key, declared[key]) if key in declared else None
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
