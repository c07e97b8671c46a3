"""Mixed precision, loss scaling, warm-up schedules and the deferred (log_steps) NaN guard."""
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from modules.config import ConfigError, load_config, validate_config
from modules.training import NonFiniteLoss, make_optimizer, train_stage1
from modules.training.run import RunState, dtype_policy, learning_rate
from tests.helpers.runs import ROOT, last_json, run_script, write_cfg

BASE, TOTAL, WARMUP = 0.1, 100, 10


def cfg_with(**extra):
    """A validated stage-1 config with `extra` keys."""
    raw = dict(batch_size=8, sub_name='mp', backbone_type='MobileNetV2', train_dataset='x',
               num_classes=4, num_samples=8, epochs=1, base_lr=BASE, test_dataset='x')
    return validate_config(dict(raw, **extra), 'test')


@pytest.mark.parametrize('schedule,half,end', [
    ('constant', BASE, BASE),
    ('step', BASE * 0.1, BASE * 0.01),          # lr_steps [30, 60]: one boundary passed at 55
    ('cosine', BASE * 0.5, 0.0),
    ('poly', BASE * 0.25, 0.0),                 # (1 - 1/2)^2
])
def test_warmup_then_schedule_exact_values(schedule, half, end):
    lr = learning_rate(cfg_with(lr_schedule=schedule, warmup_steps=WARMUP, lr_steps=[30, 60]),
                       TOTAL)
    halfway = WARMUP + (TOTAL - WARMUP) // 2
    got = [float(lr(step)) for step in (0, WARMUP // 2, WARMUP, halfway, TOTAL)]
    assert got == pytest.approx([0.0, BASE / 2, BASE, half, end], abs=1e-7)


def test_no_warmup_constant_is_a_plain_float():
    assert learning_rate(cfg_with(), TOTAL) == BASE


@pytest.mark.parametrize('key,value', [('mixed_precision', 'float16'), ('log_steps', 0),
                                       ('warmup_steps', -1), ('jit_compile', 'yes'),
                                       ('lr_schedule', 'linear')])
def test_bad_values_are_one_clear_error(key, value):
    with pytest.raises(ConfigError, match=key):
        cfg_with(**{key: value})


@pytest.mark.parametrize('policy', ['mixed_bfloat16', 'mixed_float16'])
def test_model_computes_in_half_precision_but_embeds_and_logits_in_float32(policy):
    from modules.models import arcface_from_config
    cfg = cfg_with(mixed_precision=policy, embd_shape=32)
    with dtype_policy(cfg):
        model = arcface_from_config(cfg, training=True)
        embedder = arcface_from_config(cfg)
    assert tf.keras.mixed_precision.global_policy().name == 'float32'  # restored afterwards
    x = tf.random.uniform((2, 112, 112, 3))
    assert embedder(x).dtype == tf.float32
    assert model((x, tf.constant([0, 1], tf.int64)), training=True).dtype == tf.float32
    conv = next(layer for layer in embedder.layers[1].layers[-1].layers
                if isinstance(layer, tf.keras.layers.Conv2D))
    assert conv.compute_dtype == policy.removeprefix('mixed_')
    assert all(v.dtype == tf.float32 for v in model.weights)


def test_loss_scaling_skips_an_overflow_step():
    optimizer = make_optimizer(cfg_with(mixed_precision='mixed_float16'), TOTAL)
    assert isinstance(optimizer, tf.keras.optimizers.LossScaleOptimizer)
    w = tf.Variable([1.0, 2.0])
    optimizer.build([w])
    scale = float(optimizer.dynamic_scale.numpy())
    optimizer.apply_gradients([(tf.constant([np.inf, 1.0]), w)])
    np.testing.assert_array_equal(w.numpy(), [1.0, 2.0])
    assert float(optimizer.dynamic_scale.numpy()) == scale / 2
    optimizer.apply_gradients([(tf.constant([1.0, 1.0]) * scale / 2, w)])
    assert np.all(np.isfinite(w.numpy())) and not np.array_equal(w.numpy(), [1.0, 2.0])


def test_nan_inside_a_log_window_stops_before_the_next_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = cfg_with(log_steps=10, save_steps=5)
    optimizer = tf.keras.optimizers.SGD(0.1)
    optimizer.build([tf.Variable(0.0)])
    checkpoint = tf.train.Checkpoint(optimizer=optimizer)
    state = RunState(cfg, checkpoint, optimizer, tf.distribute.get_strategy(), 30, 8)
    state.start()
    with pytest.raises(NonFiniteLoss, match='between steps 11 and 15'):
        for step in range(1, 31):
            loss = tf.constant(math.nan if step == 13 else 1.0)
            state.track_finite(loss)  # what the train step does on the device
            state.after_step(tf.constant(1.0))  # the loss read at step 15 itself is finite
    assert state.step == 15
    saved = sorted(p.name for p in (tmp_path / 'checkpoints' / 'mp').glob('ckpt-*.index'))
    assert saved == ['ckpt-10.index', 'ckpt-5.index']


def test_step_count_survives_skipped_steps_and_older_checkpoints(tmp_path, monkeypatch):
    """The trainer's step, not optimizer.iterations (which loss scaling holds back), is resumed."""
    monkeypatch.chdir(tmp_path)
    cfg = cfg_with(save_steps=4)

    def run_state():
        optimizer = tf.keras.optimizers.SGD(0.1)
        optimizer.build([tf.Variable(0.0)])
        return RunState(cfg, tf.train.Checkpoint(optimizer=optimizer), optimizer,
                        tf.distribute.get_strategy(), 12, 8), optimizer

    state, optimizer = run_state()
    state.start()
    for _ in range(4):  # four steps, none of them applied (as if each overflowed)
        state.after_step(tf.constant(1.0))
    state.close()
    assert int(optimizer.iterations.numpy()) == 0
    assert run_state()[0].step == 4
    # A checkpoint of an earlier version (no trainer_step) resumes at the optimizer's count.
    older = tf.keras.optimizers.SGD(0.1)
    older.build([tf.Variable(0.0)])
    older.iterations.assign(6)
    tf.train.CheckpointManager(tf.train.Checkpoint(optimizer=older),
                               tmp_path / 'checkpoints' / 'mp', 3).save(checkpoint_number=6)
    state, _ = run_state()
    assert state.step == 6
    state.start()
    state.after_step(tf.constant(1.0))
    state.save()  # from now on the trainer's own count is stored
    state.close()
    assert 'trainer_step/.ATTRIBUTES/VARIABLE_VALUE' in dict(
        tf.train.list_variables(state.manager.latest_checkpoint))


def read_scalars(logdir, tag):
    """(step, value) pairs of a TensorBoard scalar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={'tensors': 0})  # default keeps only 10
    acc.Reload()
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]


@pytest.mark.parametrize('policy', ['mixed_bfloat16', 'mixed_float16'])
def test_thirty_half_precision_steps_lower_the_loss(tmp_path, tfrecord, policy):  # noqa: F811
    """30 steps through train.py: finite, falling loss; float16 also resumes with its loss scale.

    train.py turns oneDNN off for mixed_float16 (its float16 filter gradients are emulated on
    CPUs: about 7 s a step here instead of 0.5 s), so this runs as a user's float16 run would.
    Each logged loss is one batch of 8 (noisy): at base_lr 0.05 the last three were above the
    first three in 2 of 6 bfloat16 runs; at 0.02 they fell to 0.13-0.37 of them in 6 of 6.
    """
    def train(max_steps):
        path = write_cfg(tmp_path, tfrecord, mixed_precision=policy, max_steps=max_steps,
                         save_steps=15, log_steps=3, embd_shape=32, base_lr=0.02)
        env = {k: v for k, v in os.environ.items() if k != 'TF_ENABLE_ONEDNN_OPTS'}
        proc = run_script(['--cfg_path', path], cwd=tmp_path, env=dict(env, PYTHONPATH=ROOT))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ('oneDNN is off' in proc.stdout) == (policy == 'mixed_float16'), proc.stdout
        return last_json(proc.stdout), proc.stdout

    out, _ = train(30)
    assert out['step'] == 30
    checkpoint = str(tmp_path / out['checkpoint'])  # train.py ran in tmp_path
    losses = [v for _, v in read_scalars(tmp_path / 'logs' / 't', 'loss/total')]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    names = [name for name, _ in tf.train.list_variables(checkpoint)]
    if policy == 'mixed_float16':
        scale = next(n for n in names if 'dynamic_scale' in n)
        value = tf.train.load_variable(checkpoint, scale)
        assert np.isfinite(value) and value > 0
        # Resume: RunState restores with assert_existing_objects_matched, so the loss scale
        # (part of the optimizer) must come back from the checkpoint for this to pass.
        again, stdout = train(31)
        assert again['step'] == 31 and 'at step 30' in stdout, stdout


def test_fit_mode_scales_the_loss_under_mixed_float16(tmp_path, tfrecord, monkeypatch):  # noqa: F811
    """Keras fit() trains with our LossScaleOptimizer (not a second wrapper) and saves its scale.

    Resuming with the scale is shown for the custom loop above; both modes share the checkpoint.
    """
    monkeypatch.chdir(tmp_path)
    path = write_cfg(tmp_path, tfrecord, mixed_precision='mixed_float16', max_steps=2,
                     save_steps=2, log_steps=1, embd_shape=32)
    out = train_stage1(load_config(path), mode='fit')
    assert out['step'] == 2
    names = [name for name, _ in tf.train.list_variables(out['checkpoint'])]
    scale = [n for n in names if 'dynamic_scale' in n]
    assert len(scale) == 1, scale
    assert tf.train.load_variable(out['checkpoint'], scale[0]) > 0
    losses = [v for _, v in read_scalars(tmp_path / 'logs' / 't', 'loss/total')]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
