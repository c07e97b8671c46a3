"""Training throughput on this machine: bare train steps per variant, and the real trainer.

For each stage-1 backbone (112x112, batch 64) it times the compiled train step of the ArcFace model
on one fixed batch (no tf.data, no strategy, no checkpoint: the "bare step") in these variants:
Keras 3 BatchNormalization, our fused BatchNormalization (the default), fused + XLA, fused under a
mixed_bfloat16 policy, and that + XLA; next to a reference step of the same backbone built with
tf-keras (whose BatchNormalization runs the fused kernel), when `tf_keras` is installed (dev extra).
Then, for every fused variant, it runs `train_stage1` (the real trainer: tf.data, strategy,
progress bar, logging) with the matching `mixed_precision` / `jit_compile` keys on a synthetic
TFRecord and reports trainer / bare step of the same variant. The same is done for the stage-2 step (IoM head
on the frozen backbone) and the input pipeline alone. Variants are interleaved over `--repeats`
rounds and the median is reported: the machine may be shared. Tracing and warm-up steps are left out
of every figure.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.utils import quiet_tensorflow  # noqa: E402

quiet_tensorflow()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from modules.layers import FusedBatchNormalization  # noqa: E402
from modules.models import ArcFaceModel  # noqa: E402

BATCH, SIZE, CLASSES = 64, 112, 40


def keras_batch_norm(model):
    """A copy of `model` with every fused BatchNormalization turned back into Keras' own."""
    def clone(layer):
        if isinstance(layer, tf.keras.Model):
            return tf.keras.models.clone_model(layer, clone_function=clone)
        config = layer.get_config()
        if isinstance(layer, FusedBatchNormalization):
            return tf.keras.layers.BatchNormalization.from_config(config)
        return layer.__class__.from_config(config)

    copy = tf.keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def stage1_step(model, xla):
    """The trainer's stage-1 step (softmax CE on ArcHead logits + L2) as one compiled function."""
    optimizer = tf.keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)
    if model.dtype_policy.name == 'mixed_float16':
        optimizer = tf.keras.optimizers.LossScaleOptimizer(optimizer)

    @tf.function(jit_compile=xla)
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model((images, labels), training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32)))
            loss += tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def build_stage1(backbone, variant):
    """(step function, inputs) of one variant of the stage-1 bare step."""
    policy = 'mixed_bfloat16' if 'bf16' in variant else 'float32'
    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        model = ArcFaceModel(size=SIZE, num_classes=CLASSES, backbone_type=backbone,
                             use_pretrain=False, training=True)
    finally:
        tf.keras.mixed_precision.set_global_policy('float32')
    if variant.startswith('keras_bn'):
        model = keras_batch_norm(model)
    return stage1_step(model, xla='xla' in variant), batch()


def build_tf_keras_reference(backbone):
    """The same backbone + output block + Dense head in tf-keras (fused BatchNorm), compiled."""
    import tf_keras as tfk
    app = {'MobileNetV2': tfk.applications.MobileNetV2, 'ResNet50': tfk.applications.ResNet50}
    inputs = tfk.Input((SIZE, SIZE, 3))
    x = app[backbone](input_shape=(SIZE, SIZE, 3), include_top=False, weights=None)(inputs * 2 - 1)
    x = tfk.layers.BatchNormalization(momentum=0.9)(x)
    x = tfk.layers.Dropout(0.5)(x)
    x = tfk.layers.Flatten()(x)
    x = tfk.layers.Dense(512, kernel_regularizer=tfk.regularizers.L2(5e-4))(x)
    x = tfk.layers.BatchNormalization(momentum=0.9)(x)
    logits = tfk.layers.Dense(CLASSES)(x)
    model = tfk.Model(inputs, logits)
    optimizer = tfk.optimizers.SGD(0.01, momentum=0.9, nesterov=True)

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=tf.cast(labels, tf.int32), logits=model(images, training=True)))
            loss += tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    images, labels = batch()
    return step, (images, labels)


def build_stage2(variant):
    """(step, inputs) of the stage-2 step: images through the frozen MobileNetV2, IoM m=512 q=8."""
    from modules.config import STAGE2_REQUIRED, validate_config
    from modules.losses import IoMLoss
    from modules.training import Stage2Model
    cfg = validate_config(dict(
        batch_size=BATCH, classes_per_batch=16, samples_per_class=4, backbone_type='MobileNetV2',
        head_type='IoMHead', use_pretrain=False, train_dataset='unused', num_classes=CLASSES,
        num_samples=BATCH, epochs=1, base_lr=0.01, sub_name='bench_stage2', test_dataset='unused',
        stage1_sub_name='bench_none', m=512, q=8, loss_fun='batch_hard_arc_triplet_loss'),
        'bench', STAGE2_REQUIRED)
    tf.keras.mixed_precision.set_global_policy('mixed_bfloat16' if 'bf16' in variant else 'float32')
    try:
        net = Stage2Model(cfg)
    finally:
        tf.keras.mixed_precision.set_global_policy('float32')
    loss_fn = IoMLoss(cfg)
    optimizer = tf.keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)

    @tf.function(jit_compile='xla' in variant)
    def step(images, labels):
        embeddings = net.arcface_model(images, training=False)
        with tf.GradientTape() as tape:
            codes, probs = net.head.soft_outputs(net.logits(embeddings, training=True))
            total, _ = loss_fn(labels, tf.cast(codes, tf.float32), tf.cast(probs, tf.float32),
                               net.l2())
        grads = tape.gradient(total, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
        return total

    images, labels = batch()
    return step, (images, labels // 3)  # 16 identities x 4 images, like a PK batch


def batch():
    """One fixed random batch of images in [0, 1] and labels."""
    rng = np.random.default_rng(0)
    return (tf.constant(rng.uniform(0, 1, (BATCH, SIZE, SIZE, 3)).astype('float32')),
            tf.constant(rng.integers(0, CLASSES, BATCH), tf.int64))


def time_steps(step, inputs, steps, warmup):
    """Images/s of `steps` calls after `warmup` untimed ones (tracing included in the warm-up)."""
    for _ in range(warmup):
        step(*inputs).numpy()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step(*inputs)
    loss.numpy()
    return steps * BATCH / (time.perf_counter() - start)


def trainer_throughput(backbone, variant, work, steps, warmup):
    """images/s that train_stage1 reports for a run of warmup + steps steps (steady state)."""
    from modules.config import validate_config
    from modules.training import train_stage1
    name = f'trainer_{backbone}_{variant}_{time.monotonic_ns()}'
    cfg = validate_config(dict(
        batch_size=BATCH, backbone_type=backbone, head_type='ArcHead', use_pretrain=False,
        train_dataset=os.path.join(work, 'train.tfrecord'), binary_img=True, num_classes=CLASSES,
        num_samples=BATCH * 1000, epochs=1, base_lr=0.01, save_steps=100_000,
        max_steps=warmup + steps, sub_name=name, test_dataset=work,
        mixed_precision='mixed_bfloat16' if 'bf16' in variant else None,
        jit_compile='xla' in variant), 'bench')
    cwd = os.getcwd()
    os.chdir(work)
    try:
        return train_stage1(cfg)['images_per_second']
    finally:
        os.chdir(cwd)


def pipeline_throughput(work, batches):
    """Images/s of the stage-1 input pipeline alone (decode, augment, batch), no model."""
    from modules.dataset import load_tfrecord_dataset
    dataset = load_tfrecord_dataset(os.path.join(work, 'train.tfrecord'), BATCH)
    iterator = iter(dataset)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * BATCH / (time.perf_counter() - start)


def make_data(work):
    """A synthetic identity-folder set and its binary TFRecord in `work`."""
    import importlib.util

    from modules.tfrecords import write_tfrecord
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        'gen', os.path.join(root, 'data', 'make_synthetic_faces.py'))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(os.path.join(work, 'synthetic'), num_train_ids=CLASSES, images_per_id=16,
                 num_test_ids=16, num_pairs=60, num_retrieval_ids=4, retrieval_images_per_id=4,
                 seed=1)
    write_tfrecord(os.path.join(work, 'synthetic', 'train'), os.path.join(work, 'train.tfrecord'),
                   binary=True)


def main():
    """Time every variant, interleaved over rounds; print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--backbones', default='MobileNetV2,ResNet50')
    parser.add_argument('--variants', default='keras_bn,fused,fused_xla,fused_bf16,fused_bf16_xla',
                        help='bare-step variants (XLA ones are slow on a CPU)')
    parser.add_argument('--steps', type=int, default=10, help='timed steps per measurement')
    parser.add_argument('--xla_steps', type=int, default=3, help='timed steps for XLA variants')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3, help='interleaved rounds (median)')
    parser.add_argument('--no_trainer', action='store_true', help='bare steps only')
    args = parser.parse_args()
    try:
        import tf_keras  # noqa: F401
        reference = True
    except ImportError:
        reference = False
    work = tempfile.mkdtemp(prefix='bench_training_')
    if not args.no_trainer:
        make_data(work)
    print(f'{os.cpu_count()} CPU cores; batch {BATCH}, {SIZE}x{SIZE}; median of {args.repeats} '
          f'interleaved rounds; {args.steps} timed steps ({args.xla_steps} with XLA)')
    for backbone in args.backbones.split(','):
        variants = args.variants.split(',') + (['tf_keras'] if reference else [])
        built = {v: (build_tf_keras_reference(backbone) if v == 'tf_keras'
                     else build_stage1(backbone, v)) for v in variants}
        trained = [] if args.no_trainer else [v for v in variants if v.startswith('fused')]
        rates = {v: [] for v in variants + [f'trainer_{v}' for v in trained]}
        for _ in range(args.repeats):
            for v in variants:
                steps = args.xla_steps if 'xla' in v else args.steps
                rates[v].append(time_steps(*built[v], steps, args.warmup))
                if v in trained:
                    rates[f'trainer_{v}'].append(trainer_throughput(backbone, v, work, steps,
                                                                    args.warmup))
        med = {v: statistics.median(r) for v, r in rates.items()}
        print(f'\n{backbone}: images/s (median)  [all rounds]')
        for v, value in med.items():
            if v.startswith('trainer_'):
                bare = v[len('trainer_'):]
                # Each round times the bare step and then the trainer back to back: the ratio of
                # such a pair is less exposed to the machine's drift than a ratio of medians.
                paired = statistics.median(t / b for t, b in zip(rates[v], rates[bare]))
                extra = (f'   trainer / bare {bare} step = {value / med[bare]:.3f} '
                         f'(median of per-round ratios {paired:.3f})')
            elif v != 'fused':
                extra = f"   x{value / med['fused']:.2f} of fused"
            else:
                extra = ''
            print(f'  {v:22s} {value:8.1f}  [{", ".join(f"{r:.1f}" for r in rates[v])}]{extra}')
        if 'tf_keras' in med and 'trainer_fused' in med:
            print(f"  trainer_fused / tf-keras reference step = "
                  f"{med['trainer_fused'] / med['tf_keras']:.3f}")
    stage2 = [v for v in args.variants.split(',') if not v.startswith('keras_bn')]
    built = {v: build_stage2(v) for v in stage2}
    rates = {v: [] for v in stage2}
    for _ in range(args.repeats):
        for v in stage2:
            rates[v].append(time_steps(*built[v], args.xla_steps if 'xla' in v else args.steps,
                                       args.warmup))
    print('\nstage 2 (MobileNetV2 frozen, IoM m=512 q=8, batch 16x4): images/s (median)')
    for v, r in rates.items():
        print(f'  {v:16s} {statistics.median(r):8.1f}  [{", ".join(f"{x:.1f}" for x in r)}]')
    if not args.no_trainer:
        rate = statistics.median(pipeline_throughput(work, 30) for _ in range(args.repeats))
        print(f'\ninput pipeline alone (binary TFRecord, decode + augment): {rate:.0f} images/s')
    print(f'(work folder {work})')


if __name__ == '__main__':
    main()
