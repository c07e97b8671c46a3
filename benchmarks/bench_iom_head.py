"""Benchmark: IoMHead soft indices (reshape + softmax) against a per-group Python loop.

Times forward + backward (gradient of the summed soft indices w.r.t. the (batch, m*q) input) at
m=512, q=8, batch 240, each inside a tf.function: IoMHead as used in training (XLA-fused), IoMHead
without XLA, and the per-group loop (how the original research code computed the head: slice each
group's q logits, softmax, weighted sum, tf.stack over the m groups), which also runs eagerly.
All variants are first checked to give the same indices and gradients.

    .venv/bin/python benchmarks/bench_iom_head.py [--rounds 5] [--eager_iters 0]
"""
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from modules.layers import IoMHead  # noqa: E402

flags.DEFINE_integer('m', 512, 'number of groups')
flags.DEFINE_integer('q', 8, 'indices per group')
flags.DEFINE_integer('batch', 240, 'batch size')
flags.DEFINE_float('T', 1.0, 'softmax temperature')
flags.DEFINE_integer('iters', 20, 'iterations per round of each vectorised head')
flags.DEFINE_integer('loop_iters', 3, 'iterations per round of the looped head, tf.function')
flags.DEFINE_integer('eager_iters', 1, 'iterations per round of the eager loop (0: skip)')
flags.DEFINE_integer('rounds', 5, 'timed rounds')
FLAGS = flags.FLAGS


def loop_soft_indices(x, m, q, T):
    """Reference head with one slice/softmax/sum per group, stacked: the slow way."""
    idx = tf.range(q, dtype=tf.float32)
    outs = []
    for i in range(m):
        p = tf.nn.softmax(x[:, i * q:(i + 1) * q] / T, axis=-1)
        outs.append(tf.reduce_sum(p * idx, axis=1))
    return tf.stack(outs, axis=1)


def forward_backward(fn):
    """Wrap `fn(x) -> soft indices` into a step returning (indices, d sum / d x)."""

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            s = fn(x)
            loss = tf.reduce_sum(s)
        return s, tape.gradient(loss, x)

    return step


def time_rounds(steps, x, rounds):
    """Median and best ms per call of each step over interleaved timed rounds.

    The machine is shared, so each round times every step back to back and the median over the
    rounds is reported: a burst of foreign load then hits one round, not one implementation.
    """
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (step, iters) in steps.items():
            start = time.perf_counter()
            for _ in range(iters):
                _, g = step(x)
                g.numpy()  # forces completion before the clock stops
            samples[name].append((time.perf_counter() - start) / iters * 1e3)
    return {name: (float(np.median(v)), min(v)) for name, v in samples.items()}


def first_call_seconds(step, x):
    """Seconds of the first call: tracing (and XLA compilation) included."""
    start = time.perf_counter()
    step(x)[1].numpy()
    return time.perf_counter() - start


def main(_):
    """Check the heads agree, then time them and print ms per iteration and the ratios."""
    m, q, T = FLAGS.m, FLAGS.q, FLAGS.T
    x = tf.constant(np.random.default_rng(0).normal(size=(FLAGS.batch, m * q)).astype(np.float32))
    xla_head = IoMHead(m, q, T=T)
    tf_head = IoMHead(m, q, T=T, jit_compile=False)
    loop = forward_backward(lambda z: loop_soft_indices(z, m, q, T))
    steps = {
        'IoMHead (default: XLA-fused), tf.function':
            (tf.function(forward_backward(lambda z: xla_head(z, training=True))), FLAGS.iters),
        'IoMHead(jit_compile=False),   tf.function':
            (tf.function(forward_backward(lambda z: tf_head(z, training=True))), FLAGS.iters),
        'per-group loop + tf.stack,    tf.function': (tf.function(loop), FLAGS.loop_iters),
    }
    if FLAGS.eager_iters > 0:
        steps['per-group loop + tf.stack,    eager      '] = (loop, FLAGS.eager_iters)

    print(f'IoMHead forward+backward (soft indices, d/d input), input ({FLAGS.batch}, {m * q}), '
          f'm={m}, q={q}, T={T}; {FLAGS.rounds} interleaved rounds')
    s_ref, g_ref = None, None
    for name, (step, _) in steps.items():
        seconds = first_call_seconds(step, x)
        s, g = step(x)
        if s_ref is None:
            s_ref, g_ref = s.numpy(), g.numpy()
        else:  # every variant computes the same indices and gradient
            np.testing.assert_allclose(s.numpy(), s_ref, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(g.numpy(), g_ref, rtol=1e-4, atol=1e-5)
        print(f'  first call (trace/compile) of {name:44s} {seconds:6.2f} s')
    timings = time_rounds(steps, x, FLAGS.rounds)
    base = timings[next(iter(steps))][0]
    print(f'  {"variant":44s} {"median ms":>10s} {"best ms":>9s} {"/ default":>10s}')
    for name, (median, best) in timings.items():
        print(f'  {name:44s} {median:10.3f} {best:9.3f} {median / base:9.1f}x')
    loop_ms = timings['per-group loop + tf.stack,    tf.function'][0]
    print(f'speed-up of IoMHead over the per-group loop (both tf.function, medians): '
          f'{loop_ms / base:.1f}x (without XLA: '
          f'{loop_ms / timings["IoMHead(jit_compile=False),   tf.function"][0]:.1f}x)')


if __name__ == '__main__':
    app.run(main)
