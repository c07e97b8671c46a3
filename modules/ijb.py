"""IJB-B / IJB-C 1:1 template verification as InsightFace runs it: meta-file readers, aligned image
features with a resumable cache, template pooling, pair scores and TAR at FAR.

Protocol (InsightFace's `eval_ijbc.py`): each image feature is the sum of the embeddings of the
aligned face and its mirror image, times the detector's faceness score; the features of one media
(a photo, or the frames of one video) within a template are averaged; a template is the sum of its
media features, L2-normalised; a pair's score is the cosine of its two templates. TAR@FAR is read
off one sorted ROC (`modules.evaluations.roc_curve`).
"""
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import warnings

import numpy as np

from modules import evaluations as ev
from modules.utils import UserError, atomic_output, atomic_path

DATASETS = ('IJBC', 'IJBB')
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Dense Gram blocks are worth it while a block entry costs less than this fraction of a gathered
# pair (measured in benchmarks/bench_ijb.py: BLAS dot products vs. memory-bound row gathers).
_GEMM_ENTRIES_PER_PAIR = 64
_BLOCK_ELEMENTS = 1 << 25  # floats per Gram block or gathered block: bounded memory (128 MB)


# ---------------------------------------------------------------------------------------------
# Readers
@dataclasses.dataclass
class IJBMeta:
    """The three meta files of one IJB set, joined per image."""

    names: np.ndarray        # (N,) image file names under image_dir
    templates: np.ndarray    # (N,) int64 template id of each image
    medias: np.ndarray       # (N,) int64 media id of each image
    landmarks: np.ndarray    # (N, 5, 2) float32 (x, y) in ArcFace-template order
    faceness: np.ndarray     # (N,) float32 detector score
    pairs: np.ndarray        # (P, 2) int64 template ids
    labels: np.ndarray       # (P,) bool, True for genuine pairs
    image_dir: str


def meta_paths(ijb_root, dataset):
    """Paths of the three meta files and the image folder of `dataset` ('IJBC' or 'IJBB')."""
    if dataset not in DATASETS:
        raise UserError(f"unknown IJB set {dataset!r}; expected one of {', '.join(DATASETS)}")
    base = os.path.join(ijb_root, dataset)
    prefix = os.path.join(base, 'meta', dataset.lower())
    return {'face_tid_mid': f'{prefix}_face_tid_mid.txt',
            'pairs': f'{prefix}_template_pair_label.txt',
            'landmarks': f'{prefix}_name_5pts_score.txt',
            'image_dir': os.path.join(base, 'loose_crop')}


def _first_bad_line(path, kinds):
    """(line number, text) of the first non-blank line whose fields do not parse as `kinds`."""
    with open(path, encoding='utf-8', errors='replace') as fh:
        for number, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != len(kinds):
                    raise ValueError
                for kind, field in zip(kinds, fields):
                    kind(field)
            except ValueError:
                return number, line.rstrip('\n')[:120]
    return None, None


def _load_columns(path, what, kinds):
    """Read a space-separated file whose columns are `kinds` (str, int, float) with np.loadtxt.

    Returns a list of column arrays. Parsing runs in numpy's C reader; only when it fails is the
    file scanned line by line, to name the first malformed line.
    """
    if not os.path.isfile(path):
        raise UserError(f'{what} not found: {path}')
    columns = []
    try:
        for kind in (str, int, float):
            use = tuple(i for i, k in enumerate(kinds) if k is kind)
            if not use:
                continue
            dtype = {str: str, int: np.int64, float: np.float32}[kind]
            with warnings.catch_warnings():  # an empty file is reported below, as a UserError
                warnings.simplefilter('ignore', UserWarning)
                data = np.loadtxt(path, dtype=dtype, comments=None, usecols=use, ndmin=2,
                                  encoding='utf-8')
            columns += [(i, data[:, j]) for j, i in enumerate(use)]
    except (ValueError, UnicodeDecodeError):
        number, text = _first_bad_line(path, kinds)
        expected = ' '.join({str: 'name', int: 'int', float: 'float'}[k] for k in kinds)
        if number is None:
            raise UserError(f'{path}: cannot be read as {len(kinds)} fields per line '
                            f'({expected})') from None
        raise UserError(f'{path}: line {number}: expected {len(kinds)} fields ({expected}), '
                        f'got {text!r}') from None
    if columns[0][1].size == 0:
        raise UserError(f'{path}: the {what} is empty')
    return [col for _, col in sorted(columns, key=lambda c: c[0])]


def read_face_tid_mid(path):
    """`<set>_face_tid_mid.txt`: (image names, template ids, media ids), one row per image."""
    names, templates, medias = _load_columns(path, 'face/template/media list', (str, int, int))
    return names, templates, medias


def read_landmarks(path):
    """`<set>_name_5pts_score.txt`: (image names, (N, 5, 2) landmarks, faceness scores)."""
    cols = _load_columns(path, 'landmark file', (str,) + (float,) * 11)
    points = np.stack(cols[1:11], axis=1).reshape(-1, 5, 2)
    faceness = cols[11]
    bad = np.flatnonzero(~np.isfinite(points).all(axis=(1, 2)) | ~np.isfinite(faceness))
    if bad.size:
        raise UserError(f'{path}: line {bad[0] + 1}: landmarks and faceness must be finite')
    return cols[0], points, faceness


def read_template_pairs(path):
    """`<set>_template_pair_label.txt`: ((P, 2) template ids, (P,) bool labels)."""
    t1, t2, label = _load_columns(path, 'template pair file', (int, int, int))
    bad = np.flatnonzero((label != 0) & (label != 1))
    if bad.size:
        raise UserError(f'{path}: line {bad[0] + 1}: the label must be 0 or 1, got {label[bad[0]]}')
    return np.stack([t1, t2], axis=1), label.astype(bool)


def read_meta(ijb_root, dataset):
    """Read and cross-check the three meta files of one set; every image must exist."""
    paths = meta_paths(ijb_root, dataset)
    if not os.path.isdir(paths['image_dir']):
        raise UserError(f'{dataset} images not found: {paths["image_dir"]} (expected the '
                        f'loose crops under <ijb_root>/{dataset}/loose_crop/)')
    names, templates, medias = read_face_tid_mid(paths['face_tid_mid'])
    lm_names, points, faceness = read_landmarks(paths['landmarks'])
    if not np.array_equal(names, lm_names):  # InsightFace's files share one order; else join
        order = np.argsort(lm_names, kind='stable')
        pos = np.clip(np.searchsorted(lm_names[order], names), 0, len(order) - 1)
        found = lm_names[order][pos] == names
        if not found.all():
            i = int(np.argmin(found))
            raise UserError(f'{paths["landmarks"]}: no line for image {str(names[i])!r} '
                            f'(line {i + 1} of {paths["face_tid_mid"]})')
        points, faceness = points[order][pos], faceness[order][pos]
    on_disk = np.isin(names, np.asarray(os.listdir(paths['image_dir'])))
    if not on_disk.all():
        i = int(np.argmin(on_disk))
        raise UserError(f'image {str(names[i])!r} (line {i + 1} of {paths["face_tid_mid"]}) '
                        f'not found in {paths["image_dir"]}')
    pairs, labels = read_template_pairs(paths['pairs'])
    template_rows(np.unique(templates), pairs, paths['pairs'])
    if labels.all() or not labels.any():
        raise UserError(f'{paths["pairs"]}: needs both genuine (1) and impostor (0) pairs')
    return IJBMeta(names, templates, medias, points.astype(np.float32),
                   faceness.astype(np.float32), pairs, labels, paths['image_dir'])


# ---------------------------------------------------------------------------------------------
# Image features
def load_aligned(image_dir, names, landmarks, size=112, workers=None):
    """Read each image and warp it to the ArcFace crop by its five points: (n, size, size, 3)
    RGB float32 in [0, 1]. Decoding and warping run in threads (OpenCV releases the GIL)."""
    import cv2

    from modules.align import align_face

    def one(i):
        path = os.path.join(image_dir, names[i])
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise UserError(f'{path}: cannot be read as an image')
        return align_face(bgr[:, :, ::-1], landmarks[i], size)

    out = np.empty((len(names), size, size, 3), np.float32)
    with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
        for i, crop in enumerate(pool.map(one, range(len(names)))):
            out[i] = crop
    out *= np.float32(1 / 255.0)
    return out


def _fingerprint(meta, model_source, size, chunk_size):
    digest = hashlib.sha1('\n'.join(meta.names.tolist()).encode('utf-8'))
    digest.update(np.ascontiguousarray(meta.landmarks).tobytes())
    return {'images': int(len(meta.names)), 'names_landmarks_sha1': digest.hexdigest(),
            'model': model_source, 'input_size': int(size), 'chunk_size': int(chunk_size),
            'flip': True}


def image_features(embed_fn, meta, cache_dir=None, model_source=None, size=112, batch_size=64,
                   chunk_size=4096, progress=True):
    """Flip-summed embeddings of every aligned image: ((N, d) float32, chunks reused).

    With `cache_dir`, every finished chunk of `chunk_size` images is saved there atomically, so a
    killed run resumes at the first missing chunk. The cache belongs to one model and one image
    list (`cache.json`); a cache made by anything else is refused, never mixed in.
    """
    from tqdm import tqdm
    n = len(meta.names)
    n_chunks = -(-n // chunk_size)
    if cache_dir is not None:
        fingerprint = _fingerprint(meta, model_source, size, chunk_size)
        info_path = os.path.join(cache_dir, 'cache.json')
        if os.path.isfile(info_path):
            try:
                with open(info_path, encoding='utf-8') as fh:
                    stored = json.load(fh)
            except (OSError, ValueError) as err:
                raise UserError(f'{info_path}: unreadable ({err}); remove {cache_dir} to embed '
                                'again') from None
            for key, value in fingerprint.items():
                if stored.get(key) != value:
                    raise UserError(f'{cache_dir} holds features made with another {key} '
                                    f'({stored.get(key)!r}, now {value!r}); remove it to embed '
                                    'again')
        else:
            with atomic_output(info_path, 'w') as fh:
                json.dump(fingerprint, fh, indent=2)
    chunks, reused = [], 0
    for c in tqdm(range(n_chunks), desc='IJB features', disable=not progress):
        rows = slice(c * chunk_size, min(n, (c + 1) * chunk_size))
        path = None if cache_dir is None else os.path.join(cache_dir, f'chunk_{c:05d}.npy')
        if path is not None and os.path.isfile(path):
            try:
                feats = np.load(path, allow_pickle=False)
            except (OSError, ValueError, EOFError) as err:
                raise UserError(f'{path}: unreadable ({err}); remove it to embed the chunk '
                                'again') from None
            if feats.ndim != 2 or feats.shape[0] != rows.stop - rows.start:
                raise UserError(f'{path}: shape {feats.shape}, expected '
                                f'{rows.stop - rows.start} rows; remove it to embed the chunk '
                                'again')
            reused += 1
        else:
            images = load_aligned(meta.image_dir, meta.names[rows], meta.landmarks[rows], size)
            feats = ev.extract_embeddings(embed_fn, images, batch_size, is_flip=True,
                                          progress=False).astype(np.float32)
            if path is not None:
                with atomic_output(path, 'wb') as fh:
                    np.save(fh, feats, allow_pickle=False)
        chunks.append(feats)
    return np.concatenate(chunks), reused


# ---------------------------------------------------------------------------------------------
# Templates and scores
def _check_image_arrays(image_feats, templates, medias, faceness):
    feats = np.asarray(image_feats)
    if feats.ndim != 2 or feats.dtype.kind != 'f':
        raise UserError(f'image features must be a 2-D float array, got {feats.dtype} '
                        f'{feats.shape}')
    n = feats.shape[0]
    arrays = [np.asarray(templates).ravel(), np.asarray(medias).ravel()]
    if faceness is not None:
        arrays.append(np.asarray(faceness, feats.dtype).ravel())
    if any(a.size != n for a in arrays):
        raise UserError(f'{n} image features but {[a.size for a in arrays]} template / media / '
                        'faceness entries')
    return feats, arrays[0], arrays[1], (arrays[2] if faceness is not None else None)


def template_features(image_feats, templates, medias, faceness=None):
    """Pool image features into L2-normalised templates: (template_ids ascending, (T, d) features).

    Per template: faceness-weighted image features are averaged per media, the media features
    summed. Done as one sparse (templates x images) weight matrix times the features.
    """
    import scipy.sparse

    feats, templates, medias, faceness = _check_image_arrays(image_feats, templates, medias,
                                                             faceness)
    template_ids, t_row = np.unique(templates, return_inverse=True)
    media_rank = np.unique(medias, return_inverse=True)[1]
    group = t_row.astype(np.int64) * (media_rank.max() + 1) + media_rank
    _, group_row, group_count = np.unique(group, return_inverse=True, return_counts=True)
    weight = (1.0 / group_count[group_row]).astype(feats.dtype)
    if faceness is not None:
        weight *= faceness
    pooling = scipy.sparse.csr_array((weight, (t_row, np.arange(feats.shape[0]))),
                                     shape=(template_ids.size, feats.shape[0]))
    pooled = np.asarray(pooling @ feats)
    pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return template_ids, pooled


def template_features_loop(image_feats, templates, medias, faceness=None):
    """The same pooling one template at a time, as InsightFace's script does: the reference that
    `template_features` is tested and benchmarked against."""
    feats, templates, medias, faceness = _check_image_arrays(image_feats, templates, medias,
                                                             faceness)
    if faceness is not None:
        feats = feats * faceness[:, None]
    template_ids = np.unique(templates)
    out = np.zeros((template_ids.size, feats.shape[1]), feats.dtype)
    for row, tid in enumerate(template_ids):
        mask = templates == tid
        t_feats, t_medias = feats[mask], medias[mask]
        media_feats = [t_feats[t_medias == mid].mean(axis=0) for mid in np.unique(t_medias)]
        out[row] = np.sum(media_feats, axis=0)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return template_ids, out


def template_rows(template_ids, pairs, where='pair list'):
    """Row of each pair's templates in the ascending `template_ids`; an unknown id is an error
    naming its line of `where`."""
    if template_ids.size == 0:
        raise UserError('no templates')
    low, high = int(template_ids[0]), int(template_ids[-1])
    if high - low < (1 << 26):
        # Ids are small integers (IJB-C's reach 1e5..1e6): one lookup table beats 31 M binary
        # searches several times over.
        lookup = np.zeros(high - low + 1, np.int64)
        lookup[template_ids - low] = np.arange(template_ids.size)
        rows = lookup[np.clip(pairs, low, high) - low]
    else:
        rows = np.clip(np.searchsorted(template_ids, pairs), 0, template_ids.size - 1)
    known = template_ids[rows] == pairs
    if not known.all():
        i = int(np.argmin(known.all(axis=1)))
        raise UserError(f'{where}: line {i + 1}: template {pairs[i][~known[i]][0]} has no '
                        'image (not in the face/template list)')
    return rows


def _dense_rank(rows, size):
    """Sorted distinct values of `rows` (all in [0, size)) and each row's position among them."""
    present = np.zeros(size, bool)
    present[rows] = True
    return np.flatnonzero(present), (np.cumsum(present) - 1)[rows]


def pair_scores(template_feats, template_ids, pairs, measure='cosine'):
    """Score of every template pair: 'cosine' of float templates, or 'Hamming' similarity (the
    number of equal indices) of IoM codes. float32 (P,), computed in bounded-memory blocks."""
    feats = np.asarray(template_feats)
    template_ids = np.asarray(template_ids)
    pairs = np.asarray(pairs)
    if measure not in ('cosine', 'Hamming'):
        raise UserError(f"pair_scores measure must be 'cosine' or 'Hamming', got {measure!r}")
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise UserError(f'pairs must have shape (P, 2), got {pairs.shape}')
    if feats.ndim != 2 or feats.shape[0] != template_ids.size:
        raise UserError(f'{template_ids.size} template ids for template features of shape '
                        f'{feats.shape}')
    rows = template_rows(template_ids, pairs)
    scores = np.empty(len(pairs), np.float32)
    if measure == 'cosine':
        feats = np.ascontiguousarray(feats, np.float32)
        left, left_pos = _dense_rank(rows[:, 0], feats.shape[0])
        right, right_pos = _dense_rank(rows[:, 1], feats.shape[0])
        if left.size * right.size <= _GEMM_ENTRIES_PER_PAIR * len(pairs):
            # Dense Gram blocks (BLAS) over the templates that occur: far faster than gathering
            # 2 x P feature rows when the pairs are as dense as IJB's.
            right_t = np.ascontiguousarray(feats[right].T)
            step = max(1, _BLOCK_ELEMENTS // max(right.size, 1))
            block_of = left_pos // step
            for b in range(-(-left.size // step)):
                idx = np.flatnonzero(block_of == b)
                gram = feats[left[b * step:(b + 1) * step]] @ right_t
                scores[idx] = gram[left_pos[idx] - b * step, right_pos[idx]]
            return scores
    else:
        feats = np.asarray(feats)
        if feats.dtype.kind not in 'iu':
            raise UserError(f"measure 'Hamming' needs integer IoM codes, got {feats.dtype}")
        m = feats.shape[1]
        field_bits = None
        if feats.size and 0 <= feats.min() and feats.max() < 256:
            feats, field_bits = _pack_codes(feats)
    step = max(1, _BLOCK_ELEMENTS // max(feats.shape[1], 1) // 4)
    for start in range(0, len(pairs), step):
        a, b = feats[rows[start:start + step, 0]], feats[rows[start:start + step, 1]]
        if measure == 'cosine':
            scores[start:start + step] = np.einsum('ij,ij->i', a, b)
        elif field_bits:
            scores[start:start + step] = m - _nonzero_fields(a ^ b, field_bits)
        else:
            scores[start:start + step] = (a == b).sum(axis=1, dtype=np.int32)
    return scores


def _pack_codes(codes):
    """Codes in [0, 256) as (T, k) uint64 words of 4-bit (q <= 16) or 8-bit fields, padded with
    zero fields (equal in every pair): a half or a quarter of the int8 row to gather per pair."""
    codes = codes.astype(np.uint8)
    bits = 4 if codes.max() < 16 else 8
    per_word = 64 // bits
    codes = np.pad(codes, ((0, 0), (0, -codes.shape[1] % per_word)))
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return np.ascontiguousarray(codes).view(np.uint64), bits


def _nonzero_fields(words, bits):
    """Non-zero `bits`-wide fields per row of a (n, k) uint64 array: a field's top bit is set in
    ((x & low) + low) | x, low = the field's other bits, exactly when the field is non-zero."""
    low = np.uint64(int(('0' + '1' * (bits - 1)) * (64 // bits), 2))
    flags = (words & low) + low
    flags |= words
    flags &= ~low
    return np.bitwise_count(flags).sum(axis=1, dtype=np.int32)


def tar_at_far(scores, labels, fars=FARS):
    """({far: TAR}, roc): the highest TAR over thresholds whose FAR does not exceed each `far`.

    A pair is accepted when its score >= threshold; tied scores are one threshold. `roc` holds
    'far', 'tar' and the score 'threshold' of every ROC point, from `evaluations.roc_curve`.
    """
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels, bool).ravel()
    if scores.size != labels.size:
        raise UserError(f'{scores.size} scores for {labels.size} labels')
    if labels.all() or not labels.any():
        raise UserError('TAR@FAR needs both genuine and impostor pairs')
    if not np.isfinite(scores).all():
        raise UserError('scores contain NaN or infinite values')
    fpr, tpr, distance_thr = ev.roc_curve(-scores, labels)
    # FAR and TAR both grow along the curve, so the best point under a FAR is the last one.
    last = np.searchsorted(fpr, np.asarray(fars, np.float64), side='right') - 1
    tars = {float(far): float(tpr[i]) for far, i in zip(fars, last)}
    return tars, {'far': fpr, 'tar': tpr, 'threshold': -distance_thr}


def iom_template_codes(iom_model, template_feats, image_feats):
    """Hash templates with a stage-2 model's IoM layers (template-level hashing).

    The unit template vectors are scaled to the median norm of one image embedding (half a flip
    sum), the scale the IoM layers were trained on; the projection has a bias, so scale matters.
    """
    from modules.models import iom_codes
    scale = np.median(np.linalg.norm(image_feats, axis=1)) / 2.0
    return iom_codes(iom_model, np.asarray(template_feats, np.float32) * np.float32(scale))


# ---------------------------------------------------------------------------------------------
# Reports
def format_table(results, dataset):
    """Markdown table: one row per FAR, one column per method ({method: {far: tar}})."""
    methods = list(results)
    fars = list(next(iter(results.values())))
    lines = [f'{dataset} TAR@FAR', '| FAR | ' + ' | '.join(methods) + ' |',
             '|---|' + '---|' * len(methods)]
    lines += [f'| {far:.0e} | ' + ' | '.join(f'{results[m][far]:.4f}' for m in methods) + ' |'
              for far in fars]
    return '\n'.join(lines)


def write_report(summary, rocs, out_dir, dataset):
    """Write `ijb_<set>_results.json` and the ROC plot `ijb_<set>_roc.png` (log FAR axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    json_path = os.path.join(out_dir, f'ijb_{dataset}_results.json')
    with atomic_output(json_path, 'w') as fh:
        json.dump(summary, fh, indent=2)
    fig = Figure(figsize=(6.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for method, roc in rocs.items():
        n_neg = int(summary['impostor_pairs'])
        # The curve on a log grid of FARs (the full ROC has one point per distinct score).
        grid = np.unique(np.r_[np.geomspace(1.0 / n_neg, 1.0, 400), roc['far'][-1]])
        tar = roc['tar'][np.searchsorted(roc['far'], grid, side='right') - 1]
        ax.step(grid, tar, where='post', label=method)
    ax.set_xscale('log')
    ax.set_xlabel('False accept rate')
    ax.set_ylabel('True accept rate')
    ax.set_title(f"{dataset} 1:1 verification ({summary['templates']} templates, "
                 f"{summary['pairs']} pairs)")
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(loc='lower right')
    fig.tight_layout()
    png_path = os.path.join(out_dir, f'ijb_{dataset}_roc.png')
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format='png', dpi=100)
    return [json_path, png_path]
