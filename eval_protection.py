"""Template-protection evidence for a stage-2 IoM model: unlinkability, revocability, EER.

The backbone embeddings of one verification set are computed once; the IoM layers then hash them
under several random permutation keys (and without permutation). Prints a table and writes
logs/<sub_name>/protection_<set>.json and unlinkability_<set>.png.
"""
import json
import os

import numpy as np
from absl import app, flags

from modules.utils import (
    STAGE2_REQUIRED,
    UserError,
    atomic_output,
    cli_guard,
    load_config,
    log_dir,
    quiet_tensorflow,
)

flags.DEFINE_string('cfg_path', './configs/config_15/cfg15_allloss_res100_512x8.yaml',
                    'stage-2 config file path')
flags.DEFINE_enum('set', 'lfw', ['lfw', 'agedb_30', 'cfp_fp'], 'verification set to use')
flags.DEFINE_integer('num_keys', 5, 'random permutation keys to hash under (at least 2)')
flags.DEFINE_integer('seed', 0, 'seed of the random keys')
flags.DEFINE_integer('bins', 100, 'histogram bins for the score densities')
flags.DEFINE_string('gpu', None, "GPUs to use, e.g. '0' (default: all visible)")
FLAGS = flags.FLAGS


def format_protection_table(report, set_name):
    """Small text table of the protection numbers."""
    rows = [
        ('keys / pairs', f"{report['num_keys']} / {report['num_pairs']}"),
        ('D_sys (mated: genuine pairs)', f"{report['d_sys']:.4f}"),
        ('D_sys (mated: same image)', f"{report['d_sys_same_sample']:.4f}"),
        ('mean score mated / non-mated', f"{report['mated_mean']:.4f} / "
                                         f"{report['nonmated_mean']:.4f}"),
        ('threshold (Hamming, accept d < t)', f"{report['threshold']:.2f} of {report['m']}"),
        ('TAR / FAR same key at threshold', f"{report['tar_same_key']:.4f} / "
                                            f"{report['far_same_key']:.4f}"),
        ('revocability rate (genuine pairs)', f"{report['revocability_rate']:.4f}"),
        ('revocability rate (same image)', f"{report['revocability_rate_same_sample']:.4f}"),
        ('EER shared key (key 1)', f"{report['eer_shared_key']:.4f}"),
        ('EER shared key (mean +- std)', f"{report['eer_shared_key_mean']:.4f} +- "
                                         f"{report['eer_shared_key_std']:.4f}"),
        ('EER without permutation', f"{report['eer_plain']:.4f}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f'Template protection on {set_name}', '-' * (width + 20)]
    lines += [f'{name:<{width}}  {value}' for name, value in rows]
    return '\n'.join(lines)


@cli_guard
def main(_):
    """Embed the set once, hash under random keys, measure and report."""
    cfg = load_config(FLAGS.cfg_path, STAGE2_REQUIRED)
    if FLAGS.num_keys < 2:
        raise UserError(f'--num_keys must be at least 2, got {FLAGS.num_keys}')
    if FLAGS.bins < 1:
        raise UserError(f'--bins must be positive, got {FLAGS.bins}')
    quiet_tensorflow()
    from modules import evaluations as ev
    from modules import testsets
    from modules.models import iom_codes, load_iom_model
    from modules.protection import evaluate_protection, plot_unlinkability
    from modules.training import configure_devices

    configure_devices(FLAGS.gpu)
    images, issame = testsets.load_verification_set(cfg['test_dataset'], FLAGS.set)
    model = load_iom_model(cfg)
    embeddings = ev.extract_embeddings(model.get_layer('arcface_model'), images,
                                       cfg['eval_batch_size'], cfg['is_flip'], cfg['is_ccrop'])
    # The model's own perm_layer may hold the config's perm_key: undo it for the plain codes, so
    # that they are the codes of the unpermuted embedding.
    own_key = model.get_layer('perm_layer').perm_key
    if own_key is None:
        plain = iom_codes(model, embeddings)
    else:
        from modules.layers import key_permutation
        inverse = np.argsort(key_permutation(own_key, embeddings.shape[1]))
        plain = iom_codes(model, embeddings[:, inverse])
    rng = np.random.default_rng(FLAGS.seed)
    keys = [int(k) for k in rng.choice(2 ** 31 - 1, size=FLAGS.num_keys, replace=False)]
    codes = [iom_codes(model, embeddings, perm_key=key) for key in keys]

    report = evaluate_protection(codes, plain, issame, bins=FLAGS.bins)
    print(f"IoM codes m={cfg['m']} q={cfg['q']}, {len(issame)} pairs of {FLAGS.set}")
    print(format_protection_table(report, FLAGS.set))

    out_dir = log_dir(cfg)
    scores = report.pop('scores')
    plot_path = os.path.join(out_dir, f'unlinkability_{FLAGS.set}.png')
    plot_unlinkability(scores['mated'], scores['nonmated'], scores['s'], scores['d_local'],
                       report['d_sys'], plot_path)
    report.update(set=FLAGS.set, keys=keys, q=cfg['q'], cfg_path=FLAGS.cfg_path,
                  loaded_from=getattr(model, 'loaded_from', None), plot=plot_path)
    json_path = os.path.join(out_dir, f'protection_{FLAGS.set}.json')
    with atomic_output(json_path, 'w') as fh:
        json.dump(report, fh, indent=2, default=float)
    print(f'[*] wrote {json_path}')
    print(f'[*] wrote {plot_path}')


if __name__ == '__main__':
    app.run(main)
