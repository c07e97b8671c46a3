"""Stage 2's key-change monitor: are the codes still key-dependent, and better than random IoM?

Every `eval_steps` (and once at the end) the current IoM layers hash embeddings of identities held
out of stage-2 training, with no key, under `monitor_keys` random keys, and a seeded random IoM
(Jin et al.: N(0, 1) projection, no bias) hashes the same embeddings. Numpy on embeddings computed
once: a few milliseconds for the default held-out split.
"""
import numpy as np

from modules.utils import UserError

# Keys the monitor hashes under: fixed, so successive evaluations are comparable.
MONITOR_KEY_BASE = 7_000_001
# Seed of the random-IoM baseline's projection.
RANDOM_IOM_SEED = 20_180_101


def holdout_split(labels, share, seed=0):
    """Boolean mask of the images whose identity is held out: `share` of the identities, seeded."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    count = int(round(share * ids.size))
    if share > 0 and (count < 2 or count > ids.size - 2):
        raise UserError(f'monitor_holdout {share} of {ids.size} identities holds out {count}: the '
                        'monitor needs at least 2 held-out identities and training at least 2; '
                        'change monitor_holdout (0: no monitor)')
    held = np.random.default_rng(seed).choice(ids, count, replace=False)
    return np.isin(labels, held)


def verification_pairs(labels, max_pairs=2000, seed=0):
    """Index arrays (left, right, issame): every genuine pair (capped) and as many impostor pairs."""
    from modules.protection.measures import different_subject_pairs, same_subject_pairs
    gi, gj = same_subject_pairs(labels)
    keep = gi < gj
    gi, gj = gi[keep], gj[keep]
    rng = np.random.default_rng(seed)
    if gi.size > max_pairs:
        pick = rng.choice(gi.size, max_pairs, replace=False)
        gi, gj = gi[pick], gj[pick]
    ni, nj = different_subject_pairs(labels, gi.size, seed + 1)
    if gi.size == 0 or ni.size == 0:
        raise UserError('the key-change monitor needs genuine and impostor pairs: hold out more '
                        'identities (monitor_holdout) or use identities with 2+ images')
    return np.r_[gi, ni], np.r_[gj, nj], np.r_[np.ones(gi.size, bool), np.zeros(ni.size, bool)]


def projection_codes(features, kernel, bias, m, q, perm=None):
    """IoM codes (N, m) int32 of features through one projection: argmax per group of q."""
    x = features if perm is None else features[:, perm]
    z = x @ kernel
    if bias is not None:
        z = z + bias
    return np.argmax(z.reshape(len(x), m, q), axis=-1).astype(np.int32)


class KeyChangeMonitor:
    """The key-change check and the learned-vs-random margin on held-out embeddings."""

    def __init__(self, cfg, embeddings, labels):
        self.m, self.q = cfg['m'], cfg['q']
        left, right, self.issame = verification_pairs(labels)
        # evaluate_protection's layout: pair i = rows 2i and 2i+1.
        order = np.stack([left, right], axis=1).ravel()
        self.embeddings = np.asarray(embeddings, np.float32)[order]
        self.stop = cfg['stop_on_key_change_fail']
        self.keys = [MONITOR_KEY_BASE + i for i in range(cfg['monitor_keys'])]
        self.rekeyable = cfg['perm_position'] == 'projection'
        rng = np.random.default_rng(RANDOM_IOM_SEED)
        d = self.embeddings.shape[1]
        random_kernel = rng.standard_normal((d, self.m * self.q)).astype(np.float32)
        self.random_codes = projection_codes(self.embeddings, random_kernel, None, self.m, self.q)
        self.perms = {}  # key -> permutation, made on first use (the feature size is known then)
        self.last = None
        self.checked_step = None  # the step of self.last: the final check does not repeat it

    def _perm(self, key, n):
        from modules.layers import key_permutation
        if key not in self.perms:
            self.perms[key] = key_permutation(key, n)
        return self.perms[key]

    def codes_by_key(self, stack):
        """(codes without key, [codes under each monitor key]) of the held-out embeddings."""
        projection = stack[-2]
        x = self.embeddings
        for layer in stack[:-2]:
            if layer.name != 'perm_layer':  # hidden layers, inference mode (run once per check)
                x = layer(x, training=False)
        x = np.asarray(x, np.float32)
        kernel = projection.kernel.numpy()
        bias = projection.bias.numpy() if projection.use_bias else None
        plain = projection_codes(x, kernel, bias, self.m, self.q)
        keyed = [projection_codes(x, kernel, bias, self.m, self.q, self._perm(k, x.shape[1]))
                 for k in self.keys]
        return plain, keyed

    def check(self, stack):
        """The monitor's figures for the IoM layer list `stack` (perm, hidden, projection, head)."""
        from modules import evaluations as ev
        from modules.protection.measures import evaluate_protection, key_change_verdict
        plain, keyed = self.codes_by_key(stack)
        report = evaluate_protection(keyed, plain, self.issame)
        ok, reasons, _ = key_change_verdict(report, q=self.q)
        random = ev.verification_metrics(
            ev.pair_distances(self.random_codes[0::2], self.random_codes[1::2], 'Hamming'),
            self.issame)
        same_key = ev.pair_distances(plain[0::2], plain[1::2], 'Hamming')
        result = {
            'eer_learned': float(report['eer_plain']), 'eer_random': float(random['eer']),
            'eer_new_keys': float(report['eer_shared_key_mean']),
            'margin_eer': float(random['eer'] - report['eer_plain']),
            'nonmated_agreement_new_keys': float(report['nonmated_mean']),
            'nonmated_agreement_same_key': float(1 - same_key[~self.issame].mean() / self.m),
            'revocability': float(max(report['revocability_rate'],
                                      report['revocability_rate_same_sample'])),
            'key_change_ok': bool(ok), 'key_change_problems': reasons,
        }
        if not self.rekeyable:
            result['key_change_problems'] = ['perm_position: input: codes are valid only under '
                                             'the training key (not checked)']
        self.last = result
        return result

    def run(self, state, stack, final=False):
        """Check, log to TensorBoard under monitor/, warn (or raise with stop_on_key_change_fail)."""
        import tensorflow as tf
        if final and self.checked_step == state.step:
            return self.last
        r = self.check(stack)
        self.checked_step = state.step
        with state.writer.as_default(step=state.step):
            for k, v in r.items():
                if not isinstance(v, list):
                    tf.summary.scalar(f'monitor/{k}', float(v))
        write = state.bar.write if state.bar is not None else print
        write(f"[monitor step {state.step}] held-out EER learned {r['eer_learned']:.4f} random "
              f"{r['eer_random']:.4f} new keys {r['eer_new_keys']:.4f}; non-mated agreement "
              f"{r['nonmated_agreement_new_keys']:.4f} (1/q {1 / self.q:.4f}); revocability "
              f"{r['revocability']:.4f}; key_change_ok {str(r['key_change_ok']).lower()}")
        if self.rekeyable and not r['key_change_ok']:
            message = ('the IoM codes are no longer key-dependent (' + '; '.join(
                r['key_change_problems']) + '): a new key would not revoke them. Lower base_lr, '
                'or fewer steps, and keep iom_projection_bias: false, iom_orthogonal_groups '
                'and iom_tight_frame: true '
                '(docs/protection.md, "Real faces")')
            write(f'[*] Warning: step {state.step}: {message}')
            if self.stop and not final:
                state.save()
                raise UserError(f'stop_on_key_change_fail: stopped at step {state.step} (saved): '
                                f'{message}')
        return r
