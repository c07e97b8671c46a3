"""Stage-1 trainer: resume after a kill, both modes, Mirrored and MultiWorkerMirrored strategies."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers.runs import ROOT, last_json, run_script, write_cfg
from tests.helpers.workers import run_two_workers


def test_killed_run_resumes_at_saved_step_with_optimizer_state(tmp_path, tfrecord):
    cfg = write_cfg(tmp_path, tfrecord, max_steps=400, save_steps=3)
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'train.py'), '--cfg_path', cfg],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ckpt_dir = tmp_path / 'checkpoints' / 't'
    deadline = time.time() + 240
    while time.time() < deadline and not list(ckpt_dir.glob('ckpt-6.index')):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(ckpt_dir.glob('ckpt-6.index')), 'no checkpoint written before the deadline'
    saved = sorted(int(p.name[5:-6]) for p in ckpt_dir.glob('ckpt-*.index'))[-1]

    import tensorflow as tf
    reader = tf.train.load_checkpoint(str(ckpt_dir / f'ckpt-{saved}'))
    names = reader.get_variable_to_shape_map()
    slots = [reader.get_tensor(n) for n in sorted(names)
             if n.startswith('optimizer/_variables/') and names[n]]
    slots = [t for t in slots if np.abs(t).sum() > 0]
    assert slots, 'no optimizer momentum in the checkpoint'
    saved_slot = max(slots, key=np.size)

    # Restart with a budget just past the saved step: it must resume, not start over.
    cfg = write_cfg(tmp_path, tfrecord, max_steps=saved + 2, save_steps=3)
    done = run_script(['--cfg_path', cfg], tmp_path, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'resumed from checkpoints/t/ckpt-{saved} at step {saved}' in done.stdout
    assert last_json(done.stdout)['step'] == saved + 2

    # The optimizer state was restored, not re-initialised: the restored slot at `saved` equals
    # what was written, and training moved on from it.
    from modules.config import load_config
    from modules.models import arcface_from_config, stage1_checkpoint
    from modules.training import make_optimizer
    c = load_config(cfg)
    model = arcface_from_config(c, training=True)
    opt = make_optimizer(c, 10)
    opt.build(model.trainable_variables)
    stage1_checkpoint(model, head=model.layers[-1], optimizer=opt).restore(
        str(ckpt_dir / f'ckpt-{saved}')).assert_existing_objects_matched()
    assert int(opt.iterations.numpy()) == saved
    restored = [v.numpy() for v in opt.variables if v.shape == saved_slot.shape
                and np.array_equal(v.numpy(), saved_slot)]
    assert restored


@pytest.mark.parametrize('mode', ['eager_tf', 'fit'])
def test_both_modes_train_and_resume(tmp_path, tfrecord, mode, monkeypatch):
    from modules.config import load_config
    from modules.training import train_stage1
    monkeypatch.chdir(tmp_path)
    first = train_stage1(load_config(write_cfg(tmp_path, tfrecord, max_steps=4)), mode)
    assert first['step'] == 4 and first['checkpoint'].endswith('ckpt-4')
    second = train_stage1(load_config(write_cfg(tmp_path, tfrecord, max_steps=6)), mode)
    assert second['step'] == 6 and second['checkpoint'].endswith('ckpt-6')
    assert os.listdir(tmp_path / 'logs' / 't')


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, tfrecord, monkeypatch):
    from modules.config import load_config
    from modules.training import NonFiniteLoss, train_stage1
    monkeypatch.chdir(tmp_path)
    train_stage1(load_config(write_cfg(tmp_path, tfrecord, max_steps=2)))
    with pytest.raises(NonFiniteLoss, match='last good checkpoint'):
        train_stage1(load_config(write_cfg(tmp_path, tfrecord, max_steps=6, w_decay=1e38)))
    ckpts = sorted(p.name for p in (tmp_path / 'checkpoints' / 't').glob('ckpt-*.index'))
    assert ckpts == ['ckpt-2.index']


FAST_AND_MIXED = [{}, {'mixed_precision': 'mixed_bfloat16', 'jit_compile': True}]


@pytest.mark.parametrize('extra', FAST_AND_MIXED, ids=['float32', 'bf16_xla'])
def test_mirrored_strategy_over_two_cpu_devices(tmp_path, tfrecord, extra):
    script = f"""
import sys, json
sys.path.insert(0, {ROOT!r})
from modules.training import configure_devices, get_strategy, train_stage1
from modules.config import load_config
configure_devices(cpu_devices=2)
strategy = get_strategy()
assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
out = train_stage1(load_config({write_cfg(tmp_path, tfrecord, **extra)!r}), 'eager_tf', strategy)
print('REPLICAS', strategy.num_replicas_in_sync, out['step'])
"""
    proc = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'REPLICAS 2 4' in proc.stdout


@pytest.mark.parametrize('extra', FAST_AND_MIXED, ids=['float32', 'bf16_xla'])
def test_multi_worker_mirrored_on_loopback(tmp_path, tfrecord, extra):
    cfg = write_cfg(tmp_path, tfrecord, max_steps=3, save_steps=100, **extra)
    results = run_two_workers(cfg, tmp_path, timeout=300)
    for returncode, out, err in results:
        assert returncode == 0, err[-3000:]
        assert last_json(out)['step'] == 3
    # Only the chief (worker 0) writes into checkpoints/<sub_name>.
    assert list((tmp_path / 'w0' / 'checkpoints' / 't').glob('ckpt-3.index'))
    assert not (tmp_path / 'w1' / 'checkpoints').exists()
