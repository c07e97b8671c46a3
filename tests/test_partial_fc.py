"""Partial FC (modules/partial_fc.py): numerics against the full ArcHead, sampling, updates,
checkpoints across replica counts, the trainer's refusals and a 2-worker run on loopback.

The numerics run in one subprocess with 4 logical CPU devices (they must be set before TensorFlow
initialises, which another test file in this process may already have done); the tests below
check what it reports.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.runs import last_json, make_tree, write_cfg
from tests.helpers.workers import run_two_workers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NUMERICS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
MODE, WORK = sys.argv[2], sys.argv[3]  # 'train' or 'restore:<replicas>'; checkpoint folder
import numpy as np
import tensorflow as tf
from modules.training import configure_devices
configure_devices(cpu_devices=4)
from modules.layers import ArcMarginPenaltyLogists
from modules.partial_fc import PartialFCHead

DEVICES = [d.name for d in tf.config.list_logical_devices('CPU')]
out = {}


def strategy(n):
    return tf.distribute.MirroredStrategy(DEVICES[:n])


def split(st, array):
    # Replica r gets rows [r*b, (r+1)*b) of the global batch, as a distributed dataset would.
    b = len(array) // st.num_replicas_in_sync
    return st.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(array[ctx.replica_id_in_sync_group * b:][:b]))


TRACED = {}


def step(head, st, emb, labels, lr=None):
    # One forward/backward (and optionally an update) of the head alone on a fixed batch.
    @tf.function
    def run(e, l, draw):
        def replica(e, l):
            with tf.GradientTape() as tape:
                tape.watch(e)
                loss, rows, index = head.replica_loss(e, l, draw)
            ge, *grows = tape.gradient(loss, [e] + rows)
            if lr is not None:
                head.apply_gradients(index, grows, lr)
            return loss, ge, grows[0], index
        return st.run(replica, args=(e, l))
    run = TRACED.setdefault((id(head), id(st), lr), run)  # trace once per head and rate
    result = run(split(st, emb), split(st, labels), head.draws.read_value())
    head.draws.assign_add(1)
    loss, ge, grows, index = (st.experimental_local_results(x) for x in result)
    grad_centres = np.zeros((head.replicas * head.shard_size, emb.shape[1]), np.float32)
    for rid, g, i in zip(head.local_ids, grows, index):
        grad_centres[rid * head.shard_size + i.numpy()] = g.numpy()
    return (float(sum(x.numpy() for x in loss)), np.concatenate([x.numpy() for x in ge]),
            grad_centres[:head.num_classes], [i.numpy() for i in index])


rng = np.random.default_rng(0)
B, D, C = 8, 16, 10
emb = rng.normal(size=(B, D)).astype(np.float32)
labels = np.array([0, 3, 4, 5, 9, 7, 3, 6], np.int64)  # shard 0 holds 0-4, shard 1 holds 5-9
W = rng.normal(size=(D, C)).astype(np.float32)

# 3b. Restore (in its own process) of the checkpoints that part 3 wrote.
if MODE.startswith('restore'):
    n = int(MODE.split(':')[1])
    st = strategy(n)
    for rate in (1.0, 0.5):
        other = PartialFCHead(st, C, D, 'ArcHead', 0.5, 64, sample_rate=rate, seed=7)
        tf.train.Checkpoint(head=other).read(f'{WORK}/{rate}/ckpt').assert_consumed()
        state = np.load(f'{WORK}/{rate}/state.npz')
        same = (np.array_equal(state['centres'], other.full().numpy())
                and np.array_equal(state['momentum'], other.full(momentum=True).numpy()))
        out[rate] = {'draws': int(other.draws.numpy()), 'state_equal': same,
                     'loss': step(other, st, emb, labels)[0]}
    print('RESULT', json.dumps(out))
    sys.exit(0)
# 1. sample_rate 1.0 on 2 replicas against the full ArcHead on one device.
full = ArcMarginPenaltyLogists(C, margin=0.5, logist_scale=64)
full.build([(B, D), (B,)])
full.w.assign(W)
e = tf.constant(emb)
with tf.GradientTape() as tape:
    tape.watch(e)
    ref = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels, full((e, tf.constant(labels)))))
ref_ge, ref_gw = tape.gradient(ref, [e, full.w])
st2 = strategy(2)
head = PartialFCHead(st2, C, D, 'ArcHead', 0.5, 64, sample_rate=1.0)
head.assign_full({'centres': W.T})
loss, ge, gc, index = step(head, st2, emb, labels, lr=0.1)
sgd = tf.keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)
sgd.apply_gradients([(ref_gw, full.w)])
out['exact'] = {'loss': [float(ref), loss], 'd_loss': abs(float(ref) - loss),
                'd_embedding': float(np.abs(ge - ref_ge.numpy()).max()),
                'd_centres': float(np.abs(gc - ref_gw.numpy().T).max()),
                'grad_scale': float(np.abs(ref_gw.numpy()).max()),
                'd_after_sgd': float(np.abs(head.full().numpy() - full.w.numpy().T).max()),
                'counts': [len(i) for i in index]}

# 2. sample_rate < 1: positives always scored, exact count, untouched rows left alone.
C2, rate = 40, 0.25  # shards of 20, 5 sampled; shard 1 gets 7 positives (> 5)
labels2 = np.array([1, 2, 20, 21, 22, 23, 24, 25, 26, 2], np.int64)
emb2 = rng.normal(size=(len(labels2), D)).astype(np.float32)
head = PartialFCHead(st2, C2, D, 'ArcHead', 0.5, 64, sample_rate=rate)
head.assign_full({'centres_momentum': rng.normal(size=(C2, D)).astype(np.float32)})
draws = []
for _ in range(6):
    before = (head.full().numpy(), head.full(momentum=True).numpy())
    _, _, _, index = step(head, st2, emb2, labels2, lr=0.1)
    rows = np.concatenate([rid * head.shard_size + i for rid, i in zip(head.local_ids, index)])
    changed = [np.flatnonzero(np.any(a != b.numpy(), axis=1)).tolist() for a, b in
               zip(before, (head.full(), head.full(momentum=True)))]
    draws.append({'index': [sorted(i.tolist()) for i in index], 'rows': sorted(rows.tolist()),
                  'changed_centres': changed[0], 'changed_momentum': changed[1]})
out['sampled'] = {'num_sampled': head.num_sampled, 'shard_size': head.shard_size,
                  'draws': draws}

# 3. Checkpoints: train 3 steps on 2 replicas and save; the next-step loss on the same batch must
# be the same after a restore onto 2 replicas here and onto 1 and 4 in other processes (a process
# cannot hold collective groups of two sizes).
for rate in (1.0, 0.5):
    head = PartialFCHead(st2, C, D, 'ArcHead', 0.5, 64, sample_rate=rate, seed=7)
    for _ in range(3):
        step(head, st2, emb, labels, lr=0.1)
    tf.train.Checkpoint(head=head).write(f'{WORK}/{rate}/ckpt')
    np.savez(f'{WORK}/{rate}/state.npz', centres=head.full().numpy(),
             momentum=head.full(momentum=True).numpy())
    expected = step(head, st2, emb, labels)[0]
    other = PartialFCHead(st2, C, D, 'ArcHead', 0.5, 64, sample_rate=rate, seed=7)
    tf.train.Checkpoint(head=other).read(f'{WORK}/{rate}/ckpt').assert_consumed()
    out[f'restore_{rate}'] = {'expected': expected, 'same_layout': step(other, st2, emb, labels)[0]}

# 4. NormHead at sample_rate 1.0 against a Dense head with the same L2 weight decay.
dense = tf.keras.layers.Dense(C, kernel_regularizer=tf.keras.regularizers.L2(5e-4))
dense.build((B, D))
dense.kernel.assign(W)
dense.bias.assign(rng.normal(size=C).astype(np.float32))
with tf.GradientTape() as tape:
    tape.watch(e)
    ref = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, dense(e))) \
        + tf.add_n(dense.losses)
ref_ge, ref_gw = tape.gradient(ref, [e, dense.kernel])
head = PartialFCHead(st2, C, D, 'NormHead', sample_rate=1.0, w_decay=5e-4)
head.assign_full({'centres': W.T, 'bias': dense.bias.numpy()})
loss, ge, gc, _ = step(head, st2, emb, labels)
out['norm'] = {'d_loss': abs(float(ref) - loss),
               'd_embedding': float(np.abs(ge - ref_ge.numpy()).max()),
               'd_centres': float(np.abs(gc - ref_gw.numpy().T).max())}
print('RESULT', json.dumps(out))
"""


def run_numerics(mode, work):
    return subprocess.Popen([sys.executable, '-c', NUMERICS, ROOT, mode, str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(proc):
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    line = [x for x in out.splitlines() if x.startswith('RESULT ')][-1]
    return json.loads(line[len('RESULT '):])


@pytest.fixture(scope='module')
def numerics(tmp_path_factory):
    work = tmp_path_factory.mktemp('partial_fc')
    out = result_of(run_numerics('train', work))
    restores = {n: run_numerics(f'restore:{n}', work) for n in (1, 4)}  # both at once
    for n, proc in restores.items():
        for rate, got in result_of(proc).items():
            out[f'restore_{rate}'][n] = got
    return out


def test_sample_rate_one_equals_full_arc_head(numerics):
    exact = numerics['exact']
    assert exact['counts'] == [5, 5]  # every class of both shards scored
    assert exact['d_loss'] < 1e-5, exact
    assert exact['d_embedding'] < 1e-5, exact
    assert exact['d_centres'] < 1e-5 and exact['grad_scale'] > 1e-3, exact
    assert exact['d_after_sgd'] < 1e-5, exact  # the in-place update is Keras' Nesterov SGD


def test_sample_rate_one_equals_dense_norm_head(numerics):
    norm = numerics['norm']
    assert norm['d_loss'] < 1e-5 and norm['d_embedding'] < 1e-5 and norm['d_centres'] < 1e-5, norm


def test_sampling_keeps_positives_exact_count_and_untouched_rows(numerics):
    sampled = numerics['sampled']
    assert sampled['num_sampled'] == 5 and sampled['shard_size'] == 20
    negatives = set()
    for draw in sampled['draws']:
        shard0, shard1 = draw['index']
        assert len(shard0) == 5 and {1, 2} <= set(shard0)  # 2 positives + 3 negatives
        assert shard1 == list(range(7))  # 7 positives (20..26) > 5: all of them, nothing else
        negatives.add(tuple(sorted(set(shard0) - {1, 2})))
        # Exactly the sampled centres and their momentum moved; every other row is unchanged.
        assert draw['changed_centres'] == draw['rows'] == draw['changed_momentum']
    assert len(negatives) > 1  # the negatives are drawn anew each step


@pytest.mark.parametrize('rate', ['1.0', '0.5'])
def test_checkpoint_restores_onto_other_replica_counts(numerics, rate):
    result = numerics[f'restore_{rate}']
    assert result['same_layout'] == result['expected']  # same layout and seed: same sample
    for n in (1, 4):
        assert result[n]['state_equal'] and result[n]['draws'] == 3, (n, result[n])
        if rate == '1.0':  # every class scored: the loss does not depend on the layout
            assert abs(result[n]['loss'] - result['expected']) < 1e-5, result


def test_config_keys_and_refusals(tmp_path):
    from modules.config import ConfigError, load_config
    from modules.training import train_stage1
    from modules.utils import UserError
    cfg = load_config(write_cfg(tmp_path, 'missing.tfrecord'))
    assert cfg['partial_fc'] is False and cfg['sample_rate'] == 1.0
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="'sample_rate' must be in"):
            load_config(write_cfg(tmp_path, 'missing.tfrecord', sample_rate=bad))
    cfg = load_config(write_cfg(tmp_path, 'missing.tfrecord', partial_fc=True))
    with pytest.raises(UserError, match='needs --mode eager_tf'):
        train_stage1(cfg, mode='fit')
    with pytest.raises(UserError, match='cannot run with jit_compile'):
        train_stage1(dict(cfg, jit_compile=True))


def read_losses(logdir):
    import tensorflow as tf
    losses = {}
    for name in os.listdir(logdir):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(logdir, name)):
            for value in event.summary.value:
                if value.tag == 'loss/total':
                    losses[event.step] = float(tf.make_ndarray(value.tensor))
    return [losses[k] for k in sorted(losses)]


@pytest.fixture(scope='module')
def tfrecord(tmp_path_factory):
    from modules.tfrecords import write_tfrecord
    base = tmp_path_factory.mktemp('pfc_stage1')
    make_tree(str(base / 'imgs'))
    write_tfrecord(str(base / 'imgs'), str(base / 'train.tfrecord'), binary=True)
    return str(base / 'train.tfrecord')


def test_multi_worker_partial_fc_on_loopback(tmp_path, tfrecord):
    steps = 20
    # Batch 16 at rate 0.01: at 8 and 0.05 the 20 losses were too noisy to fall every time.
    cfg = write_cfg(tmp_path, tfrecord, head_type='ArcHead', margin=0.2, logist_scale=16,
                    partial_fc=True, sample_rate=0.5, batch_size=16, base_lr=0.01,
                    max_steps=steps, save_steps=steps, log_steps=1)
    results = run_two_workers(cfg, tmp_path, timeout=240)
    for returncode, out, err in results:
        assert returncode == 0, err[-3000:]
        assert last_json(out)['step'] == steps
    losses = read_losses(tmp_path / 'w0' / 'logs' / 't')
    print('chief losses', np.round(losses, 4).tolist())
    assert len(losses) == steps and np.all(np.isfinite(losses)), losses
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert list((tmp_path / 'w0' / 'checkpoints' / 't').glob(f'ckpt-{steps}.index'))
