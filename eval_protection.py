"""Template-protection evidence for a stage-2 IoM model: unlinkability, revocability, EER, attacks.

The backbone embeddings of one verification set are computed once; the IoM layers then hash them
under several random permutation keys (and without permutation). Prints a table and writes
logs/<sub_name>/protection_<set>.json and unlinkability_<set>.png. With --attacks it also runs
the stolen-key attacks of modules/protection/attacks.py and writes protection_attacks.json and
protection_attacks.png (Hamming-distance histograms after re-keying). With --online it runs,
instead, the online attacks of a client token against serve.py, which it starts on 127.0.0.1
(modules/protection/online.py), and writes protection_online.json.
"""
import json
import os

import numpy as np
from absl import app, flags

from modules import script_flags
from modules.config import STAGE2_REQUIRED, load_config, log_dir
from modules.utils import UserError, atomic_output, cli_guard, quiet_tensorflow

script_flags.define(2, 'stage-2 config file path', gpu=True)
flags.adopt_module_key_flags(script_flags)  # listed by --help as the script's own
flags.DEFINE_enum('set', 'lfw', ['lfw', 'agedb_30', 'cfp_fp'], 'verification set to use')
flags.DEFINE_integer('num_keys', 5, 'random permutation keys to hash under (at least 2)')
flags.DEFINE_integer('seed', 0, 'seed of the random keys')
flags.DEFINE_integer('bins', 100, 'histogram bins for the score densities')
flags.DEFINE_integer('zero_effort', 2000, 'random embeddings (real norms, random directions) '
                     'tried against every enrolled code for the zero-effort rate')
flags.DEFINE_bool('attacks', False, 'also run the stolen-key attacks (pre-image, replay after '
                  'revocation, linkage, de-anonymisation)')
flags.DEFINE_integer('victims', 200, 'attacks: genuine pairs attacked (at most the set has)')
flags.DEFINE_integer('attack_keys', 5, 'attacks: new keys the victims are re-enrolled under')
flags.DEFINE_list('far', [], 'attacks: also report at the thresholds of these false-accept rates')
flags.DEFINE_bool('online', False, 'run only the online attacks of a client token (score '
                  'hill-climbing, decision-only search, identify probing) against serve.py, '
                  'started here on 127.0.0.1: scores exposed without limits, then the defaults')
flags.DEFINE_integer('online_budget', 5000, 'online: requests per attack and subject',
                     lower_bound=1)
flags.DEFINE_integer('online_subjects', 10, 'online: subjects enrolled and attacked (from the '
                     "set's genuine pairs)", lower_bound=1)
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
        ('zero-effort accept rate', f"{report['zero_effort_rate']:.4f} ({report['zero_effort_n']} "
                                    'random embeddings x every code)'),
        ('codes valid under a new key', 'yes' if report['key_change_ok'] else 'NO'),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f'Template protection on {set_name}', '-' * (width + 20)]
    lines += [f'{name:<{width}}  {value}' for name, value in rows]
    lines += [f'  WARNING: {reason}' for reason in report['key_change_problems']]
    return '\n'.join(lines)


ATTACK_ROWS = (
    ('same_key_code_match', 'same code reproduced (stolen key)'),
    ('same_key_accept', 'accepted, stolen key'),
    ('same_key_accept_genuine_probe', 'accepted vs template of another photo'),
    ('cross_key_accept_same_image', 'accepted after re-keying (same photo)'),
    ('cross_key_accept_other_image', 'accepted after re-keying (other photo)'),
    ('cosine_mean', 'cosine to the true embedding (mean)'),
    ('cosine_min', 'cosine to the true embedding (min)'),
    ('rank1', 'rank-1 among float embeddings'),
    ('seconds_per_victim', 'seconds per victim'),
)
BASELINE_ROWS = (
    ('genuine_accept_cross_key', 'genuine user, new key'),
    ('impostor_accept', 'impostor, new key'),
    ('wrong_key_accept', 'attacker with a wrong key'),
    ('stolen_code_replay_accept', 'stolen code replayed after re-keying'),
    ('cosine_same_person', 'cosine, another photo of the person'),
    ('cosine_other_person', 'cosine, another person'),
    ('wrong_key_cosine_mean', 'cosine, wrong-key pre-image'),
    ('rank1_true_embedding', 'rank-1 of the true embedding'),
)


def format_attack_table(report):
    """Text table of the attack report: one column per attack, one block per threshold."""
    attacks = [a for a in ('lp', 'gradient') if a in report]
    points = [report, *report['at_far'].values()]
    lines = [f"Stolen-key attacks: {report['victims']} victims, m={report['m']} q={report['q']}, "
             f"{report['attack_keys']} new keys; accept when {report['accept_rule']}"]
    for point in points:
        lines.append(f"-- threshold {point['threshold']:g} ({point['threshold_source']})")
        lines.append(f"{'':42s}" + ''.join(f'{a:>10s}' for a in attacks))
        for key, text in ATTACK_ROWS:
            lines.append(f'{text:42s}' + ''.join(f'{point[a][key]:10.3f}' for a in attacks))
        for key, text in BASELINE_ROWS:
            lines.append(f'{text:42s}{point["baselines"][key]:10.3f}')
    if 'linkage' in report:
        link = report['linkage']
        lines.append(f"-- linkage of two codes of one person under two keys: D_sys "
                     f"{link['d_sys_keys_known']:.3f} with both keys known (pre-images compared), "
                     f"{link['d_sys_keys_unknown']:.3f} without keys (codes compared)")
    return '\n'.join(lines)


def plot_attack_histograms(histograms, m, threshold, path):
    """Save the Hamming-distance histograms under the new keys (genuine, impostor, attacks)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from modules.utils import atomic_path
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        bins = np.arange(0, m + 2) - 0.5
        for name, values in histograms.items():
            ax.hist(values, bins=bins, density=True, histtype='step', linewidth=1.5,
                    label=f'{name} (n={len(values)})')
        ax.axvline(threshold, color='black', linestyle='--', label=f'threshold {threshold:g}')
        ax.set_xlabel(f'Hamming distance to the re-enrolled template (of {m})')
        ax.set_ylabel('density')
        ax.set_title('After re-keying: genuine, impostor and stolen-key pre-images')
        ax.legend(fontsize='small')
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format='png', dpi=120)
    finally:
        plt.close(fig)


@cli_guard
def main(_):
    """Embed the set once, hash under random keys, measure and report."""
    cfg = load_config(FLAGS.cfg_path, STAGE2_REQUIRED)
    if FLAGS.num_keys < 2:
        raise UserError(f'--num_keys must be at least 2, got {FLAGS.num_keys}')
    fars = _fars(FLAGS.far)
    if FLAGS.bins < 1:
        raise UserError(f'--bins must be positive, got {FLAGS.bins}')
    if FLAGS.online:
        return run_online(cfg)
    quiet_tensorflow()
    from modules import evaluations as ev
    from modules import testsets
    from modules.models import (
        iom_codes,
        load_iom_model,
        stack_codes,
        trained_iom_layers,
        with_perm_key,
    )
    from modules.protection.measures import (
        evaluate_protection,
        key_change_verdict,
        like_real_embeddings,
        plot_unlinkability,
        zero_effort_rate,
    )
    from modules.training import configure_devices

    configure_devices(FLAGS.gpu)
    images, issame = testsets.load_verification_set(cfg['test_dataset'], FLAGS.set)
    model = load_iom_model(cfg)
    embeddings = ev.extract_embeddings(model.get_layer('arcface_model'), images,
                                       cfg['eval_batch_size'], cfg['is_flip'], cfg['is_ccrop'])
    # The plain codes: the model's layers with the identity in place of its own permutation
    # (the config's perm_key may have set one).
    plain = stack_codes(with_perm_key(trained_iom_layers(model), None), embeddings)
    rng = np.random.default_rng(FLAGS.seed)
    keys = [int(k) for k in rng.choice(2 ** 31 - 1, size=FLAGS.num_keys, replace=False)]
    codes = [iom_codes(model, embeddings, perm_key=key) for key in keys]

    report = evaluate_protection(codes, plain, issame, bins=FLAGS.bins)
    probes = like_real_embeddings(embeddings, FLAGS.zero_effort, FLAGS.seed)
    report['zero_effort_rate'] = zero_effort_rate(iom_codes(model, probes, perm_key=keys[0]),
                                                  codes[0], report['threshold'])
    report['zero_effort_n'] = FLAGS.zero_effort
    ok, problems, tolerance = key_change_verdict(report, q=cfg['q'])
    report.update(key_change_ok=ok, key_change_problems=problems, eer_tolerance=tolerance)
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
    if FLAGS.attacks:
        run_attacks(cfg, model, embeddings, issame, fars, out_dir)


def _fars(values):
    """The --far list as floats in (0, 1); UserError naming a bad entry."""
    fars = []
    for text in values:
        try:
            far = float(text)
        except ValueError:
            raise UserError(f'--far: {text!r} is not a number') from None
        if not 0 < far < 1:
            raise UserError(f'--far: {text} must lie in (0, 1)')
        fars.append(far)
    return fars


def run_attacks(cfg, model, embeddings, issame, fars, out_dir):
    """Run the stolen-key attacks, print their table, write the JSON and the histogram plot."""
    from modules.protection.attacks import attack_report
    if FLAGS.victims < 2 or FLAGS.attack_keys < 1:
        raise UserError('--victims must be at least 2 and --attack_keys at least 1')
    report = attack_report(model, embeddings, issame, FLAGS.victims, FLAGS.attack_keys,
                                 fars, seed=FLAGS.seed)
    print(format_attack_table(report))
    plot_path = os.path.join(out_dir, 'protection_attacks.png')
    plot_attack_histograms(report.pop('histograms'), report['m'], report['threshold'], plot_path)
    report.update(set=FLAGS.set, cfg_path=FLAGS.cfg_path, plot=plot_path)
    json_path = os.path.join(out_dir, 'protection_attacks.json')
    with atomic_output(json_path, 'w') as fh:
        json.dump(report, fh, indent=2, default=float)
    print(f'[*] wrote {json_path}')
    print(f'[*] wrote {plot_path}')


def run_online(cfg):
    """Run the online attacks against a service started here; print the table, write the JSON."""
    from modules import testsets
    from modules.protection.online import format_online_table
    from modules.protection.testbed import evaluate_online
    images, issame = testsets.load_verification_set(cfg['test_dataset'], FLAGS.set)
    print(f'[*] online attacks on {FLAGS.online_subjects} subjects of {FLAGS.set}, '
          f'{FLAGS.online_budget} requests each: starting serve.py on 127.0.0.1', flush=True)
    report = evaluate_online(FLAGS.cfg_path, images, issame, FLAGS.online_subjects,
                             FLAGS.online_budget, FLAGS.seed)
    print(format_online_table(report))
    report.update(set=FLAGS.set, cfg_path=FLAGS.cfg_path)
    json_path = os.path.join(log_dir(cfg), 'protection_online.json')
    with atomic_output(json_path, 'w') as fh:
        json.dump(report, fh, indent=2, default=float)
    print(f'[*] wrote {json_path}')


if __name__ == '__main__':
    app.run(main)
