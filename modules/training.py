"""Training infrastructure shared by both stages, and the stage-1 ArcFace training loop.

Both stages use the same pieces: a tf.distribute strategy, an SGD optimizer whose `iterations`
counter is the global step, a CheckpointManager that saves model + optimizer every `save_steps`
(so a killed run resumes exactly where its last checkpoint was), TensorBoard scalars, a tqdm bar
and a guard that stops on a non-finite loss without overwriting the last good checkpoint.
"""
import contextlib
import hashlib
import json
import math
import os
import tempfile
import time

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from modules.config import checkpoint_dir, log_dir
from modules.dataset import BadImageError
from modules.utils import UserError


def configure_devices(gpu=None, cpu_devices=None):
    """Pick visible GPUs (`gpu` like '0,1'; '' for none) and optionally split the CPU into devices.

    Must run before TensorFlow initialises its devices.
    """
    if gpu is not None:
        os.environ['CUDA_VISIBLE_DEVICES'] = gpu
    for device in tf.config.list_physical_devices('GPU'):
        tf.config.experimental.set_memory_growth(device, True)
    if cpu_devices and cpu_devices > 1:
        cpu = tf.config.list_physical_devices('CPU')[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * cpu_devices)


def get_strategy():
    """MultiWorkerMirrored when TF_CONFIG is set, else Mirrored over the GPUs or the CPU devices."""
    if os.environ.get('TF_CONFIG'):
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices('GPU')
    devices = gpus or tf.config.list_logical_devices('CPU')
    return tf.distribute.MirroredStrategy(devices=[d.name for d in devices])


def is_chief(strategy):
    """True on the worker that owns checkpoints and logs (always True outside multi-worker)."""
    resolver = getattr(strategy.extended, '_cluster_resolver', None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == 'chief' or (resolver.task_type == 'worker'
                                             and resolver.task_id == 0
                                             and 'chief' not in resolver.cluster_spec().as_dict())


class WarmupSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """lr(t) = base_lr * t / warmup for t < warmup, then the config's schedule.

    After the warm-up: constant base_lr; 'step': x0.1 at each of `lr_steps` (absolute steps);
    'cosine': base_lr * (1 + cos(pi * u)) / 2 and 'poly': base_lr * (1 - u)^2 (arcface_torch),
    with u = (t - warmup) / (total - warmup) clipped to [0, 1], so both reach 0 at the last step.
    """

    def __init__(self, base_lr, total_steps, warmup_steps=0, schedule='constant', lr_steps=()):
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.schedule = schedule
        self.lr_steps = [int(b) for b in lr_steps]

    def __call__(self, step):
        """Learning rate at optimizer step `step` (0-based)."""
        t = tf.cast(step, tf.float32)
        base = tf.constant(self.base_lr, tf.float32)
        span = float(max(self.total_steps - self.warmup_steps, 1))
        u = tf.clip_by_value((t - self.warmup_steps) / span, 0.0, 1.0)
        if self.schedule == 'cosine':
            lr = base * 0.5 * (1.0 + tf.cos(math.pi * u))
        elif self.schedule == 'poly':
            lr = base * tf.square(1.0 - u)
        elif self.schedule == 'step' and self.lr_steps:
            passed = tf.reduce_sum(tf.cast(t >= tf.constant(self.lr_steps, tf.float32), tf.float32))
            lr = base * tf.pow(0.1, passed)
        else:
            lr = base
        if self.warmup_steps:
            lr = tf.where(t < self.warmup_steps, base * t / self.warmup_steps, lr)
        return lr

    def get_config(self):
        """Constructor arguments (Keras serialisation)."""
        return {'base_lr': self.base_lr, 'total_steps': self.total_steps,
                'warmup_steps': self.warmup_steps, 'schedule': self.schedule,
                'lr_steps': self.lr_steps}


def learning_rate(cfg, total_steps):
    """The config's learning rate: warm-up, then constant, step, cosine or poly decay."""
    if cfg['lr_schedule'] == 'constant' and not cfg['warmup_steps']:
        return float(cfg['base_lr'])
    return WarmupSchedule(cfg['base_lr'], total_steps, cfg['warmup_steps'], cfg['lr_schedule'],
                          cfg['lr_steps'])


def make_optimizer(cfg, total_steps, loss_scaling=True):
    """SGD with Nesterov momentum 0.9; wrapped in dynamic loss scaling under mixed_float16."""
    optimizer = tf.keras.optimizers.SGD(learning_rate=learning_rate(cfg, total_steps),
                                        momentum=0.9, nesterov=True)
    if loss_scaling and cfg['mixed_precision'] == 'mixed_float16':
        optimizer = tf.keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


@contextlib.contextmanager
def dtype_policy(cfg):
    """Build models under the config's mixed-precision policy; restore the previous one after."""
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(cfg['mixed_precision'] or 'float32')
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunState:
    """Checkpointing, TensorBoard and progress reporting for one training run.

    The host reads the loss only every `log_steps` steps (and before every checkpoint), so the
    device is not stalled each step. The NaN guard still sees every step: the train step folds
    `is_finite(loss)` into the device-side flag `finite` (see `track_finite`), which is read at
    log and save time; a checkpoint is never written once a non-finite loss has been seen.
    """

    def __init__(self, cfg, checkpoint, optimizer, strategy, total_steps, batch_size):
        self.cfg = cfg
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.chief = is_chief(strategy)
        directory = checkpoint_dir(cfg)
        if not self.chief:  # other workers must write somewhere, but not over the chief's files
            directory = tempfile.mkdtemp(prefix='ckpt_worker_')
        self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=3)
        self.restored = self.manager.latest_checkpoint
        # The step count is the trainer's own: optimizer.iterations stays put on the steps that
        # dynamic loss scaling skips, so a mixed_float16 run resumed from it would repeat steps.
        self.step_var = tf.Variable(0, dtype=tf.int64, trainable=False, name='trainer_step')
        older = bool(self.restored) and 'trainer_step' not in {
            name.split('/')[0] for name, _ in tf.train.list_variables(self.restored)}
        if not older:  # a checkpoint without the variable would fail the restore's assertion
            checkpoint.trainer_step = self.step_var
        if self.restored:
            checkpoint.restore(self.restored).assert_existing_objects_matched()
        if older:  # written before the trainer kept its own count: take the optimizer's
            self.step_var.assign(optimizer.iterations)
            checkpoint.trainer_step = self.step_var
        self.writer = tf.summary.create_file_writer(log_dir(cfg) if self.chief else
                                                    tempfile.mkdtemp(prefix='logs_worker_'))
        self.step = int(self.step_var.numpy())  # counted on the host, stored at save time
        self.checked_step = self.step  # last step whose losses are known to be finite
        self.finite = tf.Variable(True, trainable=False, name='all_losses_finite')
        self.bar = None
        self.started = None
        self.warm = None
        self.last = None
        self.paused = self.paused_at_last = 0.0  # seconds of checkpoint saves, not training
        self.images = 0
        self.bad_images = None  # a modules.dataset.BadImages when the data pipeline reports to it

    def track_finite(self, loss):
        """Inside a train step: fold this step's loss into the device-side finite flag."""
        self.finite.assign(tf.logical_and(self.finite, tf.reduce_all(tf.math.is_finite(loss))))

    def start(self):
        """Open the progress bar; report where the run starts from."""
        if self.restored:
            print(f'[*] resumed from {self.restored} at step {self.step}')
        else:
            print(f'[*] training from scratch, checkpoints in {self.manager.directory}')
        self.bar = tqdm(total=self.total_steps, initial=self.step, unit='step', dynamic_ncols=True,
                        disable=not self.chief)
        self.started = time.perf_counter()

    def _check(self, loss=None):
        """Stop on a non-finite loss since the last check, or on a bad image in fail mode."""
        finite = bool(self.finite.numpy())
        if finite and loss is not None:
            finite = math.isfinite(float(loss))
        if not finite:
            self.close()
            window = (f'at step {self.step}' if self.step - self.checked_step <= 1 else
                      f'between steps {self.checked_step + 1} and {self.step}')
            raise NonFiniteLoss(f'the loss became NaN or infinite {window}; stopped without '
                                f'saving, last good checkpoint: {self.manager.latest_checkpoint}')
        self.checked_step = self.step
        if self.bad_images is not None and self.bad_images.count:
            try:
                self.bad_images.check()
            except UserError as err:
                self.close()
                raise type(err)(f'{err}; stopped at step {self.step} without saving, last good '
                                f"checkpoint: {self.manager.latest_checkpoint or 'none yet'}") \
                    from None

    def after_step(self, loss, scalars=None):
        """Record one finished step (`loss`, `scalars`: tensors or floats, read only when logged)."""
        self.step += 1
        now = time.perf_counter()
        if self.warm is None:
            self.warm = now  # the first step traces the tf.function: left out of the rate
        else:
            self.images += self.batch_size
            self.last = now
            self.paused_at_last = self.paused
        self.bar.update(1)
        save_due = self.step % self.cfg['save_steps'] == 0 or self.step >= self.total_steps
        if self.step % self.cfg['log_steps'] and not save_due:
            return
        self._check(loss)
        loss = float(loss)
        rate = self.images_per_second()
        bad = {} if self.bad_images is None else {'bad_img': self.bad_images.count}
        self.bar.set_postfix(loss=f'{loss:.4f}', img_s=f'{rate:.1f}', **bad, refresh=False)
        with self.writer.as_default(step=self.step):
            tf.summary.scalar('loss/total', loss)
            tf.summary.scalar('images_per_second', rate)
            lr = self.optimizer.learning_rate
            tf.summary.scalar('learning_rate', float(lr.numpy() if hasattr(lr, 'numpy') else lr))
            for name, value in (scalars or {}).items():
                tf.summary.scalar(name, float(value))
            if self.bad_images is not None:
                tf.summary.scalar('data/bad_images', self.bad_images.count)
        if save_due:
            self.save()

    def save(self):
        """Write a checkpoint for the current step (if not already saved for it); losses checked."""
        if self.manager.latest_checkpoint and self.manager.latest_checkpoint.endswith(
                f'-{self.step}'):
            return
        self._check()
        began = time.perf_counter()
        self.step_var.assign(self.step)
        self.manager.save(checkpoint_number=self.step)
        if self.warm is not None:
            self.paused += time.perf_counter() - began

    def images_per_second(self):
        """Steady-state throughput: after the first (tracing) step, checkpoint saves left out."""
        if self.last is None:
            return 0.0
        return self.images / max(self.last - self.warm - self.paused_at_last, 1e-9)

    def close(self):
        """Close the bar and flush the logs."""
        if self.bar is not None:
            self.bar.close()
        self.writer.flush()


# --------------------------------------------------------------------------------------------
# Stage 1: ArcFace / NormHead classification training.
def stage1_total_steps(cfg):
    """Number of optimizer steps of a stage-1 run (epochs x steps per epoch, or max_steps)."""
    per_epoch = max(cfg['num_samples'] // cfg['batch_size'], 1)
    total = cfg['epochs'] * per_epoch
    return min(total, cfg['max_steps']) if cfg['max_steps'] else total


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
    from modules.models import arcface_from_config, stage1_checkpoint

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
    with strategy.scope():
        with dtype_policy(cfg):
            # Partial FC: the model stops at the embedding; the sharded head lives outside it.
            model = arcface_from_config(cfg, training=not cfg['partial_fc'])
        optimizer = make_optimizer(cfg, total_steps)
        optimizer.build(model.trainable_variables)
    if cfg['partial_fc']:
        from modules.partial_fc import PartialFCHead
        head = PartialFCHead.from_config(cfg, strategy)  # per-replica shards: outside the scope
        checkpoint = stage1_checkpoint(model, partial_fc_head=head, optimizer=optimizer)
    else:
        head = None
        checkpoint = stage1_checkpoint(model, head=model.layers[-1], optimizer=optimizer)
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
            # The shard is this replica's own: updated here, never all-reduced. Read the rate
            # before apply_gradients moves the step on.
            apply = True
            if scaled:
                head_grads = [g / optimizer.dynamic_scale for g in head_grads]
                bad = tf.reduce_sum([tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32))
                                     for g in grads + head_grads])
                ctx = tf.distribute.get_replica_context()
                apply = ctx.all_reduce(tf.distribute.ReduceOp.SUM, bad) == 0  # as Keras decides
            head.apply_gradients(index, head_grads, optimizer.learning_rate, apply)
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


# --------------------------------------------------------------------------------------------
# Stage 2: Deep IoM hashing on the frozen embedding model.
def stage2_batch(cfg):
    """PK batch size (classes_per_batch x samples_per_class); it must equal batch_size."""
    batch = cfg['classes_per_batch'] * cfg['samples_per_class']
    if cfg['batch_size'] != batch:
        raise UserError(f"batch_size is {cfg['batch_size']} but a stage-2 batch holds "
                        f"classes_per_batch x samples_per_class = {batch} images; set batch_size: "
                        f'{batch}')
    return batch


class Stage2Model:
    """The pieces stage 2 trains: frozen embedding model + IoM layers (shared with `iom_model`)."""

    def __init__(self, cfg):
        from modules.models import (
            IoMFaceModel,
            arcface_from_config,
            load_backbone_weights,
            trained_iom_layers,
        )
        with dtype_policy(cfg):
            self.arcface_model = arcface_from_config(cfg, use_pretrain=False)
        self.backbone_source = load_backbone_weights(self.arcface_model, cfg)
        self.arcface_model.trainable = False
        self.iom_model = IoMFaceModel(cfg, self.arcface_model)
        self.stack = trained_iom_layers(self.iom_model)
        self.head = self.stack[-1]
        self.w_decay = cfg['w_decay']

    @property
    def trainable_variables(self):
        """Weights of the IoM layers (the embedding model is frozen)."""
        return [v for layer in self.stack for v in layer.trainable_variables]

    def logits(self, embeddings, training):
        """IoM projection output (batch, m*q) for embeddings."""
        x = embeddings
        for layer in self.stack[:-1]:
            x = layer(x, training=training)
        return x

    def codes(self, embeddings):
        """Integer IoM codes for embeddings (inference)."""
        return self.head(self.logits(embeddings, False), training=False)

    def l2(self):
        """w_decay * sum of squared IoM kernels."""
        kernels = [v for v in self.trainable_variables if 'kernel' in v.path]
        return self.w_decay * tf.add_n([tf.reduce_sum(tf.square(k)) for k in kernels])


def _embedding_cache(cfg, net, folders, bad_images):
    """Backbone embeddings of every training image, computed once and kept beside the checkpoints.

    Valid because the backbone is frozen and stage-2 images are not augmented. The cache is keyed
    by the backbone weights' source and the image list, and recomputed if either changes.
    Returns (embeddings, valid): images that cannot be read or decoded have valid False and are
    recorded in `bad_images` (also when the cache is reused).
    """
    from modules.dataset import image_file_dataset
    from modules.utils import atomic_output
    digest = hashlib.sha256(b'\0'.join(folders.rel_paths.tolist())).hexdigest()
    key = json.dumps({'backbone': net.backbone_source, 'root': folders.root, 'files': digest,
                      'ccrop': cfg['is_ccrop'], 'size': cfg['input_size']})
    path = os.path.join(checkpoint_dir(cfg), 'embedding_cache.npz')
    if os.path.isfile(path):
        with np.load(path, allow_pickle=False) as cached:
            if str(cached['key']) == key and 'valid' in cached:
                print(f'[*] using cached embeddings {path}')
                valid = cached['valid']
                for i in np.flatnonzero(~valid):
                    bad_images.record(folders.path(i), folders.path(i))
                return cached['embeddings'], valid
    paths = [folders.path(i) for i in range(folders.num_images)]
    dataset = image_file_dataset(paths, cfg['eval_batch_size'], is_ccrop=cfg['is_ccrop'],
                                 with_validity=True)
    embed = tf.function(lambda x: net.arcface_model(x, training=False))
    chunks, valid = [], []
    for images, ok in tqdm(dataset, total=math.ceil(len(paths) / cfg['eval_batch_size']),
                           unit='batch', desc='embedding cache'):
        chunks.append(embed(images).numpy())
        valid.append(ok.numpy())
        for i in np.flatnonzero(~valid[-1]) + (len(valid) - 1) * cfg['eval_batch_size']:
            bad_images.record(paths[i], paths[i])
    embeddings = np.concatenate(chunks).astype(np.float32)
    valid = np.concatenate(valid)
    with atomic_output(path) as fh:
        np.savez(fh, key=np.array(key), embeddings=embeddings, valid=valid)
    return embeddings, valid


def stage2_total_steps(cfg):
    """Number of optimizer steps of a stage-2 run (epochs x num_samples / batch, or max_steps)."""
    total = cfg['epochs'] * max(cfg['num_samples'] // stage2_batch(cfg), 1)
    return min(total, cfg['max_steps']) if cfg['max_steps'] else total


def train_stage2(cfg, strategy=None):
    """Train the IoM layers of `cfg` on the frozen embedding model; returns a summary dict."""
    from modules.dataset import (
        BadImages,
        list_identity_folders,
        load_pk_dataset,
        pk_index_batches,
        report_pk_sampling,
    )
    from modules.losses import IoMLoss
    from modules.models import stage2_checkpoint

    batch = stage2_batch(cfg)
    # Listed once, before any model is built, so a bad folder fails fast.
    folders = list_identity_folders(cfg['train_dataset'], cfg['img_ext'])
    bad_images = BadImages(cfg['bad_images'])
    strategy = strategy or get_strategy()
    if cfg['classes_per_batch'] % strategy.num_replicas_in_sync:
        raise UserError(f"classes_per_batch {cfg['classes_per_batch']} is not divisible by the "
                        f'{strategy.num_replicas_in_sync} replicas')
    total_steps = stage2_total_steps(cfg)
    with strategy.scope():
        net = Stage2Model(cfg)
        # The trained IoM layers and the loss are float32 (only the frozen backbone runs in half
        # precision): their gradients cannot underflow, so no loss scaling.
        optimizer = make_optimizer(cfg, total_steps, loss_scaling=False)
        optimizer.build(net.trainable_variables)
        checkpoint = stage2_checkpoint(net.iom_model, optimizer=optimizer)
    if net.backbone_source is None:
        print('[*] Warning: stage 2 is training on a backbone with random weights.')
    loss_fn = IoMLoss(cfg)
    state = RunState(cfg, checkpoint, optimizer, strategy, total_steps, batch)
    # A resumed run draws new PK batches instead of replaying the ones it already trained on.
    seed = state.step

    if cfg['cache_embeddings']:
        embeddings, valid = _embedding_cache(cfg, net, folders, bad_images)
        bad_images.check()
        keep = np.flatnonzero(valid)  # PK sampling draws from the decodable images only
        labels = folders.labels[keep]
        report_pk_sampling(folders._replace(rel_paths=folders.rel_paths[keep], labels=labels),
                           cfg['classes_per_batch'], cfg['samples_per_class'])

        def batches():
            epoch = 0
            while True:
                for idx in pk_index_batches(labels, cfg['classes_per_batch'],
                                            cfg['samples_per_class'], seed=seed, epoch=epoch):
                    yield embeddings[keep[idx]], labels[idx]
                epoch += 1

        spec = (tf.TensorSpec([batch, embeddings.shape[1]], tf.float32),
                tf.TensorSpec([batch], tf.int64))
        dataset = tf.data.Dataset.from_generator(batches, output_signature=spec).prefetch(2)
        embed = None
    else:
        dataset = load_pk_dataset(folders, cfg['classes_per_batch'],
                                  cfg['samples_per_class'], img_ext=cfg['img_ext'],
                                  is_ccrop=cfg['is_ccrop'], augment=False, seed=seed,
                                  bad_images=bad_images)[0]
        embed = net.arcface_model
    state.bad_images = bad_images

    @tf.function(jit_compile=cfg['jit_compile'])
    def loss_and_gradients(inputs, labels):
        embeddings = inputs if embed is None else embed(inputs, training=False)
        with tf.GradientTape() as tape:
            logits = net.logits(tf.cast(embeddings, tf.float32), training=True)
            codes, probs = net.head.soft_outputs(logits)
            total, terms = loss_fn(labels, codes, probs, net.l2())
            scaled = total / strategy.num_replicas_in_sync
        return total, terms, tape.gradient(scaled, net.trainable_variables)

    def replica_step(inputs, labels):
        total, terms, grads = loss_and_gradients(inputs, labels)
        optimizer.apply_gradients(zip(grads, net.trainable_variables))
        return total, terms

    @tf.function
    def train_step(inputs, labels):
        total, terms = strategy.run(replica_step, args=(inputs, labels))
        mean = tf.distribute.ReduceOp.MEAN
        total = strategy.reduce(mean, total, axis=None)
        state.track_finite(total)
        return total, {k: strategy.reduce(mean, v, axis=None) for k, v in terms.items()}

    evaluator = Stage2Evaluator(cfg, net) if cfg['eval_steps'] else None
    state.start()
    try:
        for batch_inputs, batch_labels in strategy.experimental_distribute_dataset(dataset):
            if state.step >= total_steps:
                break
            total, terms = train_step(batch_inputs, batch_labels)
            state.after_step(total, {f'loss/{k}': v for k, v in terms.items()})
            if evaluator and state.step % cfg['eval_steps'] == 0:
                evaluator.run(state)
        state.save()
    finally:
        state.close()
    summary = {'step': state.step, 'checkpoint': state.manager.latest_checkpoint,
               'images_per_second': state.images_per_second(),
               'steps_per_second': state.images_per_second() / batch, **bad_images.summary()}
    if evaluator:
        summary['eval'] = evaluator.last
    print(json.dumps(summary))
    return summary


class Stage2Evaluator:
    """Periodic verification of the current IoM codes (Hamming) on the test sets.

    The embedding model is frozen, so the test images' embeddings are computed once.
    """

    def __init__(self, cfg, net):
        from modules.evaluations import extract_embeddings
        from modules.testsets import get_val_data
        self.net = net
        self.q = cfg['q']
        self.embeddings = {}
        for name, (images, issame) in get_val_data(cfg['test_dataset']).items():
            emb = extract_embeddings(net.arcface_model, images, batch_size=cfg['eval_batch_size'],
                                     is_flip=cfg['is_flip'], is_ccrop=cfg['is_ccrop'])
            self.embeddings[name] = (emb.astype(np.float32), issame)
        self.last = None

    def run(self, state):
        """Evaluate, log to TensorBoard (metrics and code histogram) and keep the result."""
        from modules.evaluations import pair_distances, verification_metrics
        results = {}
        with state.writer.as_default(step=state.step):
            for name, (emb, issame) in self.embeddings.items():
                codes = self.net.codes(tf.constant(emb)).numpy()
                metrics = verification_metrics(
                    pair_distances(codes[0::2], codes[1::2], 'Hamming', q=self.q), issame)
                results[name] = {k: float(metrics[k]) for k in ('accuracy', 'eer', 'auc')}
                for k, v in results[name].items():
                    tf.summary.scalar(f'eval/{name}/{k}', v)
                tf.summary.histogram(f'codes/{name}', codes)
        self.last = results
        state.bar.write(f'[eval step {state.step}] ' + ', '.join(
            f"{n}: acc {r['accuracy']:.4f} eer {r['eer']:.4f}" for n, r in results.items()))
