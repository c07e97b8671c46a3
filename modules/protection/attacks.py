"""Attacks on IoM codes when the key is stolen: pre-images, replay after revocation, linkage.

Evaluation code, never part of a deployed model. Attacker models (ISO/IEC 30136 vocabulary):
*template only* (codes, no key), *stolen token* (a code and its key; the model weights are
public), *database dump* (every code, plus the key file in application-key mode). With the key,
a code is a set of constraints on the embedding x: for every group i the stolen index c_i must
win, z_{i,c_i} > z_{i,j} for j != c_i, where z = stack(P x) is the IoM projection of the permuted
(and, with hidden layers, transformed) embedding. Two searches find an x' that meets them:

- `lp_preimage` (stacks without hidden layers): z is affine in y = P x, so the constraints are
  linear, (w_{i,c_i} - w_{i,j}) . y + (b_{i,c_i} - b_{i,j}) >= t; a linear program (HiGHS)
  maximises the smallest margin t inside a box on y (Ghammam et al., IEEE TIFS 2020).
- `gradient_preimage` (any stack): x = r u / |u| on a sphere of the radius of real embeddings;
  Adam on u lowers the cross-entropy of the stolen indices under the soft assignment
  softmax(z / sigma), all victims in one batch.

`attack_report` runs both on victims drawn from a verification set's genuine pairs (image A is
enrolled and its code stolen; image B is another photo of the same person) and measures what the
pre-image buys: the same code, acceptance under the stolen key, acceptance after the victim is
re-enrolled under a new key (revocation), rank-1 de-anonymisation among float embeddings, and
linkage of two codes of one person issued under two known keys.
"""
import time

import numpy as np
import tensorflow as tf

from modules.utils import UserError

# Attack names in the report, in order.
ATTACKS = ('lp', 'gradient')


# ---------------------------------------------------------------------------------------------
class KeyedStack:
    """The IoM layers of a model (after the embedding model, up to IoMHead) under one key."""

    def __init__(self, layers, key=None):
        from modules.models import with_perm_key
        self.layers = with_perm_key(layers, key) if key is not None else list(layers)
        self.key = key
        self.head = self.layers[-1]
        self.m, self.q = self.head.m, self.head.q

    @classmethod
    def of_model(cls, iom_model, key=None):
        """The stack of a stage-2 IoM model (load_iom_model / IoMFaceModel) under `key`."""
        from modules.models import trained_iom_layers
        return cls(trained_iom_layers(iom_model), key)

    def under(self, key):
        """The same trained layers under another key."""
        return KeyedStack(self.layers, key)

    def logits(self, x):
        """IoM projections (batch, m, q) of embeddings x, inference mode."""
        for layer in self.layers[:-1]:
            x = layer(x, training=False)
        return tf.reshape(tf.cast(x, tf.float32), [-1, self.m, self.q])

    def codes(self, x):
        """Integer codes (N, m) of embeddings x."""
        from modules.models import stack_codes
        return stack_codes(self.layers, np.asarray(x, np.float32))

    def is_linear(self):
        """True when only the permutation, the projection and the head are stacked."""
        return [layer.name for layer in self.layers] == ['perm_layer', 'IoMProjection', 'IoMHead']

    def affine_parts(self):
        """(perm, W (d, m*q), b (m*q,)) of a linear stack: z = x[perm] @ W + b."""
        from modules.layers import key_permutation
        if not self.is_linear():
            raise UserError('the linear-program attack needs a stack without hidden layers '
                            "(hidden_layer_remark '1' or 'T1'); use the gradient attack")
        perm_layer, projection = self.layers[0], self.layers[1]
        w = projection.kernel.numpy().astype(np.float64)
        # Without a projection bias (iom_projection_bias: false) b is zero.
        b = (projection.bias.numpy().astype(np.float64) if projection.use_bias
             else np.zeros(w.shape[1]))
        return key_permutation(perm_layer.perm_key, w.shape[0]), w, b


# ---------------------------------------------------------------------------------------------
def lp_preimage(stack, code, low, high):
    """Embedding x' (d,) whose code under `stack` is `code`, by a linear program; and its margin.

    Maximises t subject to z_{i,c_i} - z_{i,j} >= t for every group i and j != c_i, with the
    embedding boxed in [low, high] (per feature; widened around its centre when the program's
    best t is not positive). A positive t means the code is reproduced.
    One victim per call: the programs of different victims share nothing.
    """
    from scipy.optimize import linprog
    perm, w, b = stack.affine_parts()
    d, m, q = w.shape[0], stack.m, stack.q
    code = np.asarray(code, np.int64).ravel()
    wg = w.reshape(d, m, q)
    bg = b.reshape(m, q)
    groups = np.arange(m)
    diff_w = wg[:, groups, code][:, :, None] - wg        # (d, m, q): winner minus every column
    diff_b = bg[groups, code][:, None] - bg               # (m, q)
    others = np.arange(q)[None, :] != code[:, None]       # drop j == c_i (a zero row)
    rows = diff_w[:, others].T                            # (m*(q-1), d) on y = x[perm]
    consts = diff_b[others]
    # Variables (y, t); rows . y + consts >= t  <=>  -rows . y + t <= consts.
    a_ub = np.hstack([-rows, np.ones((rows.shape[0], 1))])
    objective = np.zeros(d + 1)
    objective[-1] = -1.0
    centre = (np.asarray(low, np.float64) + np.asarray(high, np.float64))[perm] / 2
    half = (np.asarray(high, np.float64) - np.asarray(low, np.float64))[perm] / 2
    # A box fitted to real embeddings may miss the code's cone: widen it until t > 0.
    for _ in range(4):
        bounds = [*zip(centre - half, centre + half), (None, None)]
        res = linprog(objective, A_ub=a_ub, b_ub=consts, bounds=bounds, method='highs-ipm')
        if res.status != 0:
            raise UserError(f'linear-program attack: HiGHS did not solve the program '
                            f'({res.message})')
        if res.x[-1] > 0:
            break
        half = 4 * half + 1e-6
    x = np.empty(d)
    x[perm] = res.x[:d]
    return x.astype(np.float32), float(res.x[-1])


def gradient_preimage(stack, codes, radius, steps=1000, learning_rate=0.05, margin=1.0,
                      hinge_weight=1.0, hinge_growth=0.02, seed=0):
    """Embeddings x' (V, d) whose codes under `stack` are `codes` (V, m), found by gradient descent.

    x = radius * u / |u|. The loss is the mean cross-entropy of the stolen indices under the soft
    assignment softmax(z / sigma) of every group (sigma: the spread of the projections at the
    start, so the temperature does not depend on the model's scale), which pulls x towards the
    victim's region, plus a hinge on each group's margin z_{i,c_i} - max_{j != c_i} z_{i,j}
    below `margin` * sigma, which decides the last groups (cross-entropy alone would rather trade
    a few groups for a lower sum). The hinge's weight grows by `hinge_growth` per step and its
    margin shrinks to 0 by half the steps: a wide margin early keeps x deep inside the code's
    region, a vanishing one late lets every group be met when the region is thin. All victims
    are optimised together; each keeps the iterate that matched most of its groups, and the
    search stops once every code is reproduced.
    """
    codes = np.asarray(codes, np.int64)
    n, d = codes.shape[0], _input_size(stack)
    rng = np.random.default_rng(seed)
    u = tf.Variable(rng.standard_normal((n, d)).astype(np.float32))
    target = tf.one_hot(codes, stack.q, dtype=tf.float32)
    radius = tf.constant(np.broadcast_to(np.asarray(radius, np.float32), (n,))[:, None])
    sigma = float(tf.math.reduce_std(stack.logits(radius * tf.math.l2_normalize(u, axis=1))))
    optimizer = tf.keras.optimizers.Adam(learning_rate)

    @tf.function
    def step(weight, margin):
        with tf.GradientTape() as tape:
            x = radius * tf.math.l2_normalize(u, axis=1)
            z = stack.logits(x) / sigma
            chosen = tf.reduce_sum(z * target, axis=-1)
            runner_up = tf.reduce_max(z - 1e9 * target, axis=-1)
            hinge = tf.reduce_mean(tf.nn.relu(margin - (chosen - runner_up)))
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(target, z)) + weight * hinge
        optimizer.apply_gradients([(tape.gradient(loss, u), u)])
        return x, tf.reduce_sum(tf.cast(chosen > runner_up, tf.int32), axis=1)

    best_x = np.zeros((n, d), np.float32)
    best_hits = np.full(n, -1)
    for i in range(steps):
        x, hits = step(tf.constant(hinge_weight * (1 + hinge_growth * i), tf.float32),
                       tf.constant(margin * max(0.0, 1 - i / (steps / 2)), tf.float32))
        hits = hits.numpy()
        better = hits > best_hits
        if better.any():
            best_x[better] = x.numpy()[better]
            best_hits[better] = hits[better]
        if (best_hits == stack.m).all():
            break
    return best_x


def _input_size(stack):
    """Feature size the stack reads (the projection's or the first hidden Dense's input)."""
    for layer in stack.layers:
        kernel = getattr(layer, 'kernel', None)
        if kernel is not None:
            return int(kernel.shape[0])
    raise UserError('the IoM stack has no Dense layer')


# ---------------------------------------------------------------------------------------------
# The evaluation.
def random_key(rng):
    """A 128-bit key, as the gallery draws them."""
    return int.from_bytes(rng.bytes(16), 'little')


def operating_points(codes, issame, fars=()):
    """[(name, threshold, source)]: the EER threshold, then one per FAR (accept: distance <= t)."""
    from modules import evaluations as ev
    met = ev.verification_metrics(ev.pair_distances(codes[0::2], codes[1::2], 'Hamming'), issame)
    points = [('eer', met['eer_threshold'], f"EER threshold under the stolen key (EER "
                                            f"{met['eer']:.4f})")]
    for far in fars:
        threshold, measured = ev.threshold_at_far(met['roc_far'], met['roc_thresholds'], far)
        points.append((f'far={far:g}', threshold,
                       f'FAR <= {far:g} under the stolen key (measured {measured:.2e})'))
    return points, met


def victim_pairs(issame, victims, seed=0):
    """Image indices (A, B) of up to `victims` genuine pairs, a seeded random choice, sorted."""
    genuine = np.flatnonzero(np.asarray(issame, bool))
    if genuine.size < 2:
        raise UserError('the attack evaluation needs at least 2 genuine pairs in the set')
    pick = np.sort(np.random.default_rng(seed).choice(genuine, min(victims, genuine.size),
                                                      replace=False))
    return 2 * pick, 2 * pick + 1


def _hamming(a, b):
    return np.count_nonzero(np.asarray(a) != np.asarray(b), axis=-1)


def _cosine(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.sum(a * b, axis=-1)


def _rank1(probes, gallery):
    """Fraction of probes i whose most cosine-similar gallery row is row i."""
    a = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return float(np.mean(np.argmax(a @ g.T, axis=1) == np.arange(len(a))))


def attack_report(model_or_stack, embeddings, issame, victims=200, attack_keys=5, fars=(), seed=0,
                  attacks=ATTACKS, progress=print):
    """Run the stolen-key attacks on a verification set's embeddings; return the report dict.

    `model_or_stack` is a stage-2 IoM model or a `KeyedStack`; `embeddings` (2N, d) are the
    float embeddings of the set's images, `issame` its N pair labels. A random key plays the
    stolen one; `attack_keys` new keys the re-issued ones after revocation, another random key
    the attacker's wrong guess. Victims are genuine pairs: image A is enrolled (its code is
    stolen), image B is another photo of the same person. Thresholds are the set's own under the
    stolen key. The linear program runs only on stacks without hidden layers.
    """
    embeddings = np.asarray(embeddings, np.float32)
    rng = np.random.default_rng(seed)
    key, wrong_key, link_key = (random_key(rng) for _ in range(3))
    new_keys = [random_key(rng) for _ in range(attack_keys)]
    base = (model_or_stack if isinstance(model_or_stack, KeyedStack)
            else KeyedStack.of_model(model_or_stack))
    stolen_stack = base.under(key)
    if 'lp' in attacks and not stolen_stack.is_linear():
        attacks = tuple(a for a in attacks if a != 'lp')
        progress('[*] the model has hidden layers: the linear-program attack does not apply')
    all_codes = stolen_stack.codes(embeddings)
    points, _ = operating_points(all_codes, issame, fars)
    v = _victims(embeddings, all_codes, issame, victims, seed)
    found, seconds = _preimages(stolen_stack, v, attacks, seed, progress)
    # The attacker who guessed a wrong key (a database dump without the victims' keys).
    x_wrong = gradient_preimage(base.under(wrong_key), v['stolen'], v['radius'], seed=seed + 1)
    distances = _attack_distances(stolen_stack, [base.under(k) for k in new_keys], v, found,
                                  x_wrong)
    fixed = _fixed_figures(v, found, seconds, x_wrong, distances)

    def at(threshold):
        return {part: {**fixed[part], **{k: float(np.mean(d <= threshold)) for k, d in ds.items()}}
                for part, ds in distances.items()}

    (_, eer_t, eer_source), *far_points = points
    report = {'victims': len(v['stolen']), 'm': base.m, 'q': base.q, 'attack_keys': attack_keys,
              'threshold': float(eer_t), 'threshold_source': eer_source,
              'accept_rule': 'Hamming distance <= threshold', **at(eer_t),
              'at_far': {name: {'threshold': float(t), 'threshold_source': source, **at(t)}
                         for name, t, source in far_points}}
    if 'gradient' in found:
        report['linkage'] = _linkage(found['gradient'], v['stolen'], base.under(link_key), v['x_b'],
                                     v['radius'], seed)
    report['histograms'] = {
        'genuine': distances['baselines']['genuine_accept_cross_key'].ravel(),
        'impostor': distances['baselines']['impostor_accept'].ravel(),
        **{f'attack_{name}': distances[name]['cross_key_accept_same_image'].ravel()
           for name in found}}
    return report


def _victims(embeddings, all_codes, issame, victims, seed):
    """The victims' photos and stolen codes, their impostors, and what the attacker knows of real
    embeddings (norm and per-dimension range of the images that are not victims')."""
    a_idx, b_idx = victim_pairs(issame, victims, seed)
    x_a, x_b = embeddings[a_idx], embeddings[b_idx]
    public = np.delete(embeddings, np.r_[a_idx, b_idx], axis=0)
    public = public if len(public) >= 10 else embeddings
    low, high = np.percentile(public, [0.5, 99.5], axis=0)
    # Impostor of victim v: the other photo of the next victim (a different person).
    return {'x_a': x_a, 'x_b': x_b, 'x_imp': np.roll(x_b, -1, axis=0),
            'stolen': all_codes[a_idx], 'stolen_b': all_codes[b_idx], 'low': low, 'high': high,
            'radius': float(np.median(np.linalg.norm(public, axis=1)))}


def _preimages(stolen_stack, v, attacks, seed, progress):
    """({attack: pre-images (V, d)}, {attack: seconds per victim}) for the stolen codes."""
    found, seconds = {}, {}
    n = len(v['stolen'])
    for name in attacks:
        progress(f'[*] {name} attack on {n} victims')
        start = time.perf_counter()
        if name == 'lp':
            found[name] = np.stack([lp_preimage(stolen_stack, c, v['low'], v['high'])[0]
                                    for c in v['stolen']])
        else:
            found[name] = gradient_preimage(stolen_stack, v['stolen'], v['radius'], seed=seed)
        seconds[name] = (time.perf_counter() - start) / n
    return found, seconds


def _attack_distances(stolen_stack, new_stacks, v, found, x_wrong):
    """Hamming distances of every attack and baseline comparison, keyed by part and measure."""
    stolen = v['stolen']
    enrol_a = np.stack([s.codes(v['x_a']) for s in new_stacks])    # (K, V, m) re-enrolled from A
    enrol_b = np.stack([s.codes(v['x_b']) for s in new_stacks])    # ... from another photo
    imp_codes = np.stack([s.codes(v['x_imp']) for s in new_stacks])
    distances = {
        'baselines': {
            'genuine_accept_cross_key': _hamming(enrol_b, enrol_a),
            'impostor_accept': _hamming(imp_codes, enrol_a),
            'wrong_key_accept': _hamming(stolen_stack.codes(x_wrong), stolen),
            'stolen_code_replay_accept': _hamming(stolen[None], enrol_a),
        }}
    for name, x in found.items():
        under_new = np.stack([s.codes(x) for s in new_stacks])
        codes_k = stolen_stack.codes(x)
        distances[name] = {
            'same_key_accept': _hamming(codes_k, stolen),
            'same_key_accept_genuine_probe': _hamming(codes_k, v['stolen_b']),
            'cross_key_accept_same_image': _hamming(under_new, enrol_a),
            'cross_key_accept_other_image': _hamming(under_new, enrol_b),
        }
    return distances


def _fixed_figures(v, found, seconds, x_wrong, distances):
    """The figures that do not depend on a threshold: exact reproductions, cosines, rank-1, time."""
    x_a, x_b = v['x_a'], v['x_b']
    # A distance of 0 under the stolen key is the stolen code reproduced exactly.
    fixed = {name: {'same_key_code_match': float(np.mean(distances[name]['same_key_accept'] == 0)),
                    'cosine_mean': float(np.mean(_cosine(x, x_a))),
                    'cosine_min': float(np.min(_cosine(x, x_a))),
                    'rank1': _rank1(x, x_b),
                    'seconds_per_victim': seconds[name]}
             for name, x in found.items()}
    fixed['baselines'] = {'cosine_same_person': float(np.mean(_cosine(x_a, x_b))),
                          'cosine_other_person': float(np.mean(_cosine(x_a, v['x_imp']))),
                          'rank1_true_embedding': _rank1(x_a, x_b),
                          'wrong_key_cosine_mean': float(np.mean(_cosine(x_wrong, x_a)))}
    return fixed


def _linkage(preimages_1, codes_1, stack_2, x_b, radius, seed):
    """D_sys of two codes of one person under two keys, for an attacker with and without keys.

    Row v of `codes_1` is victim v's stolen code (key 1) and of `preimages_1` its pre-image; the
    victim's other photo is hashed under key 2 and inverted the same way. Known keys: the two
    pre-images are compared by cosine. Unknown keys: the codes themselves (fraction of equal
    indices), as `modules.protection.measures` measures unlinkability. Mated: the same victim; non-mated:
    every pair of different victims.
    """
    from modules.protection.measures import similarity_scores, unlinkability
    codes_2 = stack_2.codes(x_b)
    preimages_2 = gradient_preimage(stack_2, codes_2, radius, seed=seed + 2)
    n = len(codes_1)
    i, j = np.divmod(np.arange(n * n), n)
    mated, other = i == j, i != j
    known = _cosine(preimages_1[i], preimages_2[j])
    # Few mated scores: about sqrt(n) bins keep the histogram estimate of D_sys from counting
    # empty non-mated bins as full linkage.
    bins = int(np.clip(np.sqrt(n), 5, 100))
    unknown = similarity_scores(codes_1[i], codes_2[j])
    return {'d_sys_keys_known': unlinkability(known[mated], known[other], bins)[2],
            'd_sys_keys_unknown': unlinkability(unknown[mated], unknown[other], bins)[2],
            'cosine_mated_mean': float(known[mated].mean()),
            'cosine_nonmated_mean': float(known[other].mean()), 'bins': bins}
