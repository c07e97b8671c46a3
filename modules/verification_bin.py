"""Verification sets from the datasets' originals: LFW View 2 and CFP (FP, FF) to InsightFace's .bin.

The published protocols name photos, not aligned crops: LFW's `pairs.txt` (a header "folds n",
then per fold n same pairs "name i j" and n different pairs "name1 i name2 j", photos
`<images>/<name>/<name>_<iiii>.jpg`), CFP's `Protocol/Split/FP|FF/01..10/{same,diff}.txt` ("i,j":
a frontal index, then a profile (FP) or frontal (FF) index) with `Protocol/Pair_list_{F,P}.txt`
("k ../Data/Images/NNN/frontal/NN.jpg"). Each photo is aligned once to the 112x112 ArcFace crop,
by the project's MTCNN path (`modules.align`) or by five given points, and the crops are pickled
as (2N JPEG byte strings, N booleans) in the file order of the protocol: fold after fold, so the
evaluator's ten contiguous folds are the protocol's folds.

A photo where no face is found gets the fallback crop, never dropped (a drop would shift every
later pair): the face is taken to be where the dataset's photos usually hold it (its expected
box) and that box is mapped like a detected one (`modules.align.box_crop`).
"""
import collections
import csv
import dataclasses
import os
import pickle
import re
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from modules.utils import UserError, atomic_output

PROTOCOLS = ('lfw', 'cfp_fp', 'cfp_ff')
# Expected face box (centre x, centre y, width, height as fractions of the photo) for the fallback.
# LFW: its photos are the Viola-Jones box enlarged 2.2 times and scaled to 250x250, so the face
# box is the central 1/2.2 of each side (LFW's own description; no LFW copy was at hand to measure
# MTCNN's box). CFP: the median MTCNN box on its photos (249 frontal: 0.715 x 0.862 at (0.498,
# 0.450); 90 profile: 0.717 x 0.851 at (0.513, 0.450)): its photos are loose face crops.
EXPECTED_BOX = {'lfw': (0.5, 0.5, 1 / 2.2, 1 / 2.2), 'cfp': (0.5, 0.45, 0.715, 0.86)}
HOW = ('landmarks', 'cropped', 'detected', 'padded', 'fallback')


@dataclasses.dataclass
class PairList:
    """A protocol read from its files: `paths` (2N photo paths), `issame` (N booleans),
    `fold_sizes` (pairs per fold, in order), `where` (file:line of each pair, for messages)."""

    paths: list
    issame: list
    fold_sizes: list
    where: list


# ---------------------------------------------------------------------------------------------
# Protocol files
def _lines(path):
    """(line number, stripped text) of the non-empty lines of a text file; UserError if missing."""
    try:
        with open(path, encoding='utf-8', errors='replace') as fh:
            return [(n, line.strip()) for n, line in enumerate(fh, 1) if line.strip()]
    except FileNotFoundError:
        raise UserError(f'{path}: protocol file not found') from None
    except IsADirectoryError:
        raise UserError(f'{path}: is a folder, expected a protocol file') from None


def _int(text, where):
    try:
        return int(text)
    except ValueError:
        raise UserError(f'{where}: expected a number, got {text!r}') from None


def read_lfw_pairs(pairs_path, images_dir):
    """LFW's pairs.txt (View 2 "10 300", or a View 1 file with one count) as a PairList."""
    lines = _lines(pairs_path)
    if not lines:
        raise UserError(f'{pairs_path}: empty pairs file')
    n, header = lines[0]
    fields = header.split()
    if len(fields) == 1:
        folds, per_class = 1, _int(fields[0], f'{pairs_path}:{n}')
    elif len(fields) == 2:
        folds, per_class = (_int(f, f'{pairs_path}:{n}') for f in fields)
    else:
        raise UserError(f'{pairs_path}:{n}: expected the header "<folds> <pairs per class>" '
                        f'(View 2: "10 300"), got {header!r}')
    body = lines[1:]
    if folds < 1 or per_class < 1 or len(body) != 2 * folds * per_class:
        raise UserError(f'{pairs_path}: the header announces {folds} folds of {per_class} same + '
                        f'{per_class} different pairs ({2 * folds * per_class} lines), the file '
                        f'has {len(body)} pair lines')

    def photo(name, number, where):
        return os.path.join(images_dir, name, f'{name}_{_int(number, where):04d}.jpg')

    pairs = PairList([], [], [2 * per_class] * folds, [])
    for i, (n, text) in enumerate(body):
        where = f'{pairs_path}:{n}'
        same = (i % (2 * per_class)) < per_class
        fields = text.split()
        if same and len(fields) == 3:
            pairs.paths += [photo(fields[0], fields[1], where), photo(fields[0], fields[2], where)]
        elif not same and len(fields) == 4:
            pairs.paths += [photo(fields[0], fields[1], where), photo(fields[2], fields[3], where)]
        else:
            expected = '"name i j" (same person)' if same else '"name1 i name2 j" (different)'
            raise UserError(f'{where}: expected {expected} at this place of fold '
                            f'{i // (2 * per_class) + 1}, got {text!r}')
        pairs.issame.append(same)
        pairs.where.append(where)
    return pairs


def _cfp_list(path, root):
    """{index: photo path} of a CFP Pair_list_F/P.txt ("k ../Data/Images/...", relative to
    Protocol/)."""
    photos = {}
    for n, text in _lines(path):
        fields = text.split(None, 1)
        if len(fields) != 2:
            raise UserError(f'{path}:{n}: expected "<index> <image path>", got {text!r}')
        photos[_int(fields[0], f'{path}:{n}')] = os.path.normpath(
            os.path.join(root, 'Protocol', fields[1].strip()))
    if not photos:
        raise UserError(f'{path}: empty pair list')
    return photos


def read_cfp_pairs(root, protocol):
    """CFP's Protocol/Split/<FP|FF>/01..NN/{same,diff}.txt with its pair lists as a PairList."""
    split = os.path.join(root, 'Protocol', 'Split', protocol[-2:].upper())
    frontal = _cfp_list(os.path.join(root, 'Protocol', 'Pair_list_F.txt'), root)
    second = frontal if protocol == 'cfp_ff' else _cfp_list(
        os.path.join(root, 'Protocol', 'Pair_list_P.txt'), root)
    if not os.path.isdir(split):
        raise UserError(f'{split}: CFP split folder not found (expected {root}/Protocol/Split/'
                        'FP|FF/01..10/{same,diff}.txt)')
    folds = sorted(name for name in os.listdir(split) if re.fullmatch(r'\d+', name))
    if not folds:
        raise UserError(f'{split}: no fold folders 01..10')
    pairs = PairList([], [], [], [])
    for fold in folds:
        size = 0
        for kind in ('same', 'diff'):
            path = os.path.join(split, fold, f'{kind}.txt')
            for n, text in _lines(path):
                where = f'{path}:{n}'
                fields = text.replace(',', ' ').split()
                if len(fields) != 2:
                    raise UserError(f'{where}: expected "i,j", got {text!r}')
                i, j = (_int(f, where) for f in fields)
                if i not in frontal:
                    raise UserError(f'{where}: frontal index {i} is not in Pair_list_F.txt')
                if j not in second:
                    which = 'F' if protocol == 'cfp_ff' else 'P'
                    raise UserError(f'{where}: index {j} is not in Pair_list_{which}.txt')
                pairs.paths += [frontal[i], second[j]]
                pairs.issame.append(kind == 'same')
                pairs.where.append(where)
                size += 1
        pairs.fold_sizes.append(size)
    return pairs


def select_folds(pairs, folds, what):
    """The PairList of only the protocol's folds numbered in `folds` (1-based, file order kept)."""
    bad = [k for k in folds if not 1 <= k <= len(pairs.fold_sizes)]
    if bad:
        raise UserError(f'--folds {bad[0]}: {what} has folds 1..{len(pairs.fold_sizes)}')
    folds = sorted(set(folds))
    starts = np.concatenate([[0], np.cumsum(pairs.fold_sizes)])
    keep = [i for k in folds for i in range(starts[k - 1], starts[k])]
    return PairList([p for i in keep for p in pairs.paths[2 * i:2 * i + 2]],
                    [pairs.issame[i] for i in keep], [pairs.fold_sizes[k - 1] for k in folds],
                    [pairs.where[i] for i in keep])


def check_folds(pairs, what):
    """UserError unless every fold has the same number of pairs (the evaluator's ten folds are
    contiguous and equal); a note when the protocol has another number of folds than ten."""
    if len(set(pairs.fold_sizes)) > 1:
        raise UserError(f'{what}: folds of different sizes {pairs.fold_sizes}: the 10-fold '
                        'evaluation splits the pairs into equal contiguous folds')
    if not pairs.issame:
        raise UserError(f'{what}: no pairs')
    if len(pairs.fold_sizes) != 10:
        print(f'[*] note: {what} has {len(pairs.fold_sizes)} folds; the evaluation always uses 10 '
              'equal contiguous folds of the pairs')


# ---------------------------------------------------------------------------------------------
# Landmarks file
def read_landmarks(path, base):
    """{normalised photo path: (5, 2) float32} from a text file of lines
    `<photo path> x1 y1 ... x5 y5 [score]` (path relative to `base`, points in ArcFace order:
    left eye, right eye, nose, left and right mouth corner, image left/right)."""
    points = {}
    for n, text in _lines(path):
        if text.startswith('#'):
            continue
        fields = text.split()
        if len(fields) not in (11, 12):
            raise UserError(f'{path}:{n}: expected "<photo> x1 y1 x2 y2 x3 y3 x4 y4 x5 y5" '
                            f'(an 11th number, a score, is ignored), got {len(fields)} fields')
        try:
            values = np.array([float(v) for v in fields[1:11]], np.float32).reshape(5, 2)
        except ValueError:
            raise UserError(f'{path}:{n}: the ten coordinates must be numbers') from None
        if not np.isfinite(values).all():
            raise UserError(f'{path}:{n}: the coordinates must be finite')
        points[os.path.normpath(os.path.join(base, fields[0]))] = values
    if not points:
        raise UserError(f'{path}: no landmark lines')
    return points


# ---------------------------------------------------------------------------------------------
# Alignment of one photo (runs in worker processes)
def pack_photo(path, landmarks=None, pad=0.25, fallback_box=None, fail=False, jpeg_quality=95,
               cropped=False):
    """(JPEG bytes of the 112x112 crop, how it was found: one of HOW), or ('error', message).
    `cropped`: the photo is the face box (align_faces.py --cropped's crop)."""
    import cv2

    from modules.align import (
        FaceError,
        align_face,
        box_crop,
        find_face,
        read_photo,
        refine_landmarks,
        smallest_face,
    )
    try:
        image = read_photo(path)
        if cropped:
            crop, how = box_crop(image), 'cropped'
        elif landmarks is not None:
            crop, how = align_face(image, landmarks), 'landmarks'
        else:
            face = find_face(image, pad)
            if face is not None:
                crop = align_face(image, refine_landmarks(image, face['landmarks']))
                how = 'padded' if face['padded'] else 'detected'
            elif fail:
                return 'error', (f'{path}: no face found (faces under '
                                 f'{smallest_face(image.shape):.0f} px are not searched, nor '
                                 f'inside a {pad:g} border) and --fail is set')
            else:
                h, w = image.shape[:2]
                cx, cy, bw, bh = fallback_box
                box = ((cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h)
                crop, how = box_crop(image, box), 'fallback'
    except FaceError as err:
        return 'error', str(err)
    except UserError as err:  # e.g. degenerate landmarks
        return 'error', f'{path}: {err}'
    ok, buf = cv2.imencode('.jpg', crop[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    if not ok:
        return 'error', f'{path}: cannot encode the aligned crop as JPEG'
    return buf.tobytes(), how


def _pack_job(args):
    try:
        return pack_photo(*args)
    except Exception as err:  # reported with the photo's name, as a one-line error
        return 'error', f'{args[0]}: {type(err).__name__}: {err}'


# ---------------------------------------------------------------------------------------------
def read_protocol(protocol, images=None, pairs=None, root=None):
    """The PairList of a protocol, its expected-box key and a name for messages."""
    if protocol not in PROTOCOLS:
        raise UserError(f'unknown protocol {protocol!r}; expected one of {", ".join(PROTOCOLS)}')
    if protocol == 'lfw':
        if not images or not pairs:
            raise UserError('--protocol lfw needs --images (the folder of <name>/<name>_NNNN.jpg) '
                            'and --pairs (pairs.txt)')
        if not os.path.isdir(images):
            raise UserError(f'{images}: LFW image folder not found')
        return read_lfw_pairs(pairs, images), 'lfw', pairs
    if not root:
        raise UserError(f'--protocol {protocol} needs --root (the CFP folder holding Protocol/ '
                        'and Data/)')
    if not os.path.isdir(root):
        raise UserError(f'{root}: CFP folder not found')
    return read_cfp_pairs(root, protocol), 'cfp', os.path.join(root, 'Protocol', 'Split',
                                                               protocol[-2:].upper())


def check_photos(pairs, what):
    """UserError naming the first missing photo (with its pair's file:line) and how many more."""
    missing, first = set(), None
    for k, path in enumerate(pairs.paths):
        if path not in missing and not os.path.isfile(path):
            missing.add(path)
            first = first or (path, pairs.where[k // 2])
    if missing:
        more = f' ({len(missing) - 1} more photos missing)' if len(missing) > 1 else ''
        raise UserError(f'{first[0]}: photo not found (pair at {first[1]}){more}; nothing written')


@dataclasses.dataclass
class PackReport:
    """What make_verification_bin did: pairs, photos, how each was aligned, time, output."""

    pairs: int
    photos: int
    how: dict
    seconds: float
    output: str
    report: str
    rows: list = dataclasses.field(default_factory=list)

    def line(self):
        """One printable summary line."""
        how = ', '.join(f'{self.how.get(k, 0)} {k}' for k in HOW if self.how.get(k, 0))
        return (f'{self.pairs} pairs ({self.photos} photos: {how}) in {self.seconds:.0f} s; '
                f'wrote {self.output}')


def make_verification_bin(protocol, output_dir, images=None, pairs_path=None, root=None,
                          landmarks_path=None, pad=0.25, fail=False, workers=1, jpeg_quality=95,
                          progress=True, folds=None, cropped=False):
    """Align every photo of a protocol and write `<output_dir>/<protocol>.bin` (atomically) and
    `<protocol>_report.csv` (each photo not found by plain detection, and how it was aligned).
    `folds`: only these protocol folds (1-based); `cropped`: every photo is its face box."""
    from tqdm import tqdm
    started = time.perf_counter()
    pairs, box_key, what = read_protocol(protocol, images, pairs_path, root)
    if folds:
        pairs = select_folds(pairs, folds, what)
    check_folds(pairs, what)
    check_photos(pairs, what)
    unique = list(dict.fromkeys(pairs.paths))
    points = None
    if landmarks_path:
        points = read_landmarks(landmarks_path, images if protocol == 'lfw' else root)
        absent = [p for p in unique if os.path.normpath(p) not in points]
        if absent:
            raise UserError(f'{landmarks_path}: no landmarks for {absent[0]}'
                            + (f' ({len(absent) - 1} more photos without)' if len(absent) > 1
                               else '') + '; nothing written')
    args = [(path, None if points is None else points[os.path.normpath(path)], pad,
             EXPECTED_BOX[box_key], fail, jpeg_quality, cropped) for path in unique]
    crops, how, rows = {}, collections.Counter(), []
    pool = None
    detects = points is None and not cropped  # MTCNN runs only when it has to find the faces
    if workers > 1 and detects and len(args) > 1:
        from modules.align import process_pool
        pool = process_pool(workers)
    elif detects:
        from modules.utils import quiet_tensorflow
        quiet_tensorflow()  # MTCNN runs in this process: TensorFlow without its start-up chatter
    try:
        results = pool.map(_pack_job, args, chunksize=8) if pool else map(_pack_job, args)
        with tqdm(total=len(args), desc=protocol, unit='photo', disable=not progress) as bar:
            for path, (data, kind) in zip(unique, results):
                if data == 'error':
                    raise UserError(f'{kind}; nothing written')
                crops[path] = data
                how[kind] += 1
                if kind in ('padded', 'fallback'):
                    rows.append((path, kind))
                bar.update()
    except BrokenProcessPool:
        raise UserError(f'{protocol}: a worker process died (killed, or out of memory) after '
                        f'{sum(how.values())} of {len(args)} photos; nothing written: run the '
                        'same command again (--workers 1 runs without worker processes)') from None
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    bins = [crops[path] for path in pairs.paths]
    output = os.path.join(output_dir, f'{protocol}.bin')
    report = os.path.join(output_dir, f'{protocol}_report.csv')
    # The report is committed inside the .bin's block: a failure leaves neither.
    with atomic_output(output) as fh:
        # The reader (modules.testsets) admits exactly this: a list of bytes and a list of bools.
        pickle.dump((bins, [bool(s) for s in pairs.issame]), fh, protocol=4)
        with atomic_output(report, 'w') as rep:
            writer = csv.writer(rep)
            writer.writerow(('photo', 'aligned_by'))
            writer.writerows(rows)
    return PackReport(len(pairs.issame), len(unique), dict(how), time.perf_counter() - started,
                      output, report, rows)
