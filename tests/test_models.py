"""Model facts: parameter counts, layer names of the IoM model, what stage 2 trains."""
import numpy as np
import pytest
import tensorflow as tf

from modules.config import STAGE2_REQUIRED, load_config, validate_config
from modules.models import ArcFaceModel, IoMFaceModel, iom_codes, iom_hasher, iom_stack_model


def count(weights):
    return int(sum(np.prod(w.shape) for w in weights))


@pytest.fixture(scope='module')
def res100():
    return ArcFaceModel(size=112, backbone_type='Insight_ResNet100', training=False)


def test_insight_resnet100_parameter_counts(res100):
    assert res100.count_params() == 70_899_904
    assert count(res100.non_trainable_weights) == 71_680


def test_cfg15_iom_model_matches_original_summary(res100):
    cfg = load_config('configs/config_15/cfg15_allloss_res100_512x8.yaml', STAGE2_REQUIRED)
    # The original summary is the seed's layer (with a bias); the default drops its 4,096 biases.
    assert IoMFaceModel(cfg, res100).get_layer('IoMProjection').count_params() == 2_097_152
    model = IoMFaceModel(dict(cfg, iom_projection_bias=True), res100)
    names = [layer.name for layer in model.layers]
    assert names == ['input_image', 'arcface_model', 'perm_layer', 'IoMProjection', 'IoMHead']
    assert model.get_layer('perm_layer').count_params() == 0
    assert model.get_layer('IoMProjection').count_params() == 2_101_248
    assert model.count_params() == 73_001_152
    assert count(model.trainable_weights) == 72_929_472
    assert count(model.non_trainable_weights) == 71_680
    assert model.output.shape[-1] == 512


def small_cfg(**extra):
    raw = dict(batch_size=8, sub_name='t', backbone_type='MobileNetV2', train_dataset='x',
               num_classes=4, num_samples=8, epochs=1, base_lr=0.01, test_dataset='x', m=16, q=4,
               loss_fun='batch_hard_triplet', classes_per_batch=2, samples_per_class=4,
               use_pretrain=False, input_size=32)
    raw.update(extra)
    return validate_config(raw, 'test', STAGE2_REQUIRED)


@pytest.mark.parametrize('head_type', ['ArcHead', 'NormHead'])
def test_training_model_gives_logits(head_type):
    model = ArcFaceModel(size=32, backbone_type='MobileNetV2', num_classes=5, head_type=head_type,
                         use_pretrain=False, training=True)
    logits = model((np.random.rand(2, 32, 32, 3).astype('float32'), np.array([0, 3])))
    assert logits.shape == (2, 5)


@pytest.mark.parametrize('remark', ['1', '2', '3'])
def test_iom_codes_paths_agree(remark):
    cfg = small_cfg(hidden_layer_remark=remark)
    model = IoMFaceModel(cfg, ArcFaceModel(size=32, backbone_type='MobileNetV2', use_pretrain=False))
    images = np.random.rand(3, 32, 32, 3).astype('float32')
    codes = model(images, training=False).numpy()
    assert codes.shape == (3, 16) and codes.dtype == np.int32
    assert codes.min() >= 0 and codes.max() < 4
    embds = model.get_layer('arcface_model')(images, training=False).numpy()
    np.testing.assert_array_equal(iom_codes(model, embds), codes)
    np.testing.assert_array_equal(iom_stack_model(model, 512)(embds, training=False), codes)
    np.testing.assert_array_equal(iom_hasher(model)(images), codes)


def test_other_key_changes_codes_not_embeddings():
    cfg = small_cfg(m=64)
    model = IoMFaceModel(cfg, ArcFaceModel(size=32, backbone_type='MobileNetV2', use_pretrain=False))
    embds = np.random.randn(5, 512).astype('float32')
    same = iom_codes(model, embds)
    other = iom_codes(model, embds, perm_key=123)
    assert (same != other).mean() > 0.3


def test_stage2_gradients_reach_projection_not_backbone(capsys):
    from modules.losses import IoMLoss
    from modules.training import Stage2Model
    cfg = small_cfg(sub_name='grad_test_no_ckpt', stage1_sub_name='grad_test_no_ckpt')
    net = Stage2Model(cfg)
    assert 'the backbone has random weights' in capsys.readouterr().out
    images = np.random.rand(8, 32, 32, 3).astype('float32')
    labels = tf.constant([0, 0, 0, 0, 1, 1, 1, 1])
    backbone_vars = net.arcface_model.weights
    with tf.GradientTape() as tape:
        embds = net.arcface_model(images, training=False)
        logits = net.logits(embds, training=True)
        total, _ = IoMLoss(cfg)(labels, net.head(logits, training=True),
                                net.head.probabilities(logits), net.l2())
    grads = tape.gradient(total, net.trainable_variables)
    projection = net.iom_model.get_layer('IoMProjection').kernel
    assert any(v is projection for v in net.trainable_variables)
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)
    assert float(tf.reduce_sum(tf.abs(grads[0]))) > 0
    assert not any(v.trainable for v in backbone_vars)
    assert not {id(v) for v in backbone_vars} & {id(v) for v in net.trainable_variables}
    before = [v.numpy().copy() for v in backbone_vars]
    kernel_before = projection.numpy().copy()
    tf.keras.optimizers.SGD(0.1).apply_gradients(zip(grads, net.trainable_variables))
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, backbone_vars))
    assert not np.array_equal(kernel_before, projection.numpy())
