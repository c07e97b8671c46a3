"""Partial FC: the stage-1 margin head sharded over the replicas and sampled (An et al., 2021/2022).

Every replica of a tf.distribute strategy holds one shard of ceil(num_classes / replicas) class
centres (rows [r*S, (r+1)*S) of the (num_classes, d) centre matrix; the last shard is padded) and
their SGD momentum. Each step, inside `strategy.run`:

1. the replicas all-gather their embeddings and labels (the gather's gradient is an all-reduce, so
   each replica's embedding receives the gradient of every replica's loss term);
2. every replica keeps the classes of its shard that are labels in the global batch (positives)
   plus uniformly sampled other classes of its shard, `ceil(sample_rate * S)` centres in all (more
   only when the shard has more positives than that), and scores only those centres;
3. the softmax is made global: the per-example max is all-gathered (shift only, no gradient), the
   sums of exp and the target logits are all-reduced, so the loss is the cross-entropy over the
   sampled classes of all shards. With `sample_rate` 1 it is exactly the full head's softmax;
4. the sampled centres (and bias rows) get their gradient and a Nesterov-SGD momentum update in
   place, with the trainer's learning rate; centres that were not sampled, and their momentum,
   do not change that step (as InsightFace's arcface_torch does).

Checkpoints hold the full, unpadded centre and momentum matrices (gathered from the shards), so a
run saved on R replicas restores onto any replica count.
"""
import math

import tensorflow as tf

from modules.layers import arc_margin_logits
from modules.utils import UserError

MOMENTUM = 0.9  # as modules.training.make_optimizer: SGD, Nesterov momentum 0.9


class PartialFCHead(tf.__internal__.tracking.Trackable):
    """ArcHead or NormHead whose centres are sharded over the replicas of `strategy` and sampled.

    Build it outside `strategy.scope()` (its shards are per-device variables, not mirrored ones);
    call `replica_loss` and `apply_gradients` inside `strategy.run`.
    """

    def __init__(self, strategy, num_classes, embd_shape, head_type='ArcHead', margin=0.5,
                 logist_scale=64.0, sample_rate=1.0, w_decay=5e-4, seed=0):
        if tf.distribute.has_strategy():
            raise RuntimeError('build PartialFCHead outside strategy.scope(): its shards are '
                               'per-replica variables')
        if head_type not in ('ArcHead', 'NormHead'):
            raise UserError(f"partial_fc: True needs head_type ArcHead or NormHead, got "
                            f'{head_type!r}')
        if not 0.0 < sample_rate <= 1.0:
            raise UserError(f'sample_rate must be in (0, 1], got {sample_rate!r}')
        self.strategy = strategy
        self.num_classes = int(num_classes)
        self.embd_shape = int(embd_shape)
        self.head_type = head_type
        self.margin = float(margin)
        self.logist_scale = float(logist_scale)
        self.sample_rate = float(sample_rate)
        self.w_decay = float(w_decay)
        self.seed = int(seed)
        self.replicas = strategy.num_replicas_in_sync
        self.shard_size = math.ceil(self.num_classes / self.replicas)
        self.num_sampled = math.ceil(self.sample_rate * self.shard_size)
        ids = strategy.run(lambda: tf.distribute.get_replica_context().replica_id_in_sync_group)
        self.local_ids = [int(i) for i in strategy.experimental_local_results(ids)]
        self.names = ['centres'] + (['bias'] if head_type == 'NormHead' else [])
        # Glorot-uniform over the whole (d, num_classes) matrix, as ArcHead and Dense initialise it.
        limit = math.sqrt(6.0 / (self.embd_shape + self.num_classes))
        self.shards = {name: {} for name in self.names}
        self.momenta = {name: {} for name in self.names}
        for rid, device in zip(self.local_ids, strategy.extended.worker_devices):
            with tf.device(device):
                rows = tf.random.stateless_uniform([self.shard_size, self.embd_shape],
                                                   seed=[self.seed, rid], minval=-limit,
                                                   maxval=limit)
                rows *= tf.cast(tf.range(self.shard_size) < self.valid_rows(rid), tf.float32)[:, None]
                initial = {'centres': rows, 'bias': tf.zeros([self.shard_size])}
                for name in self.names:
                    # trainable: a tape then records the gather, whose rows get the gradient.
                    self.shards[name][rid] = tf.Variable(initial[name], trainable=True,
                                                         name=f'{name}_shard_{rid}')
                    self.momenta[name][rid] = tf.Variable(tf.zeros_like(initial[name]),
                                                          trainable=False,
                                                          name=f'{name}_momentum_{rid}')
        # Steps drawn so far: with `seed` and the replica id it seeds the negative sampling.
        self.draws = tf.Variable(0, dtype=tf.int64, trainable=False, name='partial_fc_draws')

    @classmethod
    def from_config(cls, cfg, strategy):
        """The head a validated stage-1 config with `partial_fc: True` asks for."""
        return cls(strategy, cfg['num_classes'], cfg['embd_shape'], cfg['head_type'],
                   cfg['margin'], cfg['logist_scale'], cfg['sample_rate'], cfg['w_decay'])

    def valid_rows(self, rid):
        """Number of real (not padding) classes in replica `rid`'s shard."""
        return min(max(self.num_classes - rid * self.shard_size, 0), self.shard_size)

    def shard_bytes(self):
        """Bytes of one replica's centres, bias and momentum (float32)."""
        per_row = 4 * (self.embd_shape + (1 if 'bias' in self.names else 0))
        return 2 * self.shard_size * per_row

    # ----------------------------------------------------------------------------------------
    # Inside strategy.run.
    @staticmethod
    def _replica_id():
        ctx = tf.distribute.get_replica_context()
        return ctx, int(tf.get_static_value(ctx.replica_id_in_sync_group))

    def sample(self, labels, draw):
        """Shard rows to score for the global `labels`: every positive plus sampled negatives."""
        _, rid = self._replica_id()
        valid = self.valid_rows(rid)
        local = labels - rid * self.shard_size
        in_shard = tf.logical_and(local >= 0, local < valid)
        positive = tf.scatter_nd(tf.where(in_shard, local, self.shard_size)[:, None],
                                 tf.ones_like(local), [self.shard_size + 1])[:self.shard_size] > 0
        wanted = tf.maximum(min(self.num_sampled, valid),
                            tf.reduce_sum(tf.cast(positive, tf.int32)))
        noise = tf.random.stateless_uniform([self.shard_size], seed=tf.stack(
            [tf.cast(self.seed * self.replicas + rid, tf.int64), tf.cast(draw, tf.int64)]))
        score = tf.where(positive, 2.0, noise)  # positives first, then random negatives
        score = tf.where(tf.range(self.shard_size) < valid, score, -1.0)  # never the padding
        return tf.math.top_k(score, wanted, sorted=False).indices

    def replica_loss(self, embds, labels, draw):
        """This replica's term of the global mean cross-entropy, the sampled rows and their indices.

        Returns (loss, rows, index): the loss terms of all replicas sum to the mean over the global
        batch of the softmax cross-entropy over all sampled classes (plus, for NormHead, the L2
        weight decay of the sampled centres); `rows` are the gathered sampled parameter tensors
        (differentiate the loss with respect to them and pass the gradients to
        `apply_gradients`), `index` their rows in this replica's shard.
        """
        ctx, rid = self._replica_id()
        embds = tf.cast(embds, tf.float32)
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        all_embds = ctx.all_gather(embds, axis=0)
        all_labels = ctx.all_gather(labels, axis=0)
        index = self.sample(all_labels, draw)
        rows = [tf.gather(self.shards[name][rid], index) for name in self.names]
        is_target = tf.equal(all_labels[:, None] - rid * self.shard_size, index[None, :])
        if self.head_type == 'ArcHead':
            cos_t = tf.matmul(tf.math.l2_normalize(all_embds, axis=1),
                              tf.math.l2_normalize(rows[0], axis=1), transpose_b=True)
            logits = arc_margin_logits(cos_t, is_target, self.margin, self.logist_scale)
            decay = 0.0
        else:
            logits = tf.matmul(all_embds, rows[0], transpose_b=True) + rows[1][None, :]
            decay = self.w_decay * tf.reduce_sum(tf.square(rows[0]))
        # The max only shifts the exponent (log-sum-exp does not depend on it): no gradient.
        local_max = tf.stop_gradient(tf.reduce_max(logits, axis=1))
        shift = tf.reduce_max(ctx.all_gather(local_max[None], axis=0), axis=0)
        sum_exp, target = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [
            tf.reduce_sum(tf.exp(logits - shift[:, None]), axis=1),
            tf.reduce_sum(tf.where(is_target, logits, 0.0), axis=1)])
        cross_entropy = tf.math.log(sum_exp) + shift - target
        batch = tf.shape(embds)[0]
        mine = cross_entropy[rid * batch:(rid + 1) * batch]
        loss = tf.reduce_sum(mine) / tf.cast(tf.shape(all_embds)[0], tf.float32) + decay
        return loss, rows, index

    def apply_gradients(self, index, grads, learning_rate, apply=True):
        """Nesterov-SGD update of the sampled rows `index` only (Keras SGD's formula).

        `apply` False (a step that dynamic loss scaling skips) leaves rows and momentum as they are.
        """
        _, rid = self._replica_id()
        lr = tf.cast(learning_rate, tf.float32)
        updates = []
        for name, grad in zip(self.names, grads):
            momentum = self.momenta[name][rid]
            old = tf.gather(momentum, index)
            new = old * MOMENTUM - grad * lr
            step = new * MOMENTUM - grad * lr
            if apply is not True:
                new = tf.where(apply, new, old)
                step = tf.where(apply, step, tf.zeros_like(step))
            updates.append(momentum.scatter_update(tf.IndexedSlices(new, index)))
            updates.append(self.shards[name][rid].scatter_add(tf.IndexedSlices(step, index)))
        return tf.group(updates)

    # ----------------------------------------------------------------------------------------
    # Whole-matrix view (checkpoints, tests): independent of the replica count.
    def _shard_values(self, table, name):
        local = {rid: table[name][rid] for rid in self.local_ids}
        if len(local) == self.replicas:
            return tf.concat([tf.convert_to_tensor(local[r]) for r in range(self.replicas)], 0)
        values = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.convert_to_tensor(local[ctx.replica_id_in_sync_group]))
        return self.strategy.gather(values, axis=0)  # across workers: every worker calls this

    def full(self, name='centres', momentum=False):
        """The whole (num_classes, ...) matrix of `name` (or its momentum), unpadded."""
        table = self.momenta if momentum else self.shards
        return self._shard_values(table, name)[:self.num_classes]

    def assign_full(self, values):
        """Set the shards from whole matrices: {'centres': .., 'centres_momentum': .., ...}."""
        pad = self.replicas * self.shard_size - self.num_classes
        for key, value in values.items():
            if key == 'draws':
                self.draws.assign(tf.cast(value, tf.int64))
                continue
            name = key.removesuffix('_momentum')
            table = self.momenta if key.endswith('_momentum') else self.shards
            value = tf.convert_to_tensor(value, tf.float32)
            if value.shape[0] != self.num_classes:
                raise UserError(f'partial_fc checkpoint holds {value.shape[0]} classes for '
                                f"'{name}', the config has num_classes {self.num_classes}")
            value = tf.pad(value, [[0, pad]] + [[0, 0]] * (value.shape.rank - 1))
            for rid in self.local_ids:
                table[name][rid].assign(value[rid * self.shard_size:(rid + 1) * self.shard_size])

    def _serialize_to_tensors(self):
        tensors = {'draws': tf.convert_to_tensor(self.draws)}
        for name in self.names:
            tensors[name] = self.full(name)
            tensors[f'{name}_momentum'] = self.full(name, momentum=True)
        return tensors

    def _restore_from_tensors(self, restored_tensors):
        self.assign_full(restored_tensors)
