"""Test-set readers: LFW / AgeDB-30 / CFP-FP in face.evoLVe's bcolz or InsightFace's .bin layout,
and one-folder-per-identity retrieval sets, as RGB float32 [0, 1] images of 112x112.

Both layouts come from the internet, so nothing here unpickles unrestricted: the .bin pickle and the
bcolz metadata go through an unpickler that admits bytes, lists and the bool dtype only.
"""
import os
import pickle
import re
import sys

import cv2
import numpy as np
from tqdm import tqdm

from modules.utils import UserError

IMAGE_SIZE = 112
VAL_SETS = ('lfw', 'agedb_30', 'cfp_fp', 'cfp_ff')
# face.evoLVe folder holding each set's bcolz carray and its `<name>_list.npy`.
_BCOLZ_FOLDERS = {'lfw': 'lfw_align_112', 'agedb_30': 'agedb_align_112', 'cfp_fp': 'cfp_align_112',
                  'cfp_ff': 'cfp_align_112'}


class _BoolDtypeToken:
    """Stand-in for the `numpy.dtype('b1')` a pickle rebuilds; its state never reaches numpy."""

    def __setstate__(self, state):
        if not isinstance(state, tuple):
            raise pickle.UnpicklingError('unexpected dtype state')


def _safe_dtype(spec, align=False, copy=False):
    if isinstance(spec, bytes):
        spec = spec.decode('ascii', 'replace')
    if spec not in ('b1', '?'):
        raise pickle.UnpicklingError(f'numpy dtype {spec!r} (only the bool dtype is admitted)')
    return _BoolDtypeToken()


def _safe_scalar(dtype, data=b''):
    if not isinstance(dtype, _BoolDtypeToken):
        raise pickle.UnpicklingError('numpy scalar of a dtype other than bool')
    if isinstance(data, str):  # raw bytes that an old pickle stored as latin1 text
        data = data.encode('latin-1')
    if not isinstance(data, bytes) or len(data) != 1:
        raise pickle.UnpicklingError('malformed numpy bool scalar')
    return data != b'\x00'


def _safe_codecs_encode(text, encoding='utf-8', errors='strict'):
    # Python 3 pickles bytes with protocol < 3 as _codecs.encode(str, 'latin1'); nothing else.
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise pickle.UnpicklingError('_codecs.encode is admitted only for latin1 strings')
    return text.encode('latin-1')


_BIN_GLOBALS = {
    ('numpy.core.multiarray', 'scalar'): _safe_scalar,
    ('numpy._core.multiarray', 'scalar'): _safe_scalar,
    ('numpy', 'dtype'): _safe_dtype,
    ('_codecs', 'encode'): _safe_codecs_encode,
}


class _BinUnpickler(pickle.Unpickler):
    """Unpickler for InsightFace .bin files: admits only bool-scalar and bytes helpers."""

    def __init__(self, fh, path):
        super().__init__(fh, encoding='bytes')
        self._path = path

    def find_class(self, module, name):
        """Return a vetted stand-in for an admitted global; refuse every other global."""
        try:
            return _BIN_GLOBALS[(module, name)]
        except KeyError:
            raise UserError(f'{self._path}: refusing to load global {module}.{name}: a '
                            'verification .bin holds only encoded images and booleans') from None

    def persistent_load(self, pid):
        """Refuse persistent ids: a .bin never uses them."""
        raise UserError(f'{self._path}: refusing a persistent id in the pickle')


def as_bool_array(values, what):
    """Booleans (Python or numpy) to a bool array; anything else is an error."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise UserError(f'{what}: the pair list must be 1-D, got shape {arr.shape}')
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind in 'iu' and np.isin(arr, (0, 1)).all():
        return arr.astype(bool)
    raise UserError(f'{what}: the pair list must hold booleans, got dtype {arr.dtype}')


def _check_counts(n_images, issame, what):
    if len(issame) == 0:
        raise UserError(f'{what}: no pairs')
    if n_images != 2 * len(issame):
        raise UserError(f'{what}: {n_images} images for {len(issame)} pairs; a verification set '
                        'needs exactly two images per pair')


def _read_bcolz(data_dir, list_path):
    import bcolz  # imported here: only the face.evoLVe layout needs it

    if not os.path.isfile(list_path):
        raise UserError(f'{data_dir}: found the image array but not its pair list {list_path}')
    try:
        issame = np.load(list_path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise UserError(f'{list_path}: not a readable boolean .npy array ({err})') from None
    issame = as_bool_array(issame, list_path)
    try:
        carray = bcolz.carray(rootdir=data_dir, mode='r')
    except Exception as err:  # bcolz raises a variety of types for a damaged directory
        raise UserError(f'{data_dir}: not a readable bcolz carray ({err})') from None
    shape, dtype = tuple(carray.shape), np.dtype(carray.dtype)
    if len(shape) != 4 or shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise UserError(f'{data_dir}: images must have shape (2N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), '
                        f'got {shape}')
    if dtype.kind != 'f':
        raise UserError(f'{data_dir}: images must be float (values in [-1, 1]), got {dtype}')
    _check_counts(shape[0], issame, data_dir)
    images = np.empty((shape[0], IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    step = 512  # bounded chunks: the whole set never exists twice in memory
    for start in range(0, shape[0], step):
        block = np.asarray(carray[start:start + step], dtype=np.float32)
        # face.evoLVe stores NCHW BGR in [-1, 1]; our models take NHWC RGB in [0, 1].
        images[start:start + step] = block[:, ::-1].transpose(0, 2, 3, 1) * 0.5 + 0.5
    return images, issame


def _decode_image(buf, index, path):
    """Decode one encoded image to RGB float32 in [0, 1] at 112x112."""
    if isinstance(buf, (bytearray, memoryview)):
        buf = bytes(buf)
    if not isinstance(buf, bytes):
        raise UserError(f'{path}: image {index} is a {type(buf).__name__}, not encoded bytes')
    img = None
    if buf:
        img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise UserError(f'{path}: image {index} cannot be decoded')
    if img.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        img = cv2.resize(img, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
    return img[:, :, ::-1].astype(np.float32) / 255.0


def _read_bin(path):
    try:
        with open(path, 'rb') as fh:
            content = _BinUnpickler(fh, path).load()
    except UserError:
        raise
    except Exception as err:  # a corrupt pickle raises many different types
        raise UserError(f'{path}: not a valid verification .bin ({type(err).__name__}: '
                        f'{err})') from None
    if not (isinstance(content, (tuple, list)) and len(content) == 2):
        raise UserError(f'{path}: expected a pickle of (encoded images, pair booleans)')
    bins, issame = content
    if not isinstance(bins, (list, tuple)):
        raise UserError(f'{path}: the first item must be a list of encoded images')
    issame = as_bool_array(list(issame) if isinstance(issame, (list, tuple)) else issame, path)
    _check_counts(len(bins), issame, path)
    images = np.empty((len(bins), IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    for i, buf in enumerate(tqdm(bins, desc=os.path.basename(path), leave=False)):
        images[i] = _decode_image(buf, i, path)
    return images, issame


def _set_paths(root, name):
    folder = _BCOLZ_FOLDERS.get(name)
    data_dir = os.path.join(root, folder, name) if folder else None
    list_path = os.path.join(root, folder, f'{name}_list.npy') if folder else None
    bin_path = os.path.join(root, f'{name}.bin')
    return data_dir, list_path, bin_path


def _check_name(name):
    # Other InsightFace sets (calfw.bin, cplfw.bin, ...) are read by name when asked for.
    if not (isinstance(name, str) and re.fullmatch(r'[A-Za-z0-9][\w.-]*', name)):
        raise UserError(f'invalid verification set name {name!r}')


def set_present(root, name):
    """True when `root` holds the set `name` in either layout."""
    _check_name(name)
    data_dir, _, bin_path = _set_paths(root, name)
    return bool(data_dir and os.path.isdir(data_dir)) or os.path.isfile(bin_path)


def load_verification_set(root, name):
    """Read one verification set (bcolz or .bin layout) as (RGB [0, 1] images, pair booleans).

    The names of VAL_SETS are looked for in both layouts, any other name as `<root>/<name>.bin`.
    """
    _check_name(name)
    data_dir, list_path, bin_path = _set_paths(root, name)
    # The face.evoLVe layout wins when both are present: it needs no decoding.
    if data_dir and os.path.isdir(data_dir):
        return _read_bcolz(data_dir, list_path)
    if os.path.isfile(bin_path):
        return _read_bin(bin_path)
    raise UserError(_not_found(root, name))


def _not_found(root, name):
    data_dir, list_path, bin_path = _set_paths(root, name)
    if data_dir is None:
        return (f'unknown verification set {name!r} (not one of {", ".join(VAL_SETS)}) and no '
                f'{bin_path}')
    return (f'verification set {name!r} not found under {root}: looked for the bcolz directory '
            f'{data_dir} (with {list_path}) and for {bin_path}')


def select_sets(root, sets=None):
    """The verification sets to evaluate under `root`, checked before any is decoded.

    `sets` None: every set of VAL_SETS present, with one printed line naming those missing (none
    present is a UserError). A list: exactly those, each of which must be present.
    """
    if not os.path.isdir(root):
        raise UserError(f'verification data root not found: {root}')
    if sets:
        sets = list(dict.fromkeys(sets))
        absent = [name for name in sets if not set_present(root, name)]
        if absent:
            found = [name for name in VAL_SETS if set_present(root, name)]
            more = f' ({len(absent) - 1} more asked for and missing)' if len(absent) > 1 else ''
            raise UserError(f'{_not_found(root, absent[0])}{more}; present: '
                            f'{", ".join(found) or "none"}')
        return sets
    present = [name for name in VAL_SETS if set_present(root, name)]
    if not present:
        raise UserError(f'no verification set under {root}: looked for '
                        f'{", ".join(n + ".bin" for n in VAL_SETS)} and their face.evoLVe '
                        'folders (data/make_verification_bin.py makes lfw.bin, cfp_fp.bin and '
                        'cfp_ff.bin from the originals)')
    missing = [name for name in VAL_SETS if name not in present]
    if missing:
        print(f'[*] evaluating {", ".join(present)}; not under {root}: {", ".join(missing)}')
    return present


def get_val_data(root, sets=None):
    """Read the verification sets under `root` (`select_sets`): dict name -> (images, issame)."""
    return {name: load_verification_set(root, name) for name in select_sets(root, sets)}


def load_identity_folders(root, img_ext='jpg'):
    """Read a one-folder-per-identity set: (RGB [0, 1] images, int labels, class names).

    Images at any depth under an identity folder belong to it, symbolic links are followed
    (`modules.folders`); what is left out is counted in one printed line. Folders without any
    `*.<img_ext>` file are skipped; labels index the returned class names (sorted folder names).
    """
    from modules.folders import check_root, scan_identity_folders
    check_root(root, 'identity-folder root')
    scan = scan_identity_folders(root, img_ext)
    suffix = '.' + img_ext.lower().lstrip('.')
    if not scan.identities:
        raise UserError(f'{root}: no identity folder holds any *{suffix} image (at any depth); '
                        f'{scan.skip_line(named=False)}')
    print(scan.skip_line(), file=sys.stderr)
    files = [os.path.join(root, rel) for _, rels in scan.identities for rel in rels]
    labels = np.repeat(np.arange(len(scan.identities)), [len(rels) for _, rels in scan.identities])
    names = [name for name, _ in scan.identities]
    images = np.empty((len(files), IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    for i, path in enumerate(tqdm(files, desc=os.path.basename(root.rstrip(os.sep)),
                                  leave=False)):
        try:
            with open(path, 'rb') as fh:
                buf = fh.read()
        except OSError as err:
            raise UserError(f'{path}: cannot read image ({err.strerror})') from None
        images[i] = _decode_image(buf, i, path)
    return images, np.asarray(labels, np.int64), names
