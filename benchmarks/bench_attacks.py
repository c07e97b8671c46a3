"""Benchmark: seconds per victim of the stolen-key pre-image attacks at m=512, q=8.

A trained-size IoM stack without hidden layers (512-d embedding -> Dense(m*q) -> IoMHead, random
N(0, 1) projection, a random 128-bit key) hashes clustered synthetic embeddings; the linear
program (one HiGHS solve per victim) and the gradient search (all victims in one batch) invert
the codes. The figure is the wall time of each attack divided by the number of victims, the
median of `--rounds` rounds (the gradient search's tracing, timed as a one-step run, is left out),
and the share of codes reproduced exactly. A '3' stack (two hidden layers) is timed for the gradient
attack only: the linear program does not apply to it.

    .venv/bin/python benchmarks/bench_attacks.py [--victims 20] [--rounds 3]
"""
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_integer('m', 512, 'number of groups')
flags.DEFINE_integer('q', 8, 'indices per group')
flags.DEFINE_integer('victims', 20, 'victims per round')
flags.DEFINE_integer('lp_victims', 5, 'victims of the linear program per round (seconds each)')
flags.DEFINE_integer('rounds', 3, 'timed rounds')
FLAGS = flags.FLAGS


def time_attack(run, stack, codes, setup=None):
    """(median seconds per victim, per-round seconds, share of codes reproduced) of `run()`.

    `setup()`, when given, is the attack's fixed cost (tracing), timed in the same round and
    subtracted, so the figure is the steady-state cost per victim.
    """
    times, exact = [], []
    for _ in range(FLAGS.rounds):
        start = time.perf_counter()
        fixed = 0.0
        if setup is not None:
            setup()
            fixed = time.perf_counter() - start
            start = time.perf_counter()
        found = run()
        times.append((time.perf_counter() - start - fixed) / len(codes))
        exact.append(np.mean((stack.codes(found) == codes).all(axis=1)))
    return float(np.median(times)), times, float(np.mean(exact))


def main(_):
    """Time both attacks on a linear stack and the gradient attack on a '3' stack."""
    from modules.protection.attacks import gradient_preimage, lp_preimage, random_key
    from tests.test_attacks import built_stack, clustered, stack_cfg
    rng = np.random.default_rng(0)
    x, _ = clustered(FLAGS.victims, 1, d=512)
    radius = float(np.median(np.linalg.norm(x, axis=1)))
    low, high = np.percentile(x, [0.5, 99.5], axis=0)
    print(f'm={FLAGS.m} q={FLAGS.q}, 512-d embeddings, {FLAGS.victims} victims (linear program: '
          f'{FLAGS.lp_victims}), {FLAGS.rounds} rounds (median)')
    for remark in ('1', '3'):
        stack = built_stack(stack_cfg(remark, m=FLAGS.m, q=FLAGS.q), d=512, key=random_key(rng))
        codes = stack.codes(x)
        # One step of a fresh search: its tracing, the fixed cost of every run.
        figures = {'gradient': time_attack(
            lambda s=stack, c=codes: gradient_preimage(s, c, radius), stack, codes,
            setup=lambda s=stack, c=codes: gradient_preimage(s, c, radius, steps=1))}
        if remark == '1':
            figures['lp'] = time_attack(
                lambda s=stack, c=codes[:FLAGS.lp_victims]: np.stack(
                    [lp_preimage(s, v, low, high)[0] for v in c]), stack, codes[:FLAGS.lp_victims])
        for name, (median, times, exact) in figures.items():
            print(f"  hidden_layer_remark '{remark}' {name:9s} {median:7.3f} s per victim "
                  f'[{", ".join(f"{t:.3f}" for t in times)}]  codes reproduced {exact:.2f}')


if __name__ == '__main__':
    app.run(main)
