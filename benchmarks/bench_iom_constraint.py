"""Benchmark: the cost of the IoM projection's kernel constraint in a stage-2 training step.

One SGD step of projection + IoMHead on a batch of cached embeddings (d=512, m=256, q=8, batch
120, the defaults of configs/quickstart_stage2.yaml), inside a tf.function, for the three kernels
stage 2 can train: free (the seed's), orthonormal groups, and orthonormal groups in a tight frame
(the default). Variants are timed interleaved, in rounds; the median of the rounds is printed as
ms per step and as a ratio to the free kernel. Training on cached embeddings is nothing but these
steps, so the ratio is what the constraint costs stage 2 there.

    .venv/bin/python benchmarks/bench_iom_constraint.py [--rounds 5] [--iters 20]
"""
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from modules.layers import IoMHead, IoMProjection  # noqa: E402

flags.DEFINE_integer('d', 512, 'embedding size')
flags.DEFINE_integer('m', 256, 'number of groups')
flags.DEFINE_integer('q', 8, 'indices per group')
flags.DEFINE_integer('batch', 120, 'batch size')
flags.DEFINE_integer('iters', 20, 'steps per round of each variant')
flags.DEFINE_integer('rounds', 5, 'timed rounds')
FLAGS = flags.FLAGS
VARIANTS = {'free kernel': (False, False), 'orthonormal groups': (True, False),
            'groups + tight frame (default)': (True, True)}


def make_step(orthogonal_groups, tight_frame):
    """A compiled SGD step of a fresh projection + head with the given kernel constraint."""
    proj = IoMProjection(FLAGS.m, FLAGS.q, seed=0, use_bias=False,
                         orthogonal_groups=orthogonal_groups, tight_frame=tight_frame)
    head = IoMHead(FLAGS.m, FLAGS.q)
    optimizer = tf.keras.optimizers.SGD(0.1)
    head(proj(tf.zeros((1, FLAGS.d))))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(head(proj(x), training=True)))
        optimizer.apply_gradients(zip(tape.gradient(loss, proj.trainable_variables),
                                      proj.trainable_variables))
        return loss
    return step


def main(argv):
    """Time the variants interleaved and print ms per step and the ratio to the free kernel."""
    del argv
    x = tf.constant(np.random.default_rng(0).standard_normal((FLAGS.batch, FLAGS.d)), tf.float32)
    steps = {name: make_step(*flags_) for name, flags_ in VARIANTS.items()}
    for step in steps.values():
        step(x)  # trace
    times = {name: [] for name in steps}
    for _ in range(FLAGS.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(FLAGS.iters):
                loss = step(x)
            loss.numpy()
            times[name].append((time.perf_counter() - start) / FLAGS.iters * 1e3)
    base = np.median(times['free kernel'])
    print(f'd={FLAGS.d}, m={FLAGS.m}, q={FLAGS.q}, batch {FLAGS.batch}; median of '
          f'{FLAGS.rounds} rounds of {FLAGS.iters} steps')
    for name, ms in times.items():
        print(f'{name:32s} {np.median(ms):8.2f} ms/step  x{np.median(ms) / base:.1f}')


if __name__ == '__main__':
    app.run(main)
