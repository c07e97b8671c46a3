"""Config loading: every bad input is one clear ConfigError naming the key and the file."""
import subprocess
import sys

import pytest

from modules.config import SCHEMA, STAGE2_REQUIRED, ConfigError, load_config, setting

BASE = """batch_size: 8
sub_name: t
backbone_type: MobileNetV2
train_dataset: x.tfrecord
num_classes: 3
num_samples: 30
epochs: 1
base_lr: 0.01
test_dataset: somewhere
"""


def write(tmp_path, text, name='cfg.yaml'):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_valid_config_gets_defaults(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg['batch_size'] == 8
    assert cfg['input_size'] == 112 and cfg['head_type'] == 'ArcHead'
    assert cfg['w_decay'] == pytest.approx(5e-4)


def test_seed_only_keys_load_and_are_dropped(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "dataset_ext: 'ms'\n"))
    assert 'dataset_ext' not in cfg


def test_setting_reads_schema_defaults():
    assert setting({}, 'l2_weight') == SCHEMA['l2_weight'].default
    assert setting({'l2_weight': 2.0}, 'l2_weight') == 2.0
    with pytest.raises(ConfigError, match="'sub_name'"):
        setting({}, 'sub_name')


@pytest.mark.parametrize('text, expected', [
    (BASE + 'batch_sise: 3\n', "unknown key 'batch_sise'"),
    (BASE.replace('epochs: 1\n', ''), "missing required key 'epochs'"),
    (BASE.replace('batch_size: 8', 'batch_size: eight'), "key 'batch_size' must be int"),
    (BASE.replace('MobileNetV2', 'VGG16'), "key 'backbone_type' is 'VGG16'; allowed"),
    (BASE + 'is_ccrop: 1\n', "key 'is_ccrop' must be bool"),
    (BASE.replace('base_lr: 0.01', 'base_lr: -0.01'), "key 'base_lr' must not be negative"),
    (BASE + 'batch_size: 9\n', "key 'batch_size' appears twice"),
    (BASE + 'q: [1\n', 'invalid YAML'),
    ('- a\n- b\n', 'must hold a mapping'),
])
def test_bad_config_names_key_and_file(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)
    assert path in str(err.value)


def test_yaml_error_gives_line(tmp_path):
    path = write(tmp_path, BASE + 'q: [1\n')
    with pytest.raises(ConfigError, match=r'line \d+'):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match='config file not found'):
        load_config('/nonexistent/cfg.yaml')


def test_unsafe_yaml_tag_refused(tmp_path):
    path = write(tmp_path, BASE + 'sub_name: !!python/object/apply:os.system ["echo hi"]\n')
    with pytest.raises(ConfigError, match='invalid YAML'):
        load_config(path)


def test_stage2_keys_and_temperature(tmp_path):
    text = BASE + "q: 8\nm: 16\nloss_fun: batch_hard_triplet\nhidden_layer_remark: T1\n"
    cfg = load_config(write(tmp_path, text), STAGE2_REQUIRED)
    assert cfg['T'] == pytest.approx(0.01)
    cfg = load_config(write(tmp_path, text.replace('T1', '2')), STAGE2_REQUIRED)
    assert cfg['hidden_layer_remark'] == '2' and cfg['T'] == 1.0
    with pytest.raises(ConfigError, match="missing required key 'm'"):
        load_config(write(tmp_path, text.replace('m: 16\n', '')), STAGE2_REQUIRED)


def test_script_prints_one_line_and_exits_2(tmp_path):
    path = write(tmp_path, BASE + 'bogus: 1\n')
    proc = subprocess.run([sys.executable, 'train.py', '--cfg_path', path],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {path}: unknown key 'bogus'"
    assert 'Traceback' not in proc.stderr


def test_shipped_configs_are_valid():
    import glob
    paths = glob.glob('configs/**/*.yaml', recursive=True)
    assert len(paths) >= 6
    for path in paths:
        required = STAGE2_REQUIRED if 'IoMHead' in open(path).read() else ()
        load_config(path, required or load_config.__defaults__[0])
