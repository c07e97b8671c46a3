"""Feature extractors: Keras applications (ResNet50, MobileNetV2) and InsightFace's LResNet-IR.

Every backbone takes RGB float images in [0, 1] and does its own input normalisation, so the
rest of the toolkit never needs to know which backbone it feeds.
"""
import os
import warnings

import tensorflow as tf

from modules.config import INSIGHT_BN_EPS, INSIGHT_FILTERS, INSIGHT_UNITS
from modules.layers import FusedBatchNormalization

layers = tf.keras.layers

# ImageNet weight files as Keras caches them (keras.utils.get_file into ~/.keras/models).
_IMAGENET_FILES = {
    'ResNet50': 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5',
    'MobileNetV2': 'mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5',
}
BN_MOMENTUM = 0.9


def cached_imagenet_weights(backbone_type):
    """Path of the locally cached ImageNet weights for a Keras backbone, or None if not cached."""
    keras_home = os.environ.get('KERAS_HOME', os.path.join(os.path.expanduser('~'), '.keras'))
    path = os.path.join(keras_home, 'models', _IMAGENET_FILES[backbone_type])
    return path if os.path.isfile(path) else None


def _keras_application(backbone_type, input_shape, use_pretrain):
    weights = None
    if use_pretrain:
        weights = cached_imagenet_weights(backbone_type)
        if weights is None:
            warnings.warn(f'{backbone_type}: ImageNet weights are not in the local Keras cache '
                          f'({_IMAGENET_FILES[backbone_type]}); nothing is downloaded, the backbone '
                          'starts from random initialisation.', stacklevel=3)
    if backbone_type == 'ResNet50':
        app, preprocess = tf.keras.applications.ResNet50, tf.keras.applications.resnet50
    else:
        app, preprocess = tf.keras.applications.MobileNetV2, tf.keras.applications.mobilenet_v2
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*input_shape.*')
        net = app(input_shape=input_shape, include_top=False, weights=weights)
    net = _with_fused_batch_norm(net)
    inputs = layers.Input(input_shape)
    x = preprocess.preprocess_input(inputs * 255.0)
    return tf.keras.Model(inputs, net(x), name=backbone_type.lower())


def _with_fused_batch_norm(net):
    """A copy of a Keras application with every BatchNormalization on the fused kernel.

    Same layer names and weights. keras.applications use momentum 0.99 / 0.999: the moving
    statistics would lag far behind a short or fine-tuning run and collapse inference-mode
    embeddings, so the copies get 0.9, as InsightFace.
    """
    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, layers.BatchNormalization):
            return FusedBatchNormalization.from_config(dict(config, momentum=BN_MOMENTUM))
        return layer.__class__.from_config(config)

    fused = tf.keras.models.clone_model(net, clone_function=clone)
    fused.set_weights(net.get_weights())
    return fused


def _bn(name, scale=True):
    return FusedBatchNormalization(epsilon=INSIGHT_BN_EPS, momentum=BN_MOMENTUM, scale=scale, name=name)


def _ir_unit(x, filters, stride, dim_match, prefix, w_decay):
    """One 'IR' residual unit (InsightFace residual_unit_v3): BN-conv-BN-PReLU-conv-BN + shortcut."""
    reg = tf.keras.regularizers.L2(w_decay) if w_decay else None

    def conv(kernel, strides, name):
        # MXNet/PyTorch pad kernel // 2 on every side; TF 'same' with stride 2 on an even size
        # pads only bottom/right, which would shift the grid against converted weights.
        padding = 'valid' if strides > 1 and kernel > 1 else 'same'
        return layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=False,
                             kernel_regularizer=reg, name=name)

    y = _bn(prefix + '_bn1')(x)
    y = conv(3, 1, prefix + '_conv1')(y)
    y = _bn(prefix + '_bn2')(y)
    y = layers.PReLU(name=prefix + '_relu1')(y)
    if stride > 1:
        y = layers.ZeroPadding2D(1, name=prefix + '_conv2_pad')(y)
    y = conv(3, stride, prefix + '_conv2')(y)
    y = _bn(prefix + '_bn3')(y)
    if dim_match:
        shortcut = x
    else:
        shortcut = conv(1, stride, prefix + '_conv1sc')(x)
        shortcut = _bn(prefix + '_sc')(shortcut)
    return layers.Add(name=prefix + '_plus')([y, shortcut])


def insight_resnet(backbone_type, input_shape=(112, 112, 3), embd_shape=512, w_decay=5e-4):
    """InsightFace LResNet-IR ('E' output: BN, Dropout 0.4, Dense, BN without scale), MXNet names."""
    units = INSIGHT_UNITS[backbone_type]
    inputs = layers.Input(input_shape)
    # The MXNet graph normalised (x - 127.5) / 128 on 0..255 pixels; our inputs are 0..1.
    x = layers.Rescaling(255.0 / 128.0, offset=-127.5 / 128.0, name='input_norm')(inputs)
    x = layers.Conv2D(INSIGHT_FILTERS[0], 3, padding='same', use_bias=False, name='conv0')(x)
    x = _bn('bn0')(x)
    x = layers.PReLU(name='relu0')(x)
    for stage, (count, filters) in enumerate(zip(units, INSIGHT_FILTERS), start=1):
        for unit in range(1, count + 1):
            x = _ir_unit(x, filters, 2 if unit == 1 else 1, unit > 1,
                         f'stage{stage}_unit{unit}', w_decay)
    x = _bn('bn1')(x)
    x = layers.Dropout(0.4, name='dropout')(x)
    x = layers.Flatten(name='flatten')(x)
    x = layers.Dense(embd_shape, name='pre_fc1')(x)
    x = _bn('fc1', scale=False)(x)  # MXNet fix_gamma=True: no learned scale
    return tf.keras.Model(inputs, x, name=backbone_type.lower())


def Backbone(backbone_type='ResNet50', input_size=112, use_pretrain=True, w_decay=5e-4):
    """Build the feature extractor named by `backbone_type` for square RGB [0, 1] inputs."""
    input_shape = (input_size, input_size, 3)
    if backbone_type in _IMAGENET_FILES:
        return _keras_application(backbone_type, input_shape, use_pretrain)
    if backbone_type in INSIGHT_UNITS:
        return insight_resnet(backbone_type, input_shape, w_decay=w_decay)
    raise ValueError(f'unknown backbone_type {backbone_type!r}')
