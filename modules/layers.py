"""Keras layers of the two stages: the ArcFace margin head and the Index-of-Max (IoM) hashing stack.

Stage 1 trains a backbone with `ArcMarginPenaltyLogists`. Stage 2 stacks, on the frozen embedding,
`PermLayer` (a keyed, fixed feature permutation: cancelable biometrics), optional hidden layers
(`iom_hidden_layers`), the `IoMProjection` Dense(m*q) and `IoMHead`, which turns each of the m groups
of q projections into one index in [0, q): soft (differentiable) in training, argmax at inference.
"""
import math

import numpy as np
import tensorflow as tf

from modules.utils import UserError

_PACKAGE = 'IoMFace'


def _check_positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise UserError(f'{what} must be a positive integer, got {value!r}')
    return int(value)


# ---------------------------------------------------------------------------------------------
@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class FusedBatchNormalization(tf.keras.layers.BatchNormalization):
    """Keras' BatchNormalization computed by TensorFlow's fused kernel (`FusedBatchNormV3`).

    Keras 3 normalises with separate moments / subtract / scale ops; the fused kernel does the
    forward pass in one op and the backward pass in one gradient op, which is what made tf-keras
    backbones ~1.6x faster per step on the CPU. Same variables, names, momentum and epsilon as the
    parent, so checkpoints and `.npy` weights load unchanged, and `isinstance(.., BatchNormalization)`
    holds. Inference: y = gamma * (x - moving_mean) / sqrt(moving_variance + eps) + beta.
    Training: y uses the batch mean and the biased batch variance, exactly as Keras; the moving
    variance is updated with the *unbiased* batch variance (factor n / (n - 1), n = N*H*W), as
    tf-keras' fused path and PyTorch do, where Keras 3 uses the biased one. Channel-last inputs of
    rank 2 or 4 take the fused path (rank 2 as (N, 1, 1, C)); anything else (masks, renorm, other
    axes or ranks) falls back to the parent's ops.
    """

    def _fusable(self, inputs, mask):
        rank = len(inputs.shape)
        return (mask is None and not self.renorm and rank in (2, 4)
                and self.axis in (-1, rank - 1))

    def call(self, inputs, training=None, mask=None):
        """Normalise `inputs` with the fused kernel; update the moving statistics in training."""
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        x = inputs
        if x.dtype not in (tf.float16, tf.bfloat16, tf.float32):
            x = tf.cast(x, tf.float32)
        shape = tf.shape(x)
        if len(inputs.shape) == 2:
            x = tf.reshape(x, [-1, 1, 1, inputs.shape[-1]])
        channels = inputs.shape[-1]
        gamma = self.gamma if self.scale else tf.ones([channels], tf.float32)
        beta = self.beta if self.center else tf.zeros([channels], tf.float32)
        training = bool(training) and self.trainable
        y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=tf.cast(gamma, tf.float32), offset=tf.cast(beta, tf.float32),
            mean=tf.cast(self.moving_mean, tf.float32),
            variance=tf.cast(self.moving_variance, tf.float32),
            epsilon=float(self.epsilon),
            # With a factor below 1 the kernel returns the updated running averages itself:
            # (1 - f) * moving + f * batch, f = 1 - momentum.
            exponential_avg_factor=1.0 - float(self.momentum) if training else 1.0,
            data_format='NHWC', is_training=training)
        if training:
            self.moving_mean.assign(tf.cast(mean, self.moving_mean.dtype))
            self.moving_variance.assign(tf.cast(variance, self.moving_variance.dtype))
        if len(inputs.shape) == 2:
            y = tf.reshape(y, shape)
        return tf.cast(y, self.compute_dtype)


# ---------------------------------------------------------------------------------------------
@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
def arc_margin_logits(cos_t, is_target, margin, scale):
    """ArcFace logits: s*cos(t + m) where `is_target`, s*cos(t) elsewhere.

    cos(t + m) = cos t cos m - sin t sin m, with sin t = sqrt(1 - cos^2 t). Where t + m would pass
    pi (cos t <= cos(pi - m)) cos(t + m) stops decreasing in t, so the logit falls back to the
    monotone `cos t - m sin(pi - m)` (= cos t - m sin m), as in InsightFace.
    """
    # The floor keeps d sin/d cos finite where |cos t| reaches 1.
    sin_t = tf.sqrt(tf.clip_by_value(1.0 - tf.square(cos_t), 1e-12, 1.0))
    cos_mt = cos_t * math.cos(margin) - sin_t * math.sin(margin)
    cos_mt = tf.where(cos_t > math.cos(math.pi - margin), cos_mt,
                      cos_t - math.sin(math.pi - margin) * margin)
    return tf.where(is_target, cos_mt, cos_t) * scale


class ArcMarginPenaltyLogists(tf.keras.layers.Layer):
    """ArcFace head: logits s*cos(t + m) for the true class and s*cos(t) for the others.

    Inputs: a pair (embds (batch, d) float, labels (batch,) int). The weight `w` (d, num_classes)
    and the embeddings are L2-normalised, so cos t = <e/|e|, w_c/|w_c|>; the margin is applied by
    `arc_margin_logits`.
    """

    def __init__(self, num_classes, margin=0.5, logist_scale=64, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = _check_positive_int(num_classes, 'ArcMarginPenaltyLogists num_classes')
        self.margin = float(margin)
        self.logist_scale = float(logist_scale)
        if self.margin < 0:
            raise UserError(f'ArcMarginPenaltyLogists margin must be >= 0, got {margin!r}')
        if self.logist_scale <= 0:
            raise UserError(f'ArcMarginPenaltyLogists logist_scale must be > 0, got '
                            f'{logist_scale!r}')

    def build(self, input_shape):
        """Create the class-centre weight from the embedding size."""
        embd_shape = input_shape[0]
        self.w = self.add_weight(name='weights', shape=(int(embd_shape[-1]), self.num_classes),
                                 initializer='glorot_uniform', trainable=True)

    def call(self, inputs):
        """Return (batch, num_classes) scaled logits with the additive angular margin applied."""
        embds, labels = inputs
        embds = tf.cast(embds, tf.float32)
        normed_embds = tf.math.l2_normalize(embds, axis=1)
        normed_w = tf.math.l2_normalize(tf.cast(self.w, tf.float32), axis=0)
        cos_t = tf.matmul(normed_embds, normed_w)
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        is_target = tf.one_hot(labels, depth=self.num_classes, on_value=True, off_value=False,
                               dtype=tf.bool)
        return arc_margin_logits(cos_t, is_target, self.margin, self.logist_scale)

    def compute_output_shape(self, input_shape):
        """(batch, num_classes)."""
        return (input_shape[0][0], self.num_classes)

    def get_config(self):
        """Constructor arguments, for model saving."""
        config = super().get_config()
        config.update(num_classes=self.num_classes, margin=self.margin,
                      logist_scale=self.logist_scale)
        return config


# ---------------------------------------------------------------------------------------------
def key_permutation(key, n):
    """The permutation of range(n) a key selects: np.random.default_rng(key).permutation(n)."""
    if key is None:
        return np.arange(n)
    if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
        raise UserError(f'perm_key must be a non-negative integer or null, got {key!r}')
    return np.random.default_rng(int(key)).permutation(n)


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class PermLayer(tf.keras.layers.Layer):
    """Permute the last axis with the fixed permutation `key_permutation(perm_key, n)`.

    The permutation is a constant built in build(), not a weight (0 parameters): changing the key
    re-issues a protected template without retraining. perm_key None is the identity.
    """

    def __init__(self, perm_key=None, **kwargs):
        super().__init__(**kwargs)
        if perm_key is not None:
            key_permutation(perm_key, 1)  # validate early, with the user-facing message
            perm_key = int(perm_key)
        self.perm_key = perm_key
        self._perm = None

    def build(self, input_shape):
        """Derive the index array from the key and the feature size."""
        if self.perm_key is not None:
            self._perm = key_permutation(self.perm_key, int(input_shape[-1])).astype(np.int32)

    def call(self, inputs):
        """Return the inputs with their features reordered."""
        if self._perm is None:
            return tf.identity(inputs)
        return tf.gather(inputs, self._perm, axis=-1)

    def compute_output_shape(self, input_shape):
        """Same shape as the input."""
        return tuple(input_shape)

    def get_config(self):
        """Constructor arguments, for model saving."""
        config = super().get_config()
        config.update(perm_key=self.perm_key)
        return config


# ---------------------------------------------------------------------------------------------
@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class IoMHead(tf.keras.layers.Layer):
    """Index-of-Max hashing: (batch, m*q) projections -> m indices in [0, q).

    The input is viewed as (batch, m, q). Training: soft index per group
    s = sum_j j * softmax(z / T)_j, j = 0..q-1 (float32, in [0, q-1], differentiable).
    Inference: argmax_j z_j (int32). Both use the same 0..q-1 range, and as T -> 0 the soft index
    tends to the argmax. No weights.

    The soft path is one softmax over the (batch, m, q) view with a hand-written gradient
    dz = p * (G - sum_j p_j G_j) / T, G_j = dL/dp_j + j dL/ds, and by default runs as one
    XLA-fused kernel (jit_compile=True), about twice as fast as the separate TF kernels on
    these short (q) rows; jit_compile=False gives the same numbers without XLA.
    """

    def __init__(self, m, q, T=1.0, jit_compile=True, **kwargs):
        super().__init__(**kwargs)
        self.jit_compile = bool(jit_compile)
        self.m = _check_positive_int(m, 'IoMHead m')
        self.q = _check_positive_int(q, 'IoMHead q')
        if self.q < 2:
            raise UserError(f'IoMHead q must be at least 2, got {q!r}')
        self.T = float(T)
        if not self.T > 0:
            raise UserError(f'IoMHead temperature T must be > 0, got {T!r}')

    def build(self, input_shape):
        """Check that the input holds m*q features."""
        if input_shape[-1] is not None and int(input_shape[-1]) != self.m * self.q:
            raise ValueError(f'IoMHead(m={self.m}, q={self.q}) needs {self.m * self.q} input '
                             f'features, got {input_shape[-1]}')

    def _groups(self, inputs):
        # float32 even under mixed precision: z / T with a small T would overflow float16.
        return tf.reshape(tf.cast(inputs, tf.float32), [-1, self.m, self.q])

    def soft_outputs(self, inputs):
        """(soft indices (batch, m), assignments (batch, m, q)) from one softmax, for the losses."""
        fn = _soft_assign_xla if self.jit_compile else _soft_assign
        return fn(self._groups(inputs), self.T)

    def probabilities(self, inputs):
        """Soft assignments softmax(z / T) over each group: (batch, m, q), rows sum to 1."""
        return self.soft_outputs(inputs)[1]

    def soft_indices(self, inputs):
        """Differentiable indices sum_j j * p_j: (batch, m) float32 in [0, q-1]."""
        return self.soft_outputs(inputs)[0]

    def hard_indices(self, inputs):
        """Argmax index of each group: (batch, m) int32."""
        return tf.argmax(self._groups(inputs), axis=-1, output_type=tf.int32)

    def call(self, inputs, training=False):
        """Soft indices when training, integer argmax indices otherwise."""
        if training:
            return self.soft_indices(inputs)
        return self.hard_indices(inputs)

    def compute_output_shape(self, input_shape):
        """(batch, m)."""
        return (input_shape[0], self.m)

    def get_config(self):
        """Constructor arguments, for model saving."""
        config = super().get_config()
        config.update(m=self.m, q=self.q, T=self.T, jit_compile=self.jit_compile)
        return config


def _soft_assign(z, T):
    """(sum_j j p_j, p) with p = softmax(z / T) over the last axis; gradient written out."""
    @tf.custom_gradient
    def soft(z):
        # The group size comes from the runtime shape: with reduce_retracing the traced static
        # shape may be unknown.
        idx = tf.cast(tf.range(tf.shape(z)[-1]), z.dtype)
        p = tf.nn.softmax(z / T, axis=-1)
        s = tf.reduce_sum(p * idx, axis=-1)

        def grad(g_s, g_p):
            # s is linear in p, so its upstream folds into the softmax's: G_j = g_p_j + j g_s.
            terms = [t for t in (None if g_s is None else idx * g_s[..., None], g_p)
                     if t is not None]
            upstream = tf.add_n(terms) if terms else tf.zeros_like(p)
            centred = upstream - tf.reduce_sum(p * upstream, axis=-1, keepdims=True)
            return p * centred / T

        return (s, p), grad

    return soft(z)


_soft_assign_xla = tf.function(_soft_assign, jit_compile=True, reduce_retracing=True)


def expected_index(probs):
    """Expected index sum_j j * probs[..., j] of assignments over the last axis."""
    q = probs.shape[-1]
    return tf.reduce_sum(probs * tf.range(q, dtype=probs.dtype), axis=-1)


# ---------------------------------------------------------------------------------------------
HIDDEN_LAYER_REMARKS = ('1', '2', '3', 'T1', 'T2')


def iom_hidden_layers(remark, name_prefix=''):
    """Layers between PermLayer and IoMProjection for a `hidden_layer_remark`.

    - '1':  none (the projection reads the permuted embedding directly).
    - '2':  Dense(1024) (linear) -> BatchNormalization -> Dropout(0.5).
    - '3':  [Dense(512, relu) -> Dropout(0.5) -> BatchNormalization] twice.
    - 'T1': as '1'; 'T2': as '3'. The T variants differ only by the softmax temperature (default
      0.01) that the caller passes to IoMHead.
    """
    remark = str(remark)
    if remark not in HIDDEN_LAYER_REMARKS:
        raise UserError(f"hidden_layer_remark is {remark!r}; allowed: "
                        + ', '.join(HIDDEN_LAYER_REMARKS))
    layers = tf.keras.layers
    p = name_prefix
    if remark in ('1', 'T1'):
        return []
    if remark == '2':
        return [layers.Dense(1024, name=f'{p}hidden_dense_1'),
                FusedBatchNormalization(name=f'{p}hidden_bn_1'),
                layers.Dropout(0.5, name=f'{p}hidden_dropout_1')]
    out = []
    for i in (1, 2):
        out += [layers.Dense(512, activation='relu', name=f'{p}hidden_dense_{i}'),
                layers.Dropout(0.5, name=f'{p}hidden_dropout_{i}'),
                FusedBatchNormalization(name=f'{p}hidden_bn_{i}')]
    return out


def tight_frame(w):
    """The nearest (d, n) kernel, d <= n, whose rows are orthogonal and of one norm (W W^T = s^2 I,
    s the mean singular value): (W W^T)^(-1/2) W rescaled, from the eigenvectors of W W^T."""
    e, u = tf.linalg.eigh(tf.matmul(w, w, transpose_b=True))
    s = tf.sqrt(tf.maximum(e, 1e-12))
    return tf.matmul(u * (tf.reduce_mean(s) / s), tf.matmul(u, w, transpose_a=True))


@tf.keras.utils.register_keras_serializable(package='iomface')
class IoMKernelConstraint(tf.keras.constraints.Constraint):
    """Keeps a (d, m*q) IoM kernel shaped like a random one, after every update: `tight_frame`
    makes it a tight frame first (tight_frame; when d <= m*q), `orthogonal_groups` then replaces
    each group's q columns W_g by the nearest orthonormal set, U V^T from W_g = U S V^T, times the
    kernel's mean column norm.

    Three ways a trained projection without a bias decides a group's argmax whatever the key: a
    column that outgrows the others wins most inputs, and so does a column set apart from the
    rest of its group (the argmax of correlated scores favours the odd one out); and a kernel
    that collapses onto a few directions (low rank: every group shared the same few) makes every
    code a mix of the same few patterns, so codes under two keys agree far above chance for some
    pairs of keys. Random IoM has none of the three: its N(0, 1) columns are nearly orthogonal
    and of one norm, and its spectrum is spread (docs/protection.md, "Real faces").
    """

    def __init__(self, q, orthogonal_groups=True, tight_frame=True):
        self.q = int(q)
        self.orthogonal_groups = bool(orthogonal_groups)
        self.tight_frame = bool(tight_frame)

    def __call__(self, w):
        d, width = w.shape
        scale = tf.reduce_mean(tf.norm(w, axis=0))
        if self.tight_frame and d <= width:
            w = tight_frame(w)
        if not self.orthogonal_groups:
            return w
        groups = tf.transpose(tf.reshape(w, (d, width // self.q, self.q)), (1, 0, 2))  # (m, d, q)
        # U V^T = W_g (W_g^T W_g)^(-1/2): a q x q eigendecomposition per group is ~5x faster on
        # CPU than the SVD of the d x q group.
        e, v = tf.linalg.eigh(tf.matmul(groups, groups, transpose_a=True))
        inv_sqrt = tf.matmul(v * tf.math.rsqrt(tf.maximum(e, 1e-12))[:, None, :], v, transpose_b=True)
        nearest = tf.matmul(groups, inv_sqrt)
        return tf.reshape(tf.transpose(nearest, (1, 0, 2)), (d, width)) * scale

    def get_config(self):
        """The group size and which of the two shapes is kept."""
        return {'q': self.q, 'orthogonal_groups': self.orthogonal_groups,
                'tight_frame': self.tight_frame}


def IoMProjection(m, q, name='IoMProjection', seed=None, use_bias=True, orthogonal_groups=False,
                  tight_frame=False):
    """Dense(m*q) with N(0, 1) kernel init: the random IoM projection (trained in stage 2).

    `use_bias` False drops the additive term b of W.P(x) + b: the key permutes x but never b, so
    a trained b shifts every group's argmax the same way under every key (docs/protection.md,
    "Real faces"); True is the seed's layer. `orthogonal_groups` keeps each group's columns
    orthonormal (times one scale) while training, and `tight_frame` the kernel's rows orthogonal
    and of one norm (IoMKernelConstraint); nothing changes at inference.
    """
    m = _check_positive_int(m, 'IoM m')
    q = _check_positive_int(q, 'IoM q')
    init = tf.keras.initializers.RandomNormal(mean=0.0, stddev=1.0, seed=seed)
    return tf.keras.layers.Dense(m * q, kernel_initializer=init, use_bias=bool(use_bias), name=name,
                                 kernel_constraint=(
                                     IoMKernelConstraint(q, orthogonal_groups, tight_frame)
                                     if orthogonal_groups or tight_frame else None))
