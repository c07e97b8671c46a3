"""Benchmark: IoMHead soft indices (reshape + softmax) against a per-group Python loop.

Times forward + backward (gradient of the summed soft indices w.r.t. the (batch, m*q) input) at
m=512, q=8, batch 240, each inside a tf.function, and the loop also eagerly. The loop is how the
original research code computed the head: slice each group's q logits, softmax, weighted sum,
tf.stack over the m groups.

    .venv/bin/python benchmarks/bench_iom_head.py [--iters 30] [--eager_iters 2]
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
flags.DEFINE_integer('iters', 30, 'timed iterations of the vectorised head')
flags.DEFINE_integer('loop_iters', 10, 'timed iterations of the looped head in a tf.function')
flags.DEFINE_integer('eager_iters', 2, 'timed iterations of the eager loop (0: skip)')
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


def time_step(step, x, iters):
    """(first call seconds incl. tracing, mean ms per later call)."""
    start = time.perf_counter()
    _, g = step(x)
    g.numpy()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        _, g = step(x)
        g.numpy()  # forces completion before the clock stops
    return first, (time.perf_counter() - start) / iters * 1e3


def main(_):
    """Check both heads agree, then time them and print ms per iteration and the ratios."""
    m, q, T = FLAGS.m, FLAGS.q, FLAGS.T
    x = tf.constant(np.random.default_rng(0).normal(size=(FLAGS.batch, m * q)).astype(np.float32))
    head = IoMHead(m, q, T=T)
    vec = forward_backward(lambda z: head(z, training=True))
    loop = forward_backward(lambda z: loop_soft_indices(z, m, q, T))
    vec_fn, loop_fn = tf.function(vec), tf.function(loop)

    s_vec, g_vec = vec_fn(x)
    s_loop, g_loop = loop_fn(x)
    np.testing.assert_allclose(s_vec.numpy(), s_loop.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_vec.numpy(), g_loop.numpy(), rtol=1e-4, atol=1e-6)

    print(f'IoMHead forward+backward, input ({FLAGS.batch}, {m * q}), m={m}, q={q}, T={T}, '
          f'CPU threads: inter {tf.config.threading.get_inter_op_parallelism_threads()}, '
          f'intra {tf.config.threading.get_intra_op_parallelism_threads()} (0 = all cores)')
    _, vec_ms = time_step(vec_fn, x, FLAGS.iters)
    print(f'  vectorised (reshape + softmax), tf.function: {vec_ms:9.3f} ms/iter')
    _, loop_ms = time_step(loop_fn, x, FLAGS.loop_iters)
    print(f'  per-group loop + tf.stack,      tf.function: {loop_ms:9.3f} ms/iter'
          f'   ratio {loop_ms / vec_ms:6.1f}x')
    if FLAGS.eager_iters > 0:
        _, eager_ms = time_step(loop, x, FLAGS.eager_iters)
        print(f'  per-group loop + tf.stack,      eager:       {eager_ms:9.3f} ms/iter'
              f'   ratio {eager_ms / vec_ms:6.1f}x')
        _, vec_eager_ms = time_step(vec, x, FLAGS.iters)
        print(f'  vectorised (reshape + softmax), eager:       {vec_eager_ms:9.3f} ms/iter')


if __name__ == '__main__':
    app.run(main)
