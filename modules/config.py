"""The config schema: every key a config may hold, declared once, and the YAML loader that checks it.

Defaults live only in `SCHEMA`; code that may see a config without a key asks `setting(cfg, key)`
rather than restating the default.
"""
import dataclasses
import os

import yaml

from modules.utils import UserError


class ConfigError(UserError):
    """A config file that cannot be used as it is."""


# Config schema. Every key a config may hold is declared here once, with its type, default and
# allowed values; `load_config` rejects anything else, so a typo never silently falls back to a
# default.
REQUIRED = object()

# The Insight backbones (LResNet-IR): residual units per stage (arcface_torch's iresnet18 ...
# iresnet200), stage widths and BatchNorm epsilon. Kept here, not in modules/backbones.py, so that
# the weight converters read them without importing TensorFlow.
INSIGHT_UNITS = {'Insight_ResNet18': (2, 2, 2, 2), 'Insight_ResNet34': (3, 4, 6, 3),
                 'Insight_ResNet50': (3, 4, 14, 3), 'Insight_ResNet100': (3, 13, 30, 3),
                 'Insight_ResNet200': (6, 26, 60, 6)}
INSIGHT_FILTERS = (64, 128, 256, 512)  # channels of the four stages
# MXNet's BatchNorm epsilon, kept so converted weights reproduce the original.
INSIGHT_BN_EPS = 2e-5
BACKBONES = ('ResNet50', 'MobileNetV2', *INSIGHT_UNITS)
LOSS_FUNS = ('batch_hard_triplet', 'batch_all_triplet_loss', 'semihard_triplet_loss',
             'batch_all_arc_triplet_loss', 'batch_hard_arc_triplet_loss')


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: accepted python types, default value and optional allowed values."""

    types: tuple
    default: object = None
    choices: tuple = None
    doc: str = ''


_NUM = (int, float)
SCHEMA = {
    # general
    'batch_size': Key((int,), REQUIRED, doc='global training batch size (stage 2: must equal '
                       'classes_per_batch x samples_per_class)'),
    'eval_batch_size': Key((int,), 64, doc='batch size for embedding extraction'),
    'input_size': Key((int,), 112, doc='input image side in pixels'),
    'embd_shape': Key((int,), 512, doc='embedding size of the backbone output layer'),
    'sub_name': Key((str,), REQUIRED, doc='run name: checkpoints/<sub_name>/, logs/<sub_name>/'),
    'backbone_type': Key((str,), REQUIRED, BACKBONES, doc='feature extractor'),
    'head_type': Key((str,), 'ArcHead', ('ArcHead', 'NormHead', 'IoMHead'),
                     doc='training head: ArcHead/NormHead (stage 1), IoMHead (stage 2)'),
    'is_ccrop': Key((bool,), False, doc='central crop on training and test images'),
    'use_pretrain': Key((bool,), True, doc='ImageNet weights for ResNet50/MobileNetV2 if cached'),
    'pretrained_weights': Key((str, type(None)), None,
                              doc='.npy weights for Insight backbones (default '
                                  'pre_models/resnet100/resnet100.npy or resnet50.npy)'),
    'margin': Key(_NUM, 0.5, doc='ArcHead additive angular margin (radians)'),
    'logist_scale': Key(_NUM, 64.0, doc='ArcHead logit scale'),
    # stage-1 training
    'train_dataset': Key((str,), REQUIRED, doc='TFRecord (stage 1) or identity-folder root (stage 2)'),
    'binary_img': Key((bool,), True, doc='TFRecord holds encoded images (True) or paths (False)'),
    'num_classes': Key((int,), REQUIRED, doc='number of training identities'),
    'num_samples': Key((int,), REQUIRED, doc='training images per epoch'),
    'epochs': Key((int,), REQUIRED, doc='training epochs'),
    'base_lr': Key(_NUM, REQUIRED, doc='initial learning rate'),
    'lr_schedule': Key((str,), 'constant', ('constant', 'step', 'cosine', 'poly'),
                       doc='learning-rate schedule (poly: (1 - t/T)^2 to 0, as arcface_torch)'),
    'warmup_steps': Key((int,), 0, doc='linear warm-up from 0 to base_lr over the first N steps; '
                        'cosine/poly then decay over the remaining steps'),
    'log_steps': Key((int,), 20, doc='read the loss and write TensorBoard every N steps (a '
                     'non-finite loss anywhere in between is still caught)'),
    'mixed_precision': Key((str, type(None)), None, (None, 'mixed_float16', 'mixed_bfloat16'),
                           doc='Keras dtype policy of the backbone (null: float32); logits, '
                               'losses, BN statistics and the embedding stay float32'),
    'jit_compile': Key((bool,), False, doc='XLA-compile the training step (slower on CPUs)'),
    'lr_steps': Key((list,), [], doc="step schedule: steps at which the rate is multiplied by 0.1"),
    'w_decay': Key(_NUM, 5e-4, doc='L2 weight decay'),
    'save_steps': Key((int,), 1000, doc='checkpoint every N steps'),
    'max_steps': Key((int, type(None)), None, doc='stop after N steps (None: epochs decide)'),
    'shuffle_buffer': Key((int,), 10240, doc='stage-1 shuffle buffer (records)'),
    'partial_fc': Key((bool,), False, doc='stage 1: Partial FC, the ArcHead/NormHead centres '
                      'sharded over the replicas and sampled (docs/partial-fc.md)'),
    'sample_rate': Key(_NUM, 1.0, doc='Partial FC: share of each shard scored per step, in '
                       '(0, 1]; positives always included (1.0: the exact full softmax)'),
    # test
    'test_dataset': Key((str,), REQUIRED, doc='root of the verification sets'),
    'test_dataset_ytf': Key((str, type(None)), None, doc='retrieval set (identity folders)'),
    'test_dataset_fs': Key((str, type(None)), None, doc='retrieval set (identity folders)'),
    'is_flip': Key((bool,), False, doc='horizontal-flip test-time augmentation'),
    # stage 2
    'stage1_sub_name': Key((str, type(None)), None,
                           doc='stage-1 run whose checkpoint stage 2 starts from'),
    'samples_per_class': Key((int,), 4, doc='PK sampling: images per identity in a batch'),
    'classes_per_batch': Key((int,), 50, doc='PK sampling: identities in a batch'),
    'img_ext': Key((str,), 'jpg', doc='image file extension in identity folders'),
    'loss_fun': Key((str,), 'batch_hard_arc_triplet_loss', LOSS_FUNS, doc='metric loss'),
    'triplet_margin': Key(_NUM, 0.0, doc='margin of the metric loss'),
    'bin_lut_loss': Key((str,), 'tanh', ('tanh', 'sigmoid', 'none'), doc='LUT binarisation loss'),
    'hidden_layer_remark': Key((str,), '1', ('1', '2', '3', 'T1', 'T2'),
                               doc='IoM projection variant'),
    'T': Key(_NUM, None, doc="softmax temperature (default 1, or 0.01 for 'T1'/'T2')"),
    'code_balance_loss': Key((bool,), True, doc='use the code-balance loss'),
    'quanti': Key((bool,), True, doc='use the quantisation loss'),
    'q': Key((int,), 8, doc='IoM: indices per group'),
    'm': Key((int,), 512, doc='IoM: number of groups (code length)'),
    'perm_key': Key((int, type(None)), None, doc='permutation key (None: identity)'),
    'perm_position': Key((str,), 'projection', ('projection', 'input'),
                         doc='where the key permutes features: projection = right before the IoM '
                             'projection, after any hidden layers (codes work under every key); '
                             'input = on the embedding, before the hidden layers (the original '
                             'order: with hidden layers the model works only under its training '
                             'key)'),
    'iom_projection_bias': Key((bool,), False,
                               doc='stage 2: the IoM projection W.P(x) + b has a bias b (true: the '
                                   "seed's layer, needed to load its checkpoints); the key never "
                                   'permutes b, so a trained b is a key-independent code '
                                   '(docs/protection.md)'),
    'iom_orthogonal_groups': Key((bool,), True,
                                 doc='stage 2: after every update each group of q columns of the IoM '
                                     'projection W is made orthonormal (times one scale; false: the '
                                     "seed's free kernel); otherwise a column that outgrows or stands "
                                     'apart from its group wins its argmax under every key '
                                     '(docs/protection.md)'),
    'iom_tight_frame': Key((bool,), True,
                           doc='stage 2: after every update the IoM projection W is made a tight '
                               'frame (rows orthogonal, of one norm; false: not kept); otherwise a '
                               'long run collapses W onto a few directions and codes under two '
                               'keys share its few patterns (docs/protection.md)'),
    'monitor_holdout': Key(_NUM, 0.1, doc='stage 2: share of the training identities held out '
                           'of training for the key-change monitor (0: no monitor)'),
    'monitor_keys': Key((int,), 3, doc='stage 2: random keys the key-change monitor hashes under'),
    'stop_on_key_change_fail': Key((bool,), False,
                                   doc='stage 2: stop training (after saving) when the monitor '
                                       'finds codes that are not key-dependent; false: warn'),
    'metric_weight': Key(_NUM, 1.0, doc='weight of the metric loss'),
    'l2_weight': Key(_NUM, 0.5, doc='weight of the L2 regulariser'),
    'quanti_weight': Key(_NUM, 0.5, doc='weight of the quantisation loss'),
    'bin_lut_weight': Key(_NUM, 0.001, doc='weight of the LUT binarisation loss'),
    'code_balance_weight': Key(_NUM, 1.0, doc='weight of the code-balance loss'),
    'cache_embeddings': Key((bool,), False,
                            doc='stage 2: compute frozen-backbone embeddings once and train on them'),
    'eval_steps': Key((int,), 0, doc='stage 2: evaluate every N steps (0: never during training; '
                   'test_twostage_iom.py evaluates afterwards)'),
    'bad_images': Key((str,), 'skip', ('skip', 'fail'),
                      doc='a training image that cannot be read or decoded: skip (leave it out and '
                          'count it) or fail (stop the run naming it)'),
}

# Keys of the original research code's configs that nothing reads: accepted, so its configs load,
# and dropped.
SEED_ONLY_KEYS = ('dataset_ext',)

STAGE1_REQUIRED = ('batch_size', 'sub_name', 'backbone_type', 'train_dataset', 'num_classes',
                   'num_samples', 'epochs', 'base_lr', 'test_dataset')
STAGE2_REQUIRED = STAGE1_REQUIRED + ('q', 'm', 'loss_fun')
TEST_REQUIRED = ('sub_name', 'backbone_type', 'test_dataset')

_COERCE_STR = ('hidden_layer_remark',)


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML loader that refuses a key written twice in one mapping."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f'key {key!r} appears twice (first at line {seen[key]})',
                key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _type_name(types):
    names = ['null' if t is type(None) else t.__name__ for t in types]
    return ' or '.join(names)


def validate_config(raw, path='<config>', required=STAGE1_REQUIRED):
    """Check a config dict against SCHEMA, fill defaults and return a new dict."""
    if not isinstance(raw, dict):
        raise ConfigError(f'{path}: the file must hold a mapping of keys to values')
    for key in raw:
        if key not in SCHEMA and key not in SEED_ONLY_KEYS:
            raise ConfigError(f"{path}: unknown key '{key}'")
    cfg = {}
    for key, spec in SCHEMA.items():
        if key not in raw:
            if key in required or spec.default is REQUIRED:
                if key in required:
                    raise ConfigError(f"{path}: missing required key '{key}'")
                continue
            cfg[key] = list(spec.default) if isinstance(spec.default, list) else spec.default
            continue
        value = raw[key]
        if key in _COERCE_STR and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        ok = isinstance(value, spec.types) and not (
            isinstance(value, bool) and bool not in spec.types)
        if value is None and spec.default is None:
            ok = True
        if not ok:
            raise ConfigError(f"{path}: key '{key}' must be {_type_name(spec.types)}, "
                              f'got {value!r}')
        if isinstance(value, float) and float in spec.types and not isinstance(value, bool):
            value = float(value)
        if spec.choices is not None and value not in spec.choices:
            raise ConfigError(f"{path}: key '{key}' is {value!r}; allowed: "
                              + ', '.join(map(str, spec.choices)))
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{path}: key '{key}' must not be negative, got {value!r}")
        cfg[key] = value
    for key in ('batch_size', 'input_size', 'embd_shape', 'q', 'm', 'samples_per_class',
                'classes_per_batch', 'save_steps', 'log_steps'):
        if key in cfg and cfg[key] == 0:
            raise ConfigError(f"{path}: key '{key}' must be positive")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in cfg.get('lr_steps', [])):
        raise ConfigError(f"{path}: key 'lr_steps' must be a list of integers")
    if not 0 < cfg['sample_rate'] <= 1:
        raise ConfigError(f"{path}: key 'sample_rate' must be in (0, 1], got {cfg['sample_rate']!r}")
    if not 0 <= cfg['monitor_holdout'] < 1:
        raise ConfigError(f"{path}: key 'monitor_holdout' must be in [0, 1), got "
                          f"{cfg['monitor_holdout']!r}")
    if cfg['monitor_keys'] < 2:
        raise ConfigError(f"{path}: key 'monitor_keys' must be at least 2 (cross-key pairs need "
                          f"two keys), got {cfg['monitor_keys']!r}")
    if cfg.get('T') is None:
        cfg['T'] = 0.01 if cfg.get('hidden_layer_remark', '1').startswith('T') else 1.0
    if cfg['T'] <= 0:
        raise ConfigError(f"{path}: key 'T' must be positive")
    return cfg


def load_config(path, required=STAGE1_REQUIRED):
    """Read a YAML config with a safe loader and validate it; raise ConfigError naming key and file."""
    try:
        with open(path, encoding='utf-8') as fh:
            raw = yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigError(f'config file not found: {path}') from None
    except IsADirectoryError:
        raise ConfigError(f'config path is a directory: {path}') from None
    except yaml.YAMLError as err:
        mark = getattr(err, 'problem_mark', None)
        where = f' line {mark.line + 1}' if mark is not None else ''
        problem = getattr(err, 'problem', None) or str(err).splitlines()[0]
        raise ConfigError(f'{path}:{where} invalid YAML: {problem}') from None
    return validate_config(raw if raw is not None else {}, path, required)


def setting(cfg, key):
    """`cfg[key]`, or the SCHEMA default when a partial config (a test's, a benchmark's) lacks it."""
    if key in cfg:
        return cfg[key]
    default = SCHEMA[key].default
    if default is REQUIRED:
        raise ConfigError(f"missing required key '{key}'")
    return list(default) if isinstance(default, list) else default


def checkpoint_dir(cfg):
    """Directory holding the run's checkpoints."""
    return os.path.join('checkpoints', cfg['sub_name'])


def log_dir(cfg):
    """Directory holding the run's TensorBoard logs, results JSON and plots."""
    return os.path.join('logs', cfg['sub_name'])


