"""Stage-1 ArcFace models and the stage-2 Deep IoM hashing model, plus their weight loading."""
import os

import numpy as np
import tensorflow as tf

from modules.backbones import BN_MOMENTUM, Backbone
from modules.config import INSIGHT_UNITS, setting
from modules.layers import (
    ArcMarginPenaltyLogists,
    FusedBatchNormalization,
    IoMHead,
    IoMProjection,
    PermLayer,
    iom_hidden_layers,
)
from modules.utils import UserError

layers = tf.keras.layers

# The stage-1 run the original code started stage 2 from, per backbone (config key stage1_sub_name).
DEFAULT_STAGE1_RUN = {'ResNet50': 'arc_res50', 'MobileNetV2': 'arc_mbv2',
                      **{name: f'arc_{name}' for name in INSIGHT_UNITS}}
# Insight_ResNet100 -> pre_models/resnet100/resnet100.npy, and so on for every depth.
DEFAULT_INSIGHT_WEIGHTS = {
    name: os.path.join('pre_models', f'resnet{depth}', f'resnet{depth}.npy')
    for name in INSIGHT_UNITS for depth in [name.removeprefix('Insight_ResNet')]}


def OutputLayer(in_shape, embd_shape=512, w_decay=5e-4, name='OutputLayer'):
    """Embedding block after the backbone: BN, Dropout(0.5), Flatten, Dense(embd_shape, L2), BN."""
    inputs = layers.Input(in_shape[1:])
    x = FusedBatchNormalization(momentum=BN_MOMENTUM, name='bn_in')(inputs)
    x = layers.Dropout(0.5, name='dropout')(x)
    x = layers.Flatten(name='flatten')(x)
    x = layers.Dense(embd_shape, kernel_regularizer=tf.keras.regularizers.L2(w_decay),
                     name='embedding')(x)
    # float32 under a mixed-precision policy: the embedding that leaves the model stays float32.
    x = FusedBatchNormalization(momentum=BN_MOMENTUM, name='bn_out', dtype='float32')(x)
    return tf.keras.Model(inputs, x, name=name)


def NormHead(num_classes, w_decay=5e-4, name='NormHead'):
    """Plain fully connected classification head (logits)."""
    return layers.Dense(num_classes, kernel_regularizer=tf.keras.regularizers.L2(w_decay), name=name,
                        dtype='float32')  # logits stay float32 under mixed precision


def ArcFaceModel(size=None, channels=3, num_classes=None, name='arcface_model', margin=0.5,
                 logist_scale=64, embd_shape=512, head_type='ArcHead', backbone_type='ResNet50',
                 w_decay=5e-4, use_pretrain=True, training=False):
    """ArcFace model: image -> embedding, or (image, label) -> logits when `training` is True."""
    size = size or 112
    inputs = layers.Input([size, size, channels], name='input_image')
    backbone = Backbone(backbone_type, size, use_pretrain=use_pretrain, w_decay=w_decay)
    features = backbone(inputs)
    embds = OutputLayer(features.shape, embd_shape, w_decay)(features)
    if not training:
        return tf.keras.Model(inputs, embds, name=name)
    if not num_classes:
        raise ValueError('num_classes is required when training=True')
    labels = layers.Input([], name='label', dtype='int64')
    if head_type == 'ArcHead':
        logits = ArcMarginPenaltyLogists(num_classes, margin=margin, logist_scale=logist_scale,
                                         name='ArcHead', dtype='float32')((embds, labels))
    elif head_type == 'NormHead':
        logits = NormHead(num_classes, w_decay)(embds)
    else:
        raise ValueError(f'head_type {head_type!r} is not a stage-1 head')
    return tf.keras.Model((inputs, labels), logits, name=name)


def arcface_from_config(cfg, training=False, use_pretrain=None):
    """ArcFaceModel with every argument taken from a validated config."""
    return ArcFaceModel(size=cfg['input_size'], num_classes=cfg['num_classes'] if training else None,
                        margin=cfg['margin'], logist_scale=cfg['logist_scale'],
                        embd_shape=cfg['embd_shape'], head_type=cfg['head_type'],
                        backbone_type=cfg['backbone_type'], w_decay=cfg['w_decay'],
                        use_pretrain=cfg['use_pretrain'] if use_pretrain is None else use_pretrain,
                        training=training)


def embedding_parts(model):
    """The (backbone, OutputLayer) sub-models of an ArcFaceModel, training or not."""
    nested = [layer for layer in model.layers if isinstance(layer, tf.keras.Model)]
    return nested[0], model.get_layer('OutputLayer')


def stage1_checkpoint(model, **extra):
    """tf.train.Checkpoint over the parts of an ArcFaceModel that stage 2 reuses (and `extra`)."""
    backbone, output_layer = embedding_parts(model)
    return tf.train.Checkpoint(backbone=backbone, output_layer=output_layer, **extra)


def latest_checkpoint(directory):
    """Newest checkpoint prefix in `directory`, or None."""
    return tf.train.latest_checkpoint(directory) if os.path.isdir(directory) else None


def load_backbone_weights(arcface_model, cfg, run=None):
    """Load the embedding model's weights: a stage-1 checkpoint, else pre-built Insight weights.

    `run` names the stage-1 run (default: the config's stage1_sub_name, else the original's run
    for the backbone). Returns what was loaded, or None (after a warning) if nothing was found.
    """
    run = run or setting(cfg, 'stage1_sub_name') or DEFAULT_STAGE1_RUN[cfg['backbone_type']]
    ckpt = latest_checkpoint(os.path.join('checkpoints', run))
    if ckpt:
        stage1_checkpoint(arcface_model).restore(ckpt).expect_partial()
        return f'stage-1 checkpoint {ckpt}'
    where = f'no stage-1 checkpoint in checkpoints/{run}/'
    if cfg['backbone_type'] in INSIGHT_UNITS:
        path = setting(cfg, 'pretrained_weights') or DEFAULT_INSIGHT_WEIGHTS[cfg['backbone_type']]
        if os.path.isfile(path):
            from modules.weights import apply_identity_output_layer, load_npy_weights
            backbone, output_layer = embedding_parts(arcface_model)
            load_npy_weights(backbone, path)
            apply_identity_output_layer(output_layer)
            return f'pre-built weights {path}'
        where += f' and no pre-built weights at {path} (see pre_models/README.md)'
    print(f'[*] Warning: {where}: the backbone has random weights.')
    return None


# --------------------------------------------------------------------------------------------
# Stage 2: Deep Index-of-Max hashing on top of the (frozen) embedding model.


def IoMFaceModel(cfg, arcface_model=None, perm_key=None, name='IoMface_model'):
    """input_image -> arcface_model -> [hidden] -> perm_layer -> IoMProjection -> IoMHead.

    The permutation sits where `perm_position` puts it (default: right before the projection;
    'input' keeps the original perm -> hidden order). With training=False it gives the integer
    Index-of-Max code (batch, m). Keras passes a training=True call on to every nested layer, the
    embedding model's dropout included, so the stage-2 trainer runs the frozen embedding model and
    the IoM stack (iom_stack_model) apart.
    """
    if arcface_model is None:
        arcface_model = arcface_from_config(cfg, use_pretrain=False)
    size = cfg['input_size']
    inputs = layers.Input([size, size, 3], name='input_image')
    x = arcface_model(inputs)
    for layer in iom_layers(cfg, setting(cfg, 'perm_key') if perm_key is None else perm_key):
        x = layer(x)
    return tf.keras.Model(inputs, x, name=name)


def iom_layers(cfg, perm_key=None):
    """New perm_layer, hidden layers, IoMProjection and IoMHead for a stage-2 config, in order.

    A permutation in front of trained hidden layers breaks them under any key but the training
    one (their Dense weights and BatchNorm statistics belong to the unpermuted feature order), so
    by default it acts on the hidden layers' output, where a new key only turns the projection
    into another one of the same statistics, exactly as for a stack without hidden layers.
    """
    perm = PermLayer(perm_key, name='perm_layer')
    hidden = iom_hidden_layers(cfg['hidden_layer_remark'])
    front = [perm] + hidden if setting(cfg, 'perm_position') == 'input' else hidden + [perm]
    projection = IoMProjection(cfg['m'], cfg['q'], use_bias=setting(cfg, 'iom_projection_bias'),
                               orthogonal_groups=setting(cfg, 'iom_orthogonal_groups'),
                               tight_frame=setting(cfg, 'iom_tight_frame'))
    return front + [projection, IoMHead(cfg['m'], cfg['q'], T=cfg['T'], name='IoMHead')]


def check_rekeyable(cfg):
    """UserError when the model of `cfg` works only under the key it was trained with: hidden
    layers after the permutation."""
    if (setting(cfg, 'perm_position') == 'input'
            and cfg['hidden_layer_remark'] not in ('1', 'T1')):
        raise UserError(
            f"{cfg['sub_name']}: its hidden layers ('{cfg['hidden_layer_remark']}') come after the "
            "key permutation (perm_position: input), so its codes are valid only under the key "
            f"it was trained with (perm_key {setting(cfg, 'perm_key')}); a gallery key or a new key "
            'means training stage 2 again with perm_position: projection (the default), about '
            "a minute for the quickstart's 400 steps with cache_embeddings on 2 CPU cores")


def check_projection_bias(cfg, ckpt):
    """UserError when the stage-2 checkpoint `ckpt` and `cfg` disagree on the projection's bias.

    A restore would silently drop a saved bias (or leave a wanted one at zero), changing every
    code; the one config key that restores the checkpoint's layer is named instead.
    """
    if not ckpt:
        return
    names = {name for name, _ in tf.train.list_variables(ckpt)}
    # stage2_checkpoint numbers perm_layer first, the projection second to last (before IoMHead).
    index = len(iom_hidden_layers(cfg['hidden_layer_remark'])) + 1
    saved = f'layer_{index}/bias/.ATTRIBUTES/VARIABLE_VALUE' in names
    wanted = bool(setting(cfg, 'iom_projection_bias'))
    if saved != wanted:
        raise UserError(
            f"{ckpt}: the IoM projection was trained {'with' if saved else 'without'} a bias but "
            f"the config has iom_projection_bias: {str(wanted).lower()}; set iom_projection_bias: "
            f"{str(saved).lower()} to load it" + (
                ' (the seed\'s layer; its codes may fail the key-change check, '
                'docs/protection.md)' if saved else ''))


def trained_iom_layers(iom_model):
    """The layers of an IoM model after the embedding model, up to IoMHead, in order."""
    start = [layer.name for layer in iom_model.layers].index('arcface_model') + 1
    return list(iom_model.layers[start:])


def with_perm_key(stack, perm_key):
    """A copy of the layer list `stack` whose perm_layer is replaced by one of `perm_key`
    (None: the identity)."""
    return [PermLayer(perm_key, name='perm_layer') if layer.name == 'perm_layer' else layer
            for layer in stack]


def iom_stack_model(iom_model, embd_shape):
    """Model from the embedding to the code that shares its layers with `iom_model`."""
    inputs = layers.Input([embd_shape], name='embedding')
    x = inputs
    for layer in trained_iom_layers(iom_model):
        x = layer(x)
    return tf.keras.Model(inputs, x, name='iom_stack')


def stage2_checkpoint(iom_model, **extra):
    """tf.train.Checkpoint over the trainable IoM layers (the frozen backbone is not duplicated)."""
    stack = trained_iom_layers(iom_model)
    # Numbered in the original order (perm_layer first, then hidden, projection, head), so
    # checkpoints keep their names wherever the permutation sits.
    ordered = sorted(stack, key=lambda layer: layer.name != 'perm_layer')
    tracked = {f'layer_{i}': layer for i, layer in enumerate(ordered)}
    return tf.train.Checkpoint(**tracked, **extra)


def load_iom_model(cfg, perm_key=None, verbose=True):
    """Build the IoM model from a stage-2 config and load every weight it can find.

    The embedding model comes from load_backbone_weights; the IoM layers from the newest checkpoint
    in checkpoints/<sub_name>/. Missing IoM weights leave a random projection, with a warning.
    """
    arcface_model = arcface_from_config(cfg, use_pretrain=False)
    source = load_backbone_weights(arcface_model, cfg)
    model = IoMFaceModel(cfg, arcface_model, perm_key)
    ckpt = latest_checkpoint(os.path.join('checkpoints', cfg['sub_name']))
    if ckpt:
        check_projection_bias(cfg, ckpt)
        stage2_checkpoint(model).restore(ckpt).expect_partial()
    else:
        print(f"[*] Warning!!!! Cannot find ckpt from checkpoints/{cfg['sub_name']}, random weight "
              'of IoM layer will be used.')
    if verbose and source:
        print(f'[*] embedding model loaded from {source}')
    model.loaded_from = {'backbone': source, 'iom': ckpt}
    return model


def iom_codes(iom_model, embeddings, perm_key=None, batch_size=1024):
    """Hash precomputed embeddings with the model's IoM layers, optionally under another key."""
    stack = trained_iom_layers(iom_model)
    if perm_key is not None:
        stack = with_perm_key(stack, perm_key)
    return stack_codes(stack, embeddings, batch_size)


def stack_codes(stack, embeddings, batch_size=1024):
    """Integer codes (N, m) of precomputed embeddings through a list of IoM layers (inference)."""
    out = []
    for begin in range(0, len(embeddings), batch_size):
        x = tf.convert_to_tensor(embeddings[begin:begin + batch_size], tf.float32)
        for layer in stack:
            x = layer(x, training=False)
        out.append(x.numpy())
    return np.concatenate(out) if out else np.zeros((0, stack[-1].m), np.int32)


# Seed of the random-IoM baseline's projection: the one stage 2's key-change monitor draws
# (modules/training/monitor.py), so the tester's random row and the monitor's are the same IoM.
RANDOM_IOM_SEED = 20_180_101


def random_iom_codes(embeddings, m, q, perm_key=None, seed=RANDOM_IOM_SEED, batch_size=4096):
    """Jin et al.'s random IoM: the embedding under the key's permutation, m Gaussian N(0, 1)
    projections to q values each (drawn from `seed`), the index of each group's maximum."""
    from modules.layers import key_permutation
    x = np.asarray(embeddings, np.float32)
    if x.ndim != 2:
        raise UserError(f'embeddings must be (N, d), got shape {x.shape}')
    if m < 1 or q < 2:
        raise UserError(f'random IoM needs m >= 1 and q >= 2, got m={m}, q={q}')
    d = x.shape[1]
    # Drawn in float64 and cast, as the monitor draws it: the same seed gives the same projection.
    projection = np.random.default_rng(seed).standard_normal((d, m * q)).astype(np.float32)
    x = x[:, key_permutation(perm_key, d)]
    codes = np.empty((len(x), m), np.int32)
    for begin in range(0, len(x), batch_size):  # bounded (batch, m*q) blocks, not per item
        z = x[begin:begin + batch_size] @ projection
        codes[begin:begin + batch_size] = z.reshape(-1, m, q).argmax(axis=2)
    return codes


def iom_hasher(iom_model, is_flip=False):
    """Callable mapping an image batch to IoM codes; flip TTA sums the two float embeddings first."""
    arcface_model = iom_model.get_layer('arcface_model')
    stack = iom_stack_model(iom_model, arcface_model.output.shape[-1])

    def hash_images(images):
        embds = arcface_model(images, training=False)
        if is_flip:
            embds = embds + arcface_model(tf.image.flip_left_right(images), training=False)
        return stack(embds, training=False)

    return hash_images
