"""The stage-1 training loop: ArcFace (or NormHead) on the backbone, custom loop or Keras fit."""
import json
import math
import os

import tensorflow as tf

from modules.dataset import BadImageError
from modules.training.run import NonFiniteLoss, RunState, dtype_policy, get_strategy, make_optimizer
from modules.utils import UserError


def stage1_total_steps(cfg):
    """Number of optimizer steps of a stage-1 run (epochs x steps per epoch, or max_steps)."""
    per_epoch = max(cfg['num_samples'] // cfg['batch_size'], 1)
    total = cfg['epochs'] * per_epoch
    return min(total, cfg['max_steps']) if cfg['max_steps'] else total


def _check_stage1(cfg, mode):
    """UserError for a mode or option the run cannot use, before anything is built."""
    if mode not in ('eager_tf', 'fit'):
        raise UserError(f"--mode must be 'eager_tf' or 'fit', got {mode!r}")
    if cfg['partial_fc'] and mode == 'fit':
        raise UserError('partial_fc: True needs --mode eager_tf (Keras fit() cannot shard the '
                        "head's centres over the replicas)")
    if cfg['partial_fc'] and cfg['jit_compile']:
        raise UserError('partial_fc: True cannot run with jit_compile: True (the number of '
                        'sampled centres changes from step to step)')
    if not os.path.isfile(cfg['train_dataset']):
        raise UserError(f"train_dataset not found: {cfg['train_dataset']} (convert the images "
                        'with data/convert_train_binary_tfrecord.py first)')


def _stage1_model(cfg, strategy, total_steps):
    """(model, optimizer, Partial FC head or None, checkpoint) of a stage-1 run."""
    from modules.models import arcface_from_config, stage1_checkpoint
    with strategy.scope():
        with dtype_policy(cfg):
            # Partial FC: the model stops at the embedding; the sharded head lives outside it.
            model = arcface_from_config(cfg, training=not cfg['partial_fc'])
        optimizer = make_optimizer(cfg, total_steps)
        optimizer.build(model.trainable_variables)
    if cfg['partial_fc']:
        from modules.partial_fc import PartialFCHead
        head = PartialFCHead.from_config(cfg, strategy)  # per-replica shards: outside the scope
        return model, optimizer, head, stage1_checkpoint(model, partial_fc_head=head,
                                                         optimizer=optimizer)
    return model, optimizer, None, stage1_checkpoint(model, head=model.layers[-1],
                                                     optimizer=optimizer)


def _apply_head_gradients(head, optimizer, grads, head_grads, index, scaled):
    """Update this replica's own Partial FC shard (never all-reduced). The rate is read before
    apply_gradients moves the step on; with loss scaling, a step that overflowed anywhere is
    skipped, as Keras decides for the model."""
    apply = True
    if scaled:
        head_grads = [g / optimizer.dynamic_scale for g in head_grads]
        bad = tf.reduce_sum([tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32))
                             for g in grads + head_grads])
        ctx = tf.distribute.get_replica_context()
        apply = ctx.all_reduce(tf.distribute.ReduceOp.SUM, bad) == 0
    head.apply_gradients(index, head_grads, optimizer.learning_rate, apply)


def train_stage1(cfg, mode='eager_tf', strategy=None):
    """Train the ArcFace model of `cfg` (mode 'eager_tf' or 'fit'); returns a summary dict."""
    from modules.dataset import (
        SCAN_LIMIT_BYTES,
        BadImages,
        load_tfrecord_dataset,
        scan_tfrecord,
        tfrecord_read_error,
    )
    from modules.losses import softmax_loss

    _check_stage1(cfg, mode)
    bad_images = BadImages(cfg['bad_images'])
    strategy = strategy or get_strategy()  # first: multi-worker set-up must precede any TF op
    if (cfg['mixed_precision'] == 'mixed_float16' and not tf.config.list_physical_devices('GPU')
            and os.environ.get('TF_ENABLE_ONEDNN_OPTS') != '0'):
        print('[*] Warning: mixed_float16 on a CPU with oneDNN on: its float16 gradients are about '
              '15x slower than without it (train.py turns it off; or set TF_ENABLE_ONEDNN_OPTS=0 '
              'before TensorFlow is imported). mixed_bfloat16 is the fast choice on CPUs.')
    if os.path.getsize(cfg['train_dataset']) <= SCAN_LIMIT_BYTES:
        scan_tfrecord(cfg['train_dataset'])  # a cut-short file fails now, not at step 0
    total_steps = stage1_total_steps(cfg)
    global_batch = cfg['batch_size']
    if global_batch % strategy.num_replicas_in_sync:
        raise UserError(f"batch_size {global_batch} is not divisible by the "
                        f'{strategy.num_replicas_in_sync} replicas')
    model, optimizer, head, checkpoint = _stage1_model(cfg, strategy, total_steps)
    state = RunState(cfg, checkpoint, optimizer, strategy, total_steps, global_batch)
    dataset = load_tfrecord_dataset(cfg['train_dataset'], global_batch,
                                    binary_img=cfg['binary_img'], is_ccrop=cfg['is_ccrop'],
                                    buffer_size=cfg['shuffle_buffer'], bad_images=bad_images)
    state.bad_images = bad_images
    options = tf.data.Options()
    # One TFRecord file cannot be split by file between workers: shard by element instead.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)
    state.start()
    try:
        if state.step < total_steps:
            if mode == 'eager_tf':
                _stage1_custom_loop(model, optimizer, dataset, strategy, state, head)
            else:
                _stage1_fit(model, optimizer, softmax_loss, dataset, strategy, state)
            state.save()
    except tf.errors.DataLossError as err:
        raise tfrecord_read_error(cfg['train_dataset'], err) from None
    finally:
        state.close()
    summary = {'step': state.step, 'images_per_second': state.images_per_second(),
               'checkpoint': state.manager.latest_checkpoint, **bad_images.summary()}
    print(json.dumps(summary))
    return summary


def _stage1_custom_loop(model, optimizer, dataset, strategy, state, head=None):
    """The stage-1 loop: the model's own head, or a Partial FC `head` (modules/partial_fc.py)."""
    global_batch = state.batch_size
    dist_dataset = strategy.experimental_distribute_dataset(dataset)
    scaled = isinstance(optimizer, tf.keras.optimizers.LossScaleOptimizer)

    def head_loss(images, labels, draw):
        """(softmax loss term of this replica, sampled head rows, their shard indices)."""
        if head is not None:
            embds = model(images, training=True)
            return head.replica_loss(embds, labels, draw)
        logits = model((images, labels), training=True)
        per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32))
        return tf.reduce_sum(per_example) / global_batch, [], None

    # Forward and backward in one (optionally XLA-compiled) function; the optimizer update stays
    # outside it because under a strategy it all-reduces the gradients across replicas. Partial
    # FC's collectives cannot sit in a nested tf.function: its forward runs in train_step's.
    def loss_and_gradients(images, labels, draw):
        with tf.GradientTape() as tape:
            pred_loss, rows, index = head_loss(images, labels, draw)
            reg_loss = tf.add_n([tf.cast(x, tf.float32) for x in model.losses]) \
                if model.losses else 0.0
            loss = pred_loss + reg_loss / strategy.num_replicas_in_sync
            # Dynamic loss scaling: the optimizer unscales, and skips a step that overflowed.
            target = optimizer.scale_loss(loss) if scaled else loss
        grads = tape.gradient(target, model.trainable_variables + rows)
        n = len(model.trainable_variables)
        return loss, pred_loss, grads[:n], index, grads[n:]

    if head is None:
        loss_and_gradients = tf.function(loss_and_gradients, jit_compile=state.cfg['jit_compile'])

    def replica_step(images, labels, draw):
        loss, pred_loss, grads, index, head_grads = loss_and_gradients(images, labels, draw)
        if head is not None:
            _apply_head_gradients(head, optimizer, grads, head_grads, index, scaled)
        if scaled:  # Keras' loss-scale skip (a tf.cond) cannot run in a replica context
            return loss, pred_loss, grads
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss, pred_loss

    @tf.function
    def train_step(images, labels):
        draw = head.draws.read_value() if head is not None else tf.constant(0, tf.int64)
        loss, pred, *grads = strategy.run(replica_step, args=(images, labels, draw))
        if scaled:
            summed = [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in grads[0]]
            optimizer.apply_gradients(zip(summed, model.trainable_variables))
        if head is not None:
            head.draws.assign_add(1)
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        state.track_finite(loss)
        return loss, strategy.reduce(tf.distribute.ReduceOp.SUM, pred, axis=None)

    for images, labels in dist_dataset:
        loss, pred = train_step(images, labels)
        state.after_step(loss, {'loss/softmax': pred})
        if state.step >= state.total_steps:
            break


class _RunStateCallback(tf.keras.callbacks.Callback):
    """Feeds Keras fit() batches into RunState (bar, TensorBoard, checkpoints, NaN guard)."""

    def __init__(self, state):
        super().__init__()
        self.state = state
        self.error = None

    def on_train_batch_end(self, batch, logs=None):
        try:
            self.state.after_step(logs['loss'])
        except (NonFiniteLoss, BadImageError) as err:
            self.error = err
            self.model.stop_training = True
        if self.state.step >= self.state.total_steps:
            self.model.stop_training = True


def _stage1_fit(model, optimizer, softmax_loss, dataset, strategy, state):
    """Keras fit() over 'chunks' of save_steps steps, so a resumed run restarts on a boundary."""
    chunk = state.cfg['save_steps']
    with strategy.scope():
        model.compile(optimizer=optimizer, loss=softmax_loss,
                      jit_compile=state.cfg['jit_compile'])
    # fit() sees ((image, label), label): ArcHead needs the label as an input.
    data = dataset.map(lambda x, y: ((x, y), y))
    callback = _RunStateCallback(state)
    model.fit(data, epochs=math.ceil(state.total_steps / chunk), initial_epoch=state.step // chunk,
              steps_per_epoch=chunk, callbacks=[callback], verbose=0,
              shuffle=False)  # the dataset shuffles itself; Keras would only warn
    if callback.error is not None:
        raise callback.error
