"""Partial FC against the full ArcFace head: head + loss step time and memory per replica.

For each class count: the full ArcHead (ArcMarginPenaltyLogists, softmax cross-entropy, gradients
of embeddings and centres, Keras Nesterov-SGD update of the whole matrix) on one CPU device, and
Partial FC over 2 logical CPU devices at each sample rate (sampling, all-gathers, global softmax,
gradients, update of the sampled rows). Embeddings are fixed random (global batch x embd), labels
random; the backbone is left out. Variants are interleaved round by round after two warm-up
steps each; the figure is the median over the rounds.

Memory per replica: centres + momentum and the (batch x scored classes) logit matrix from their
sizes, and the peak of TensorFlow's CPU allocator during one step
(tf.config.experimental.get_memory_info; on logical CPU devices it is the process's host allocator,
so a Partial FC peak counts both replicas: halve it for one). A variant whose estimated host
memory exceeds --budget_gib is not run; its row gives the figure from the sizes instead.

    python benchmarks/bench_partial_fc.py [--classes 100000,500000,2000000] [--rounds 5]
"""
import copy
import gc
import math
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string('classes', '100000,500000,2000000', 'class counts, comma separated')
flags.DEFINE_string('rates', '1.0,0.3,0.1', 'Partial FC sample rates, comma separated')
flags.DEFINE_integer('embd', 512, 'embedding size')
flags.DEFINE_integer('batch', 128, 'global batch')
flags.DEFINE_integer('rounds', 5, 'timed rounds (one step of every variant per round)')
flags.DEFINE_float('budget_gib', 12.5, 'skip a variant whose estimated host memory exceeds this '
                   '(or the host\'s free memory less 2 GiB)')
FLAGS = flags.FLAGS

REPLICAS = 2
GIB, MIB = 2.0 ** 30, 2.0 ** 20
# Step peak / logit matrix size measured for the full head at 100k classes here (1183 / 48.8 MiB):
# used to decide what fits and for the rows given from sizes.
LOGIT_COPIES = 24


def full_step(num_classes, embd, labels):
    """One-device full ArcHead: (step function, persistent bytes)."""
    import tensorflow as tf

    from modules.layers import ArcMarginPenaltyLogists
    with tf.device('/CPU:0'):
        layer = ArcMarginPenaltyLogists(num_classes, margin=0.5, logist_scale=64)
        layer.build([(None, embd.shape[1]), (None,)])
        optimizer = tf.keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)
        optimizer.build([layer.w])

    @tf.function
    def step():
        with tf.device('/CPU:0'):
            with tf.GradientTape() as tape:
                tape.watch(embd)
                logits = layer((embd, labels))
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                    tf.cast(labels, tf.int32), logits))
            grad_embd, grad_w = tape.gradient(loss, [embd, layer.w])
            optimizer.apply_gradients([(grad_w, layer.w)])
            return loss + 0.0 * tf.reduce_sum(grad_embd)
    return step


def pfc_step(head, strategy, embd, labels):
    """Partial FC over the strategy's replicas: the step function."""
    import tensorflow as tf
    per = embd.shape[0] // REPLICAS
    dist_embd = strategy.experimental_distribute_values_from_function(
        lambda ctx: embd[ctx.replica_id_in_sync_group * per:][:per])
    dist_labels = strategy.experimental_distribute_values_from_function(
        lambda ctx: labels[ctx.replica_id_in_sync_group * per:][:per])

    def replica(e, y, draw):
        with tf.GradientTape() as tape:
            tape.watch(e)
            loss, rows, index = head.replica_loss(e, y, draw)
        grad_embd, *grad_rows = tape.gradient(loss, [e] + rows)
        head.apply_gradients(index, grad_rows, 0.1)
        return loss + 0.0 * tf.reduce_sum(grad_embd)

    @tf.function
    def step():
        loss = strategy.run(replica, args=(dist_embd, dist_labels, head.draws.read_value()))
        head.draws.assign_add(1)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
    return step


def available_gib():
    """MemAvailable of the host, GiB."""
    with open('/proc/meminfo', encoding='ascii') as fh:
        for line in fh:
            if line.startswith('MemAvailable:'):
                return int(line.split()[1]) * 1024 / GIB
    return float('nan')


def measure(strategy, num_classes, embd, rates, rng):
    """Time every variant that fits for `num_classes`, print its table."""
    import numpy as np
    import tensorflow as tf

    from modules.partial_fc import PartialFCHead
    d, batch = embd.shape[1], embd.shape[0]
    labels = tf.constant(rng.integers(0, num_classes, batch), tf.int64)
    shard = math.ceil(num_classes / REPLICAS)
    # name -> (per-replica centres+momentum bytes, per-replica logit bytes,
    #          host bytes held while the variant exists, host bytes of one step on top)
    variants = {}
    full_centres = 2 * num_classes * d * 4
    full_logits = batch * num_classes * 4
    variants['full'] = (full_centres, full_logits, full_centres,
                        full_centres / 2 + LOGIT_COPIES * full_logits)  # dense gradient
    for rate in rates:
        scored = math.ceil(rate * shard)
        logits = batch * scored * 4
        variants[f'pfc {rate:g}'] = (2 * shard * d * 4, logits, REPLICAS * 2 * shard * d * 4,
                                     REPLICAS * (2 * scored * d * 4 + LOGIT_COPIES * logits))
    # Other processes share this host: never plan beyond what it has free right now. The
    # Partial FC variants share one set of shards; the smallest sample rates go first.
    budget = min(FLAGS.budget_gib, available_gib() - 2.0) * GIB
    run, held, step_peak = [], 0.0, 0.0
    for name in sorted(variants, key=lambda n: (n == 'full', variants[n][3])):
        _, _, hold, step = variants[name]
        more = hold if name == 'full' or not any(r != 'full' for r in run) else 0.0
        if held + more + max(step_peak, step) <= budget:
            run.append(name)
            held, step_peak = held + more, max(step_peak, step)
    run.sort(key=list(variants).index)
    steps, peaks, times = {}, {}, {}
    head = None
    for name in run:
        if name == 'full':
            steps[name] = full_step(num_classes, embd, labels)
        else:
            if head is None:
                head = PartialFCHead(strategy, num_classes, d, sample_rate=1.0)
            variant = copy.copy(head)  # same shards and momentum, another sample rate
            variant.sample_rate = float(name.split()[1])
            variant.num_sampled = math.ceil(variant.sample_rate * variant.shard_size)
            steps[name] = pfc_step(variant, strategy, embd, labels)
        for _ in range(2):  # trace and warm up
            float(steps[name]())
        tf.config.experimental.reset_memory_stats('CPU:0')
        held = tf.config.experimental.get_memory_info('CPU:0')['current']
        float(steps[name]())
        transient = tf.config.experimental.get_memory_info('CPU:0')['peak'] - held
        peaks[name] = transient / (1 if name == 'full' else REPLICAS)
        times[name] = []
    for _ in range(FLAGS.rounds):
        for name, step in steps.items():
            began = time.perf_counter()
            float(step())
            times[name].append(time.perf_counter() - began)
    print(f'\nnum_classes {num_classes:,} (shard {shard:,} per replica)')
    print(f"{'variant':<10}{'step ms':>10}{'spread %':>10}{'x full':>8}{'centres+mom':>13}"
          f"{'logits':>9}{'step peak':>11}{'replica total':>15}{'x full':>8}   (MiB)")
    full_ms = 1e3 * np.median(times['full']) if 'full' in times else None
    full_total = variants['full'][0] + peaks.get('full', LOGIT_COPIES * variants['full'][1])
    for name, (centres, logits, hold, step) in variants.items():
        if name in times:
            ms = 1e3 * np.median(times[name])
            spread = 100 * (np.max(times[name]) - np.min(times[name])) / np.median(times[name])
            ratio = f'{ms / full_ms:.3f}' if full_ms else 'n/a'
            total = centres + peaks[name]
            print(f'{name:<10}{ms:>10.1f}{spread:>10.0f}{ratio:>8}{centres / MIB:>13.0f}'
                  f'{logits / MIB:>9.1f}{peaks[name] / MIB:>11.0f}{total / MIB:>15.0f}'
                  f'{total / full_total:>8.3f}')
        else:
            total = centres + LOGIT_COPIES * logits
            print(f'{name:<10}{"not run":>10}{"":>10}{"":>8}{centres / MIB:>13.0f}'
                  f'{logits / MIB:>9.1f}{"":>11}{total / MIB:>14.0f}*{total / full_total:>8.3f}'
                  f'   * sizes: ~{(hold + step) / GIB:.1f} GiB of host memory, over the '
                  f'{budget / GIB:.1f} GiB free here')


def main(_):
    """Measure and print one table per class count."""
    from modules.utils import quiet_tensorflow
    quiet_tensorflow()
    from modules.training import configure_devices
    configure_devices(cpu_devices=REPLICAS)
    import numpy as np
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices('CPU')]
    strategy = tf.distribute.MirroredStrategy(devices)
    rng = np.random.default_rng(0)
    rates = [float(r) for r in FLAGS.rates.split(',')]
    d, batch = FLAGS.embd, FLAGS.batch
    embd = tf.constant(rng.normal(size=(batch, d)).astype(np.float32))
    print(f'[*] embd {d}, global batch {batch}, {REPLICAS} logical CPU devices, '
          f'{FLAGS.rounds} rounds, host MemAvailable {available_gib():.1f} GiB')
    for num_classes in (int(c) for c in FLAGS.classes.split(',')):
        measure(strategy, num_classes, embd, rates, rng)
        gc.collect()  # the variants' weights go before the next class count's are built
    print('\n[*] step peak: TensorFlow CPU allocator peak during one step above what was held '
          'before it (per replica: a Partial FC peak halved, both replicas share the host '
          f'allocator); replica total = centres+mom + step peak; * = from sizes ({LOGIT_COPIES} '
          'logit-sized tensors); spread = (max - min) / median over the rounds.')


if __name__ == '__main__':
    app.run(main)
