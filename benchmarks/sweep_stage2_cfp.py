"""Stage-2 sweep on a held-out verification fold: learned vs random IoM, and the key-change check.

  nice -n 10 .venv/bin/python benchmarks/sweep_stage2_cfp.py --base_cfg BASE.yaml --sets cfp_fp,cfp_ff \
      [--rows 0,3] [--out logs/sweep_stage2]

BASE.yaml (configs/cfp_stage2.yaml) gives the data: train_dataset holds the training folds'
identity folders, stage1_sub_name the backbone trained on them, test_dataset the held-out fold's
.bin files (docs/training.md, "Stage 2 on real faces (CFP)"). Every row starts from ROW_BASE
(remark '1', batch_hard_arc_triplet_loss, m 256, q 8, 500 steps) and its own overrides, whatever
BASE.yaml trains; the embeddings of the training images (cache_embeddings) and of the test pairs
are computed once. Per row and set: float (cosine), learned and seeded random IoM (accuracy, EER,
TAR at FAR 1e-3), and on the learned codes eval_protection's measures (5 keys): key_change_ok,
revocability, zero-effort, non-mated agreement; the evidence of the key-independent terms (a
trained bias; projection columns of unequal norms; a collapsed spectrum). Prints a markdown table
and writes <out>/sweep.json.
"""
import json
import os
import shutil
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from modules.utils import UserError, cli_guard, quiet_tensorflow  # noqa: E402

FLAGS = flags.FLAGS
# 'seed layer': the projection as the seed built it (a bias, a free kernel); 'no bias': the first
# fix alone; 'groups': no bias and orthonormal groups; 'default': all three fixes (a tight frame
# too), what stage 2 builds today.
SEED_ARGS = {'iom_projection_bias': True, 'iom_orthogonal_groups': False, 'iom_tight_frame': False}
NO_BIAS = {'iom_orthogonal_groups': False, 'iom_tight_frame': False}
GROUPS = {'iom_tight_frame': False}
ROW_BASE = {'hidden_layer_remark': '1', 'loss_fun': 'batch_hard_arc_triplet_loss', 'm': 256, 'q': 8,
            'max_steps': 500, 'cache_embeddings': True}
GRID = [  # (label, overrides of ROW_BASE)
    ('seed layer, lr 1.0', dict(SEED_ARGS, base_lr=1.0)),
    ('no bias, lr 1.0', dict(NO_BIAS, base_lr=1.0)),
    ('seed layer, lr 0.1', dict(SEED_ARGS, base_lr=0.1)),
    ('no bias, lr 0.1', dict(NO_BIAS, base_lr=0.1)),
    ('no bias, lr 1.0, 2000 steps', dict(NO_BIAS, base_lr=1.0, max_steps=2000)),
    ('seed layer, lr 1.0, 2000 steps', dict(SEED_ARGS, base_lr=1.0, max_steps=2000)),
    ('no bias, lr 0.01', dict(NO_BIAS, base_lr=0.01)),
    ('no bias, lr 1.0, batch-all arc', dict(NO_BIAS, base_lr=1.0, loss_fun='batch_all_arc_triplet_loss')),
    ('no bias, lr 1.0, batch-hard', dict(NO_BIAS, base_lr=1.0, loss_fun='batch_hard_triplet')),
    ('no bias, lr 1.0, m 512', dict(NO_BIAS, base_lr=1.0, m=512)),
    ('seed layer, lr 1.0, m 512', dict(SEED_ARGS, base_lr=1.0, m=512)),
    ('no bias, remark 2, lr 0.1', dict(NO_BIAS, base_lr=0.1, hidden_layer_remark='2')),
    ('no bias, remark 3, lr 0.1', dict(NO_BIAS, base_lr=0.1, hidden_layer_remark='3')),
    ('no bias, remark T1, lr 0.1', dict(NO_BIAS, base_lr=0.1, hidden_layer_remark='T1')),
    ('seed layer, remark T1, lr 0.1', dict(SEED_ARGS, base_lr=0.1, hidden_layer_remark='T1')),
    ('no bias, lr 0.1, 2000 steps', dict(NO_BIAS, base_lr=0.1, max_steps=2000)),
    ('no bias, lr 0.3', dict(NO_BIAS, base_lr=0.3)),
    ('no bias, remark T1, lr 1.0', dict(NO_BIAS, base_lr=1.0, hidden_layer_remark='T1')),
    ('no bias, lr 1.0, semi-hard', dict(NO_BIAS, base_lr=1.0, loss_fun='semihard_triplet_loss')),
    ('groups, lr 1.0', dict(GROUPS, base_lr=1.0)),
    ('groups, lr 1.0, 2000 steps', dict(GROUPS, base_lr=1.0, max_steps=2000)),
    ('groups, lr 0.1', dict(GROUPS, base_lr=0.1)),
    ('groups, lr 1.0, m 512', dict(GROUPS, base_lr=1.0, m=512)),
    ('groups, remark T1, lr 1.0', dict(GROUPS, base_lr=1.0, hidden_layer_remark='T1')),
    ('groups, remark 2, lr 0.1', dict(GROUPS, base_lr=0.1, hidden_layer_remark='2')),
    ('groups, lr 1.0, 2000 steps, semi-hard', dict(GROUPS, base_lr=1.0, max_steps=2000,
                                                   loss_fun='semihard_triplet_loss')),
    ('default, lr 1.0', dict(base_lr=1.0)),
    ('default, lr 1.0, 2000 steps', dict(base_lr=1.0, max_steps=2000)),
    ('default, lr 0.1', dict(base_lr=0.1)),
    ('default, lr 1.0, m 512', dict(base_lr=1.0, m=512)),
    ('default, remark T1, lr 1.0', dict(base_lr=1.0, hidden_layer_remark='T1')),
    ('default, remark 2, lr 0.1', dict(base_lr=0.1, hidden_layer_remark='2')),
    ('default, lr 1.0, 2000 steps, semi-hard', dict(base_lr=1.0, max_steps=2000,
                                                    loss_fun='semihard_triplet_loss')),
]


def define_flags():
    """Declare the CLI flags."""
    flags.DEFINE_string('base_cfg', None, 'stage-2 config every row starts from')
    flags.DEFINE_string('sets', 'cfp_fp', 'verification sets (<name>.bin in test_dataset)')
    flags.DEFINE_string('rows', None, 'comma-separated GRID rows to run (default: all)')
    flags.DEFINE_string('out', 'logs/sweep_stage2', 'folder of sweep.json and the row configs')
    flags.mark_flag_as_required('base_cfg')


def tar_at_far(dist, issame, far=1e-3):
    """TAR at FAR <= far (accept: distance < threshold); with fewer than 1/far impostor pairs it
    is the TAR below the closest impostor (FAR 0)."""
    imp = np.sort(dist[~issame])
    allowed = int(np.floor(far * imp.size))
    threshold = imp[allowed] if allowed < imp.size else np.inf
    return float(np.mean(dist[issame] < threshold))


def mixed_order(issame):
    """An order of the pairs in which every tenth holds genuine and impostor pairs alike.

    One protocol fold is 350 genuine then 350 impostor pairs: cut into ten contiguous folds as
    the 10-fold accuracy does, each fold is one class and every threshold is chosen on folds
    biased the other way (accuracy fell below 0.5 at EER 0.40). Interleaving keeps the folds
    mixed; EER and TAR do not depend on the order.
    """
    rank = np.empty(issame.size)
    for cls in (True, False):
        idx = np.flatnonzero(issame == cls)
        rank[idx] = (np.arange(idx.size) + 0.5) / idx.size
    return np.argsort(rank, kind='stable')


def metrics(dist, issame):
    """accuracy, EER and TAR at FAR 1e-3 of pair distances."""
    from modules.evaluations import verification_metrics
    order = mixed_order(issame)
    met = verification_metrics(dist[order], issame[order])
    return {'accuracy': float(met['accuracy']), 'eer': float(met['eer']),
            'tar_far1e-3': tar_at_far(dist, issame)}


def random_iom(embeddings, m, q, seed=20_180_101):
    """Codes of the seeded random IoM (N(0, 1) projection, no bias) of the same m, q."""
    from modules.training.monitor import projection_codes
    kernel = np.random.default_rng(seed).standard_normal((embeddings.shape[1], m * q))
    return projection_codes(embeddings, kernel.astype(np.float32), None, m, q)


def protection(model, cfg, emb, issame, num_keys=5):
    """eval_protection's measures of the learned codes: verdict, revocability, zero-effort."""
    from modules.models import iom_codes, stack_codes, trained_iom_layers, with_perm_key
    from modules.protection.measures import (
        evaluate_protection,
        key_change_verdict,
        like_real_embeddings,
        zero_effort_rate,
    )
    plain = stack_codes(with_perm_key(trained_iom_layers(model), None), emb)
    keys = [int(k) for k in np.random.default_rng(0).choice(2 ** 31 - 1, num_keys, replace=False)]
    codes = [iom_codes(model, emb, perm_key=k) for k in keys]
    rep = evaluate_protection(codes, plain, issame)
    ok, reasons, _ = key_change_verdict(rep, q=cfg['q'])
    probes = iom_codes(model, like_real_embeddings(emb, 2000, 0), perm_key=keys[0])
    return {'key_change_ok': ok, 'problems': reasons,
            'revocability': max(rep['revocability_rate'], rep['revocability_rate_same_sample']),
            'zero_effort': zero_effort_rate(probes, codes[0], rep['threshold']),
            'nonmated_agreement': rep['nonmated_mean'], 'eer_new_keys': rep['eer_shared_key_mean']}


def bias_evidence(model, cfg, emb, issame):
    """How much of each group's argmax a trained bias decides: the within-group spread of b
    against that of W.P(x), and the key-change check with b set to zero."""
    from modules.models import trained_iom_layers
    stack = trained_iom_layers(model)
    projection = stack[-2]
    if not projection.use_bias:
        return None
    kernel, bias = (w.copy() for w in projection.get_weights())
    x = emb
    for layer in stack[:-2]:
        x = layer(x, training=False)
    groups = (np.asarray(x) @ kernel).reshape(len(emb), cfg['m'], cfg['q'])
    b = bias.reshape(cfg['m'], cfg['q'])
    out = {'bias_spread': float(b.std(axis=1).mean()),
           'wx_spread': float(groups.std(axis=2).mean()),
           # share of positions whose argmax the bias changes
           'argmax_changed_by_bias': float(np.mean(np.argmax(groups + b, -1) != np.argmax(groups, -1)))}
    projection.set_weights([kernel, np.zeros_like(bias)])
    out['bias_zeroed'] = protection(model, cfg, emb, issame)
    projection.set_weights([kernel, bias])
    return out


def norm_evidence(model, cfg):
    """How far the projection's column norms spread within a group, how often the largest column
    of a group wins its argmax for random directions (chance: 1/q), and how concentrated its
    spectrum is (share of the top singular direction; effective rank, N(0, 1) kernel: ~410)."""
    from modules.models import trained_iom_layers
    kernel = trained_iom_layers(model)[-2].get_weights()[0]
    m, q = cfg['m'], cfg['q']
    norms = np.linalg.norm(kernel, axis=0).reshape(m, q)
    rel = norms / norms.mean(axis=1, keepdims=True)
    z = np.random.default_rng(0).standard_normal((2000, kernel.shape[0])).astype(np.float32)
    wins = np.argmax((z @ kernel).reshape(-1, m, q), -1) == np.argmax(norms, -1)[None]
    power = np.linalg.svd(kernel, compute_uv=False) ** 2
    return {'column_norm_spread': float(rel.std(axis=1).mean()),
            'largest_over_mean': float(rel.max(axis=1).mean()),
            'largest_column_wins': float(wins.mean()),
            'top_direction_share': float(power[0] / power.sum()),
            'effective_rank': float(power.sum() ** 2 / (power ** 2).sum())}


def run_row(base, label, overrides, index, test, out):
    """Train one row's stage 2 (sharing the embedding cache) and measure it on every set."""
    from modules.config import STAGE2_REQUIRED, checkpoint_dir, validate_config
    from modules.evaluations import pair_distances
    from modules.models import iom_codes, load_iom_model
    from modules.training import train_stage2
    cfg = validate_config({**base, **ROW_BASE, **overrides,
                           'sub_name': f"{base['sub_name']}_row{index}"},
                          label, STAGE2_REQUIRED)
    shared = os.path.join(checkpoint_dir(base), 'embedding_cache.npz')
    shutil.rmtree(checkpoint_dir(cfg), ignore_errors=True)
    os.makedirs(checkpoint_dir(cfg))
    if os.path.isfile(shared):
        shutil.copy(shared, checkpoint_dir(cfg))
    summary = train_stage2(cfg)
    if not os.path.isfile(shared):
        os.makedirs(checkpoint_dir(base), exist_ok=True)
        shutil.copy(os.path.join(checkpoint_dir(cfg), 'embedding_cache.npz'), shared)
    model = load_iom_model(cfg, verbose=False)
    row = {'label': label, 'config': overrides, 'monitor': summary.get('monitor'), 'sets': {},
           'norm_evidence': norm_evidence(model, cfg)}
    for name, (emb, issame) in test.items():
        learned = iom_codes(model, emb)
        rand = random_iom(emb, cfg['m'], cfg['q'])
        row['sets'][name] = {
            'float': metrics(pair_distances(emb[0::2], emb[1::2], 'cosine'), issame),
            'learned': metrics(pair_distances(learned[0::2], learned[1::2], 'Hamming'), issame),
            'random': metrics(pair_distances(rand[0::2], rand[1::2], 'Hamming'), issame),
            'protection': protection(model, cfg, emb, issame),
            'bias_evidence': bias_evidence(model, cfg, emb, issame)}
    with open(os.path.join(out, f'row{index}.json'), 'w') as fh:
        json.dump(row, fh, indent=1, default=float)
    return row


def format_rows(rows, name):
    """Markdown table of one set."""
    head = ('| # | config | float acc / EER | learned acc / EER / TAR@1e-3 | random acc / EER / '
            'TAR@1e-3 | key_change_ok | revocability | zero-effort | non-mated (1/q) |')
    lines = [head, '|' + '---|' * 9]
    for i, r in rows:
        s = r['sets'][name]
        f, lo, ra, p = s['float'], s['learned'], s['random'], s['protection']
        lines.append(
            f"| {i} | {r['label']} | {f['accuracy']:.4f} / {f['eer']:.4f} | {lo['accuracy']:.4f} / "
            f"{lo['eer']:.4f} / {lo['tar_far1e-3']:.3f} | {ra['accuracy']:.4f} / {ra['eer']:.4f} / "
            f"{ra['tar_far1e-3']:.3f} | {str(p['key_change_ok']).lower()} | "
            f"{p['revocability']:.4f} | {p['zero_effort']:.4f} | {p['nonmated_agreement']:.4f} |")
    return '\n'.join(lines)


@cli_guard
def main(argv):
    """Run the grid rows, print one table per set."""
    del argv
    quiet_tensorflow()
    from modules.config import STAGE2_REQUIRED, load_config
    from modules.evaluations import extract_embeddings
    from modules.models import arcface_from_config, load_backbone_weights
    from modules.testsets import load_verification_set
    base = load_config(FLAGS.base_cfg, STAGE2_REQUIRED)
    picks = range(len(GRID)) if not FLAGS.rows else [int(i) for i in FLAGS.rows.split(',')]
    if any(not 0 <= i < len(GRID) for i in picks):
        raise UserError(f'--rows must be in 0..{len(GRID) - 1}')
    net = arcface_from_config(base, use_pretrain=False)
    if load_backbone_weights(net, base) is None:
        raise UserError(f"no stage-1 checkpoint for {base['stage1_sub_name']}")
    test = {}
    for name in FLAGS.sets.split(','):
        images, issame = load_verification_set(base['test_dataset'], name)
        test[name] = (extract_embeddings(net, images, batch_size=base['eval_batch_size']),
                      np.asarray(issame, bool))
    os.makedirs(FLAGS.out, exist_ok=True)
    rows = [(i, run_row(base, *GRID[i], i, test, FLAGS.out)) for i in picks]
    for name in test:
        print(f'\n{name} (held-out fold)\n' + format_rows(rows, name))
    with open(os.path.join(FLAGS.out, 'sweep.json'), 'w') as fh:
        json.dump([r for _, r in rows], fh, indent=1, default=float)


if __name__ == '__main__':
    define_flags()
    app.run(main)
