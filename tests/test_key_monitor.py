"""Stage 2's key-change monitor and the projection-bias switch (issue 31)."""
import numpy as np
import pytest
import tensorflow as tf

from modules.config import STAGE2_REQUIRED, validate_config
from modules.layers import IoMHead, IoMKernelConstraint, IoMProjection, PermLayer
from modules.training.monitor import KeyChangeMonitor, holdout_split
from modules.utils import UserError

CFG = dict(batch_size=8, sub_name='mon', backbone_type='MobileNetV2', train_dataset='unused',
           num_classes=20, num_samples=100, epochs=1, base_lr=1.0, test_dataset='unused',
           classes_per_batch=2, samples_per_class=4, m=64, q=8, embd_shape=32,
           loss_fun='batch_hard_arc_triplet_loss')


def clustered(num_ids=20, per_id=5, d=32, seed=0):
    """Embeddings of num_ids well-separated identities (unit centres, small spread) and labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, d))
    labels = np.repeat(np.arange(num_ids), per_id)
    return (centres[labels] + 0.3 * rng.standard_normal((labels.size, d))).astype(np.float32), labels


def new_monitor(**overrides):
    """A KeyChangeMonitor of CFG (with `overrides`) on the clustered embeddings."""
    emb, labels = clustered()
    return KeyChangeMonitor(validate_config(dict(CFG, **overrides), 'mon', STAGE2_REQUIRED), emb,
                            labels)


def stack(m=64, q=8, d=32, use_bias=True, bias_scale=0.0, seed=1):
    """perm -> projection -> head, built, with the bias drawn at `bias_scale`."""
    layers = [PermLayer(None, name='perm_layer'), IoMProjection(m, q, seed=seed, use_bias=use_bias),
              IoMHead(m, q, name='IoMHead')]
    x = tf.zeros((1, d))
    for layer in layers:
        x = layer(x)
    if use_bias:
        rng = np.random.default_rng(seed)
        layers[1].bias.assign(bias_scale * rng.standard_normal(m * q).astype(np.float32))
    return layers


class _State:
    """What KeyChangeMonitor.run needs of the trainer's RunState."""

    def __init__(self):
        self.step, self.bar, self.saved = 7, None, False
        self.writer = tf.summary.create_noop_writer()

    def save(self):
        self.saved = True


def test_monitor_fires_on_a_biased_head_and_stays_quiet_on_a_random_one(capsys):
    monitor = new_monitor(stop_on_key_change_fail=True)
    quiet = monitor.run(_State(), stack(use_bias=False))
    assert quiet['key_change_ok'], quiet['key_change_problems']
    assert abs(quiet['nonmated_agreement_new_keys'] - 1 / 8) < 0.01
    assert 'Warning' not in capsys.readouterr().out
    state = _State()
    with pytest.raises(UserError, match='stop_on_key_change_fail: stopped at step 7'):
        monitor.run(state, stack(bias_scale=50.0))  # the bias outweighs W.P(x) in every group
    assert state.saved
    biased = monitor.last
    assert not biased['key_change_ok'] and biased['revocability'] > 0.01
    assert biased['nonmated_agreement_new_keys'] > 0.5
    assert 'Warning: step 7' in capsys.readouterr().out


def test_monitor_warns_without_stopping_by_default(capsys):
    result = new_monitor().run(_State(), stack(bias_scale=50.0))
    assert not result['key_change_ok']
    assert 'no longer key-dependent' in capsys.readouterr().out


def _grouped_kernel(layers, edit):
    """The projection kernel of `layers` as (d, m, q), edited in place by `edit`, flattened back."""
    kernel = layers[1].kernel.numpy()
    grouped = kernel.reshape(kernel.shape[0], -1, 8)
    edit(grouped)
    return grouped.reshape(kernel.shape)


def _outsized(g):
    g[:, :, 0] *= 4.0  # the first column of every group outgrows the rest


def _odd_one_out(g):
    g[:, :, 1:] = g[:, :, 1:2] + 0.3 * g[:, :, 1:]  # seven similar columns and one apart
    g /= np.linalg.norm(g, axis=0, keepdims=True)


def _one_subspace(g):
    rng = np.random.default_rng(3)
    basis = np.linalg.qr(rng.standard_normal((g.shape[0], 8)))[0]
    turns = np.linalg.qr(rng.standard_normal((g.shape[1], 8, 8)))[0]
    # every group orthonormal, nearly all in one 8-d subspace: the kernel's rank collapses
    g[:] = np.einsum('dk,mkq->dmq', basis, turns) + 0.02 * g / np.linalg.norm(g, axis=0)


@pytest.mark.parametrize('edit', [_outsized, _odd_one_out])
def test_key_independent_kernels_are_caught_and_the_kernel_constraint_removes_them(edit):
    monitor = new_monitor()
    layers = stack(use_bias=False)
    kernel = _grouped_kernel(layers, edit)
    layers[1].kernel.assign(kernel)
    bad = monitor.check(layers)
    assert not bad['key_change_ok'] and bad['nonmated_agreement_new_keys'] > 0.15
    fixed = IoMKernelConstraint(8)(tf.constant(kernel)).numpy().reshape(kernel.shape[0], -1, 8)
    gram = np.einsum('dmi,dmj->mij', fixed, fixed)
    np.testing.assert_allclose(gram, gram[0, 0, 0] * np.eye(8)[None].repeat(gram.shape[0], 0),
                               atol=1e-4 * gram[0, 0, 0])
    layers[1].kernel.assign(fixed.reshape(kernel.shape))
    assert monitor.check(layers)['key_change_ok']


def test_a_collapsed_kernel_needs_the_tight_frame_not_only_orthonormal_groups():
    monitor = new_monitor()
    layers = stack(use_bias=False)
    kernel = tf.constant(_grouped_kernel(layers, _one_subspace))
    layers[1].kernel.assign(IoMKernelConstraint(8, tight_frame=False)(kernel))
    assert monitor.check(layers)['revocability'] > 0.01
    layers[1].kernel.assign(IoMKernelConstraint(8, tight_frame=True)(kernel))
    assert monitor.check(layers)['key_change_ok']


def test_orthogonal_groups_and_tight_frame_hold_through_training_steps():
    proj = IoMProjection(16, 4, seed=0, use_bias=False, orthogonal_groups=True, tight_frame=True)
    x = tf.random.stateless_normal((32, 24), seed=(1, 2))
    proj(x)
    optimizer = tf.keras.optimizers.SGD(1.0)
    for _ in range(3):  # a loss that rewards growing the first column of each group
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(tf.abs(tf.reshape(proj(x), (32, 16, 4))[..., 0]))
        optimizer.apply_gradients(zip(tape.gradient(loss, proj.trainable_variables),
                                      proj.trainable_variables))
    groups = proj.kernel.numpy().reshape(24, 16, 4)
    gram = np.einsum('dmi,dmj->mij', groups, groups)
    np.testing.assert_allclose(gram, gram[0, 0, 0] * np.eye(4)[None].repeat(16, 0),
                               atol=1e-4 * gram[0, 0, 0])
    rows = proj.kernel.numpy() @ proj.kernel.numpy().T  # close to a tight frame: one step behind
    assert np.abs(rows / np.diag(rows).mean() - np.eye(24)).max() < 0.25


def test_the_final_check_does_not_repeat_the_last_steps(capsys):
    monitor, state, layers = new_monitor(), _State(), stack(use_bias=False)
    monitor.run(state, layers)
    monitor.run(state, layers, final=True)
    assert capsys.readouterr().out.count('[monitor step 7]') == 1
    state.step = 9
    monitor.run(state, layers, final=True)
    assert '[monitor step 9]' in capsys.readouterr().out


def test_projection_bias_off_is_the_seed_layer():
    """iom_projection_bias: true builds the seed's Dense (kernel and bias, same codes); false has
    no bias and gives the seed's codes whenever its bias is zero (the initial state)."""
    from modules.models import iom_layers, stack_codes
    emb, _ = clustered()
    seed_cfg = validate_config(dict(CFG, iom_projection_bias=True), 'seed', STAGE2_REQUIRED)
    fixed_cfg = validate_config(CFG, 'fixed', STAGE2_REQUIRED)
    seed_stack, fixed_stack = iom_layers(seed_cfg), iom_layers(fixed_cfg)
    old = tf.keras.layers.Dense(64 * 8, name='IoMProjection')  # the layer before issue 31
    for layers in (seed_stack, fixed_stack):
        stack_codes(layers, emb[:1])
    old.build((None, 32))
    assert [v.path.split('/')[-1] for v in seed_stack[1].weights] == ['kernel', 'bias']
    assert [v.path.split('/')[-1] for v in fixed_stack[1].weights] == ['kernel']
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((32, 512)).astype(np.float32)
    bias = rng.standard_normal(512).astype(np.float32)
    seed_stack[1].set_weights([kernel, bias])
    old.set_weights([kernel, bias])
    want = np.argmax(old(emb).numpy().reshape(-1, 64, 8), -1)
    np.testing.assert_array_equal(stack_codes(seed_stack, emb), want)
    seed_stack[1].set_weights([kernel, np.zeros(512, np.float32)])
    fixed_stack[1].set_weights([kernel])
    np.testing.assert_array_equal(stack_codes(fixed_stack, emb), stack_codes(seed_stack, emb))


def test_a_checkpoint_with_a_bias_needs_the_key(tmp_path, monkeypatch):
    from modules.models import IoMFaceModel, check_projection_bias, latest_checkpoint, stage2_checkpoint
    monkeypatch.chdir(tmp_path)
    for remark in ('1', '2'):
        seed_cfg = validate_config(dict(CFG, iom_projection_bias=True, hidden_layer_remark=remark,
                                        sub_name=f'r{remark}'), 'seed', STAGE2_REQUIRED)
        inputs = tf.keras.Input((32,))
        model = tf.keras.Model(inputs, inputs, name='arcface_model')
        stage2_checkpoint(IoMFaceModel(dict(seed_cfg, input_size=4), _Flatten(model))).save(
            str(tmp_path / f'r{remark}' / 'ckpt'))
        ckpt = latest_checkpoint(str(tmp_path / f'r{remark}'))
        check_projection_bias(seed_cfg, ckpt)
        with pytest.raises(UserError, match='set iom_projection_bias: true to load it'):
            check_projection_bias(dict(seed_cfg, iom_projection_bias=False), ckpt)


def _Flatten(inner):
    """An 'arcface_model' taking a 4x4x3 image to 32 features (enough for the IoM layers)."""
    inputs = tf.keras.Input((4, 4, 3))
    x = tf.keras.layers.Flatten()(inputs)
    x = tf.keras.layers.Dense(32)(x)
    return tf.keras.Model(inputs, inner(x), name='arcface_model')


def test_holdout_split_and_its_errors():
    labels = np.repeat(np.arange(30), 3)
    held = holdout_split(labels, 0.1)
    assert np.unique(labels[held]).size == 3 and held.sum() == 9
    np.testing.assert_array_equal(held, holdout_split(labels, 0.1))
    assert not holdout_split(labels, 0.0).any()
    with pytest.raises(UserError, match='monitor_holdout'):
        holdout_split(np.arange(5), 0.1)


def test_shipped_stage2_configs_are_checked_by_the_trainer():
    """Every shipped stage-2 config trains without the key-independent terms and is monitored."""
    import glob
    import os

    from modules.config import load_config
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = glob.glob(os.path.join(root, 'configs', 'config_*', '*.yaml')) + [
        os.path.join(root, 'configs', name) for name in ('quickstart_stage2.yaml', 'cfp_stage2.yaml')]
    assert len(paths) >= 5
    for path in paths:
        cfg = load_config(path, STAGE2_REQUIRED)
        assert not cfg['iom_projection_bias'] and cfg['monitor_holdout'] > 0, path
        assert cfg['iom_orthogonal_groups'] and cfg['iom_tight_frame'], path


def test_switched_off_the_projection_is_the_seeds_and_codes_do_not_depend_on_the_switches():
    x = tf.random.stateless_normal((16, 32), seed=(3, 4))
    seed = IoMProjection(8, 8, seed=0, use_bias=True, orthogonal_groups=False, tight_frame=False)
    plain = tf.keras.layers.Dense(64, use_bias=True, name='plain',
                                  kernel_initializer=tf.keras.initializers.RandomNormal(0.0, 1.0, 0))
    assert seed.kernel_constraint is None
    for layer in (seed, plain):
        layer(x)
        optimizer = tf.keras.optimizers.SGD(1.0)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.abs(layer(x)))
        optimizer.apply_gradients(zip(tape.gradient(loss, layer.trainable_variables),
                                      layer.trainable_variables))
    np.testing.assert_array_equal(seed.kernel.numpy(), plain.kernel.numpy())
    # Inference never applies the constraint: the same weights give the same codes either way.
    fixed = IoMProjection(8, 8, seed=1, use_bias=True, orthogonal_groups=True, tight_frame=True)
    fixed(x)
    fixed.set_weights(seed.get_weights())
    head = IoMHead(8, 8, name='IoMHead')
    np.testing.assert_array_equal(head(seed(x)).numpy(), head(fixed(x)).numpy())
