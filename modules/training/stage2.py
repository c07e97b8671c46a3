"""The stage-2 training loop: Deep IoM hashing on the frozen embedding model."""
import hashlib
import json
import math
import os

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from modules.config import checkpoint_dir
from modules.training.run import RunState, dtype_policy, get_strategy, make_optimizer
from modules.utils import UserError


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


def _embed_images(cfg, net, paths):
    """(embeddings, valid) of image files through the frozen embedding model."""
    from modules.dataset import image_file_dataset
    dataset = image_file_dataset(paths, cfg['eval_batch_size'], is_ccrop=cfg['is_ccrop'],
                                 with_validity=True)
    embed = tf.function(lambda x: net.arcface_model(x, training=False))
    pairs = [(embed(images).numpy(), ok.numpy()) for images, ok in dataset]
    if not pairs:
        return np.zeros((0, cfg['embd_shape']), np.float32), np.zeros(0, bool)
    return (np.concatenate([e for e, _ in pairs]).astype(np.float32),
            np.concatenate([v for _, v in pairs]))


def _monitor(cfg, net, folders, held, cached=None):
    """The KeyChangeMonitor on the held-out identities' embeddings (None when nothing is held
    out); `cached` = (embeddings, valid) of every image when the trainer has them."""
    from modules.training.monitor import KeyChangeMonitor
    if not held.any():
        print('[*] monitor_holdout is 0: no key-change monitor; check the model with '
              'eval_protection.py before enrolling anyone')
        return None
    if cached is None:
        emb, valid = _embed_images(cfg, net, [folders.path(i) for i in np.flatnonzero(held)])
    else:
        emb, valid = cached[0][held], cached[1][held]
    return KeyChangeMonitor(cfg, emb[valid], folders.labels[held][valid])


def _stage2_dataset(cfg, net, folders, bad_images, seed, held):
    """(PK dataset, embedding model or None, monitor or None): cached embeddings (the model then
    runs no backbone) or images through the frozen backbone; the images of `held` are left out
    of training for the key-change monitor."""
    from modules.dataset import load_pk_dataset, pk_index_batches, report_pk_sampling
    batch = stage2_batch(cfg)
    if cfg['cache_embeddings']:
        embeddings, valid = _embedding_cache(cfg, net, folders, bad_images)
        bad_images.check()
        monitor = _monitor(cfg, net, folders, held, (embeddings, valid))
        # PK sampling draws from the decodable images of the identities not held out.
        keep = np.flatnonzero(valid & ~held)
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
        return dataset, None, monitor
    monitor = _monitor(cfg, net, folders, held)
    train = folders._replace(rel_paths=folders.rel_paths[~held], labels=folders.labels[~held])
    dataset = load_pk_dataset(train, cfg['classes_per_batch'], cfg['samples_per_class'],
                              img_ext=cfg['img_ext'], is_ccrop=cfg['is_ccrop'], augment=False,
                              seed=seed, bad_images=bad_images)[0]
    return dataset, net.arcface_model, monitor


def _stage2_train_step(cfg, net, loss_fn, optimizer, strategy, state, embed):
    """The distributed training step: (mean loss, {term: mean value}) of one batch."""
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

    return train_step


def train_stage2(cfg, strategy=None):
    """Train the IoM layers of `cfg` on the frozen embedding model; returns a summary dict."""
    from modules.dataset import (
        BadImages,
        list_identity_folders,
    )
    from modules.losses import IoMLoss
    from modules.models import check_projection_bias, latest_checkpoint, stage2_checkpoint
    from modules.training.monitor import holdout_split

    batch = stage2_batch(cfg)
    # Listed once, before any model is built, so a bad folder fails fast.
    folders = list_identity_folders(cfg['train_dataset'], cfg['img_ext'])
    bad_images = BadImages(cfg['bad_images'])
    strategy = strategy or get_strategy()
    if cfg['classes_per_batch'] % strategy.num_replicas_in_sync:
        raise UserError(f"classes_per_batch {cfg['classes_per_batch']} is not divisible by the "
                        f'{strategy.num_replicas_in_sync} replicas')
    total_steps = stage2_total_steps(cfg)
    held = holdout_split(folders.labels, cfg['monitor_holdout'])
    check_projection_bias(cfg, latest_checkpoint(checkpoint_dir(cfg)))
    with strategy.scope():
        net = Stage2Model(cfg)
        # The trained IoM layers and the loss are float32 (only the frozen backbone runs in half
        # precision): their gradients cannot underflow, so no loss scaling.
        optimizer = make_optimizer(cfg, total_steps, loss_scaling=False)
        optimizer.build(net.trainable_variables)
        checkpoint = stage2_checkpoint(net.iom_model, optimizer=optimizer)
    if net.backbone_source is None:
        print('[*] Warning: stage 2 is training on a backbone with random weights.')
    state = RunState(cfg, checkpoint, optimizer, strategy, total_steps, batch)
    # A resumed run draws new PK batches instead of replaying the ones it already trained on.
    seed = state.step

    dataset, embed, monitor = _stage2_dataset(cfg, net, folders, bad_images, seed, held)
    state.bad_images = bad_images

    train_step = _stage2_train_step(cfg, net, IoMLoss(cfg), optimizer, strategy, state, embed)

    evaluator = Stage2Evaluator(cfg, net) if cfg['eval_steps'] else None
    state.start()
    try:
        for batch_inputs, batch_labels in strategy.experimental_distribute_dataset(dataset):
            if state.step >= total_steps:
                break
            total, terms = train_step(batch_inputs, batch_labels)
            state.after_step(total, {f'loss/{k}': v for k, v in terms.items()})
            if cfg['eval_steps'] and state.step % cfg['eval_steps'] == 0:
                if evaluator:
                    evaluator.run(state)
                if monitor:
                    monitor.run(state, net.stack)
        state.save()
        if monitor:  # always once at the end: no shipped config ends unchecked
            monitor.run(state, net.stack, final=True)
    finally:
        state.close()
    summary = {'step': state.step, 'checkpoint': state.manager.latest_checkpoint,
               'images_per_second': state.images_per_second(),
               'steps_per_second': state.images_per_second() / batch, **bad_images.summary()}
    if evaluator:
        summary['eval'] = evaluator.last
    if monitor:
        summary['monitor'] = monitor.last
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
