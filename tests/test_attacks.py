"""Stolen-key attacks (modules/attacks.py) and re-keying of IoM stacks with and without hidden layers."""
import numpy as np
import pytest
import tensorflow as tf

from modules import evaluations as ev
from modules.config import validate_config
from modules.layers import key_permutation
from modules.models import check_rekeyable, iom_layers
from modules.protection.attacks import KeyedStack, attack_report, gradient_preimage, lp_preimage
from modules.protection.measures import key_change_verdict, like_real_embeddings, zero_effort_rate
from modules.utils import UserError

D = 48


def stack_cfg(remark='1', m=24, q=4, position='projection', **extra):
    """A validated stage-2 config of an IoM stack (only the stack's keys matter here)."""
    raw = dict(dict(batch_size=16, sub_name='attack_test', backbone_type='MobileNetV2',
                    train_dataset='x', num_classes=4, num_samples=8, epochs=1, base_lr=0.01,
                    test_dataset='x', m=m, q=q, loss_fun='batch_hard_arc_triplet_loss',
                    hidden_layer_remark=remark, perm_position=position, classes_per_batch=4,
                    samples_per_class=4), **extra)
    return validate_config(raw, 'test', ('m', 'q'))


def built_stack(cfg, d=D, key=None, seed=0):
    """KeyedStack of freshly initialised IoM layers for `d`-dimensional embeddings."""
    tf.keras.utils.set_random_seed(seed)
    layers = iom_layers(cfg, key)
    x = tf.zeros((1, d))
    for layer in layers:
        x = layer(x)
    return KeyedStack(layers, key)


def clustered(num_subjects, per_subject, d=D, noise=0.6, seed=0):
    """Embeddings of subjects: a random centre each plus Gaussian noise; (x, labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_subjects, d))
    labels = np.repeat(np.arange(num_subjects), per_subject)
    x = centres[labels] + noise * rng.standard_normal((labels.size, d))
    return x.astype(np.float32), labels


def verification_set(num_pairs=40, d=D, seed=1):
    """Pairs (2i, 2i+1): genuine for even i, impostor for odd i; (embeddings, issame)."""
    x, _ = clustered(num_pairs + 1, 2, d, seed=seed)
    issame = np.arange(num_pairs) % 2 == 0
    # Impostor pair i: first photo of subject i with the second photo of subject i + 1.
    first, second = x[0::2][:num_pairs], x[1::2]
    second = np.where(issame[:, None], second[:num_pairs], second[1:num_pairs + 1])
    pairs = np.empty((2 * num_pairs, d), np.float32)
    pairs[0::2], pairs[1::2] = first, second
    return pairs, issame


def test_lp_and_gradient_reproduce_stolen_codes_exactly():
    stack = built_stack(stack_cfg('1'), key=12345)
    x, _ = clustered(6, 1)
    codes = stack.codes(x)
    low, high = np.percentile(x, [0, 100], axis=0) + np.array([[-1.0], [1.0]])
    for code in codes:
        found, margin = lp_preimage(stack, code, low, high)
        assert margin > 0 and np.array_equal(stack.codes(found[None])[0], code)
    radius = np.median(np.linalg.norm(x, axis=1))
    found = gradient_preimage(stack, codes, radius)
    np.testing.assert_array_equal(stack.codes(found), codes)
    np.testing.assert_allclose(np.linalg.norm(found, axis=1), radius, rtol=1e-5)


def test_gradient_attack_inverts_a_hidden_layer_stack_and_lp_refuses_it():
    stack = built_stack(stack_cfg('3'), key=99)
    x, _ = clustered(8, 1)
    codes = stack.codes(x)
    found = gradient_preimage(stack, codes, np.median(np.linalg.norm(x, axis=1)))
    assert (stack.codes(found) == codes).all(axis=1).mean() == 1.0
    with pytest.raises(UserError, match='without hidden layers'):
        lp_preimage(stack, codes[0], x.min(0), x.max(0))


@pytest.fixture(scope='module')
def report():
    embeddings, issame = verification_set()
    result = attack_report(built_stack(stack_cfg('1', m=32)), embeddings, issame,
                                 victims=12, attack_keys=2, fars=(0.1,), seed=3,
                                 progress=lambda _: None)
    return result


ATTACK_KEYS = {'same_key_code_match', 'same_key_accept', 'same_key_accept_genuine_probe',
               'cross_key_accept_same_image', 'cross_key_accept_other_image', 'cosine_mean',
               'cosine_min', 'rank1', 'seconds_per_victim'}
BASELINE_KEYS = {'genuine_accept_cross_key', 'impostor_accept', 'wrong_key_accept',
                 'cosine_same_person', 'cosine_other_person'}


def test_attack_report_has_every_figure_at_every_threshold(report):
    assert report['victims'] == 12 and report['threshold_source'].startswith('EER')
    points = [report, *report['at_far'].values()]
    assert len(points) == 2 and points[1]['threshold'] <= report['threshold']
    for point in points:
        for attack in ('lp', 'gradient'):
            assert ATTACK_KEYS <= set(point[attack])
        assert BASELINE_KEYS <= set(point['baselines'])
        assert all(0 <= point[a][k] <= 1 for a in ('lp', 'gradient')
                   for k in ATTACK_KEYS - {'seconds_per_victim', 'cosine_mean', 'cosine_min'})
    assert {'d_sys_keys_known', 'd_sys_keys_unknown'} <= set(report['linkage'])


def test_stolen_key_inverts_codes_and_a_wrong_key_stays_at_impostor_level(report):
    base = report['baselines']
    for attack in ('lp', 'gradient'):
        assert report[attack]['same_key_code_match'] == 1.0
        assert report[attack]['same_key_accept'] == 1.0
        # The pre-image lies near the victim: closer than another person, as close as a photo.
        assert report[attack]['cosine_mean'] > base['cosine_other_person'] + 0.3
    assert base['wrong_key_accept'] <= base['impostor_accept'] + 0.1
    assert abs(base['wrong_key_cosine_mean']) < 0.3
    assert base['stolen_code_replay_accept'] <= base['impostor_accept'] + 0.1
    # Two codes of one person under two known keys link through their pre-images.
    assert report['linkage']['d_sys_keys_known'] > report['linkage']['d_sys_keys_unknown']


# ---------------------------------------------------------------------------------------------
# Re-keying (issue: codes of hidden-layer models under a new key).
def train_stack(cfg, x, labels, steps=150, seed=0):
    """Train the IoM layers of `cfg` on embeddings with the stage-2 loss; return the stack."""
    from modules.losses import IoMLoss
    stack = built_stack(cfg, x.shape[1], seed=seed)
    loss_fn = IoMLoss(cfg)
    variables = [v for layer in stack.layers for v in layer.trainable_variables]
    optimizer = tf.keras.optimizers.Adam(0.01)
    rng = np.random.default_rng(seed)
    per_class = cfg['samples_per_class']

    @tf.function
    def step(batch, batch_labels):
        with tf.GradientTape() as tape:
            z = batch
            for layer in stack.layers[:-1]:
                z = layer(z, training=True)
            codes, probs = stack.head.soft_outputs(z)
            total, _ = loss_fn(batch_labels, codes, probs, tf.constant(0.0))
        optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))

    classes = np.unique(labels)
    for _ in range(steps):
        chosen = rng.choice(classes, cfg['classes_per_batch'], replace=False)
        idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                              for c in chosen])
        step(tf.constant(x[idx]), tf.constant(labels[idx]))
    return stack


def eer_and_threshold(stack, pairs, issame):
    codes = stack.codes(pairs)
    met = ev.verification_metrics(ev.pair_distances(codes[0::2], codes[1::2], 'Hamming'), issame)
    return met['eer'], met['eer_threshold'], codes


@pytest.mark.parametrize('remark', ['3', '2'])
def test_hidden_layer_stack_keeps_its_eer_under_new_keys(remark):
    cfg = stack_cfg(remark, m=32, q=4, classes_per_batch=8)
    x, labels = clustered(40, 6, noise=0.9)
    stack = train_stack(cfg, x, labels)
    pairs, issame = verification_set(80, seed=7)
    plain_eer, threshold, plain = eer_and_threshold(stack, pairs, issame)
    keyed = [eer_and_threshold(stack.under(key), pairs, issame) for key in (11, 22, 33)]
    assert plain_eer < 0.2
    # Tolerance: twice the binomial standard error of an EER on 40 pairs of each kind.
    tolerance = 2 * np.sqrt(plain_eer * (1 - plain_eer) / 40) + 0.02
    assert np.mean([eer for eer, _, _ in keyed]) <= plain_eer + tolerance
    # The same photo re-hashed under a new key is no more use than another person's photo.
    dist = ev.pair_distances(plain[0::2], plain[1::2], 'Hamming')
    impostor_rate = np.mean(dist[~issame] <= threshold)
    replay = np.mean(np.count_nonzero(keyed[0][2] != keyed[1][2], axis=1) <= threshold)
    assert replay <= max(impostor_rate, 0.05)


def test_a_model_bound_to_its_training_key_is_refused():
    cfg = stack_cfg('3', position='input')
    with pytest.raises(UserError, match='valid only under the key it was trained with'):
        check_rekeyable(cfg)
    for ok in (stack_cfg('3'), stack_cfg('1', position='input'), stack_cfg('T1')):
        check_rekeyable(ok)


def test_permutation_sits_before_the_projection_and_checkpoints_keep_their_names():
    from modules.models import IoMFaceModel, arcface_from_config, stage2_checkpoint
    cfg = stack_cfg('2', m=8, q=4, input_size=32, embd_shape=16, use_pretrain=False)
    model = IoMFaceModel(cfg, arcface_from_config(cfg, use_pretrain=False))
    names = [layer.name for layer in model.layers][2:]
    assert names == ['hidden_dense_1', 'hidden_bn_1', 'hidden_dropout_1', 'perm_layer',
                     'IoMProjection', 'IoMHead']
    tracked = dict(stage2_checkpoint(model)._trackable_children())
    assert tracked['layer_0'].name == 'perm_layer' and tracked['layer_1'].name == 'hidden_dense_1'
    legacy = iom_layers(dict(cfg, perm_position='input'))
    assert [layer.name for layer in legacy][:2] == ['perm_layer', 'hidden_dense_1']
    # Under a key the projection reads the permuted hidden features.
    stack = KeyedStack.of_model(model, key=5)
    x = tf.random.normal((3, 16))
    h = x
    for layer in stack.layers[:3]:
        h = layer(h, training=False)
    direct = stack.layers[4](tf.gather(h, key_permutation(5, 1024), axis=-1))
    np.testing.assert_allclose(stack.logits(x).numpy(), tf.reshape(direct, (3, 8, 4)).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_zero_effort_rate_of_random_embeddings_is_near_zero():
    x, _ = clustered(30, 2, d=512)
    pairs, issame = verification_set(40, d=512)
    for stack in (built_stack(stack_cfg('1', m=256, q=8), d=512, key=3),   # quickstart-sized
                  built_stack(stack_cfg('1', m=32, q=4), d=512, key=3)):
        _, threshold, enrolled = eer_and_threshold(stack, pairs, issame)
        probes = like_real_embeddings(x, 500, seed=1)
        np.testing.assert_allclose(np.linalg.norm(probes, axis=1).mean(),
                                   np.linalg.norm(x, axis=1).mean(), rtol=0.05)
        rate = zero_effort_rate(stack.codes(probes), enrolled, threshold)
        assert 0.0 <= rate <= 0.01
    # A probe identical to an enrolled code is always accepted: the rate can be 1.
    assert zero_effort_rate(enrolled[:3], enrolled[:3], 1) == pytest.approx(1 / 3)


def test_key_change_verdict_flags_worse_eer_and_revocable_codes():
    good = dict(eer_plain=0.10, eer_shared_key_mean=0.11, num_pairs=600, num_genuine_pairs=300,
                revocability_rate=0.0, revocability_rate_same_sample=0.0)
    ok, problems, tolerance = key_change_verdict(good)
    assert ok and not problems and tolerance == pytest.approx(2 * np.sqrt(0.09 / 300))
    ok, problems, _ = key_change_verdict(dict(good, eer_shared_key_mean=0.2))
    assert not ok and 'EER under new keys' in problems[0]
    ok, problems, _ = key_change_verdict(dict(good, revocability_rate_same_sample=0.27))
    assert not ok and 'revocability rate 0.2700' in problems[0]
    nonmated = dict(good, nonmated_mean=0.16)  # q = 8: chance is 0.125
    assert key_change_verdict(nonmated)[0]
    ok, problems, _ = key_change_verdict(nonmated, q=8)
    assert not ok and 'agree on 0.1600' in problems[0]
    assert key_change_verdict(dict(good, nonmated_mean=0.13), q=8)[0]


def test_gallery_refuses_a_model_its_protection_report_found_unfit_for_new_keys(tmp_path,
                                                                                monkeypatch):
    import json

    from modules.deploy.hashing import check_key_change
    monkeypatch.chdir(tmp_path)
    cfg = stack_cfg('T1')
    ckpt_dir = tmp_path / 'checkpoints' / cfg['sub_name']
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / 'checkpoint').write_text('model_checkpoint_path: "ckpt-2"\n')
    (ckpt_dir / 'ckpt-2.index').write_bytes(b'')
    logs = tmp_path / 'logs' / cfg['sub_name']
    logs.mkdir(parents=True)
    check_key_change(cfg)  # nothing measured: accepted
    report = {'key_change_ok': False, 'key_change_problems': ['revocability rate 0.0210 > 0.01'],
              'loaded_from': {'iom': 'checkpoints/attack_test/ckpt-1'}}
    (logs / 'protection_lfw.json').write_text(json.dumps(report))
    check_key_change(cfg)  # the report is of an older checkpoint
    report['loaded_from']['iom'] = 'checkpoints/attack_test/ckpt-2'
    (logs / 'protection_lfw.json').write_text(json.dumps(report))
    with pytest.raises(UserError, match=r'protection_lfw.json: .*revocability rate 0.0210'):
        check_key_change(cfg)
    (logs / 'protection_lfw.json').write_text(json.dumps(dict(report, key_change_ok=True)))
    check_key_change(cfg)
