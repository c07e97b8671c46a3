"""Evaluate a stage-1 ArcFace model (float embeddings) on LFW / AgeDB-30 / CFP-FP / CFP-FF."""
from absl import app, flags

from modules import script_flags
from modules.config import TEST_REQUIRED, load_config, log_dir
from modules.utils import cli_guard, quiet_tensorflow

script_flags.define(1, 'stage-1 config file path', gpu=True)
script_flags.define_test_sets()
flags.adopt_module_key_flags(script_flags)  # listed by --help as the script's own
FLAGS = flags.FLAGS


@cli_guard
def main(_):
    """Load the newest checkpoint of the config's run, evaluate it, print and save the results."""
    cfg = load_config(FLAGS.cfg_path, TEST_REQUIRED)
    quiet_tensorflow()
    from modules.evaluations import evaluate_verification, format_table, write_reports
    from modules.models import arcface_from_config, load_backbone_weights
    from modules.testsets import get_val_data
    from modules.training import configure_devices
    configure_devices(FLAGS.gpu)
    root = FLAGS.test_dataset or cfg['test_dataset']
    val_sets = get_val_data(root, FLAGS.sets)  # bad test data fails before the model is built
    model = arcface_from_config(cfg, use_pretrain=False)
    source = load_backbone_weights(model, cfg, run=cfg['sub_name'])
    print(f"[*] model: {source or 'random weights'}")
    results = evaluate_verification(model, val_sets, 'cosine',
                                    batch_size=cfg['eval_batch_size'], is_flip=cfg['is_flip'],
                                    is_ccrop=cfg['is_ccrop'])
    print(format_table(results))
    for path in write_reports(results, log_dir(cfg), 'arcface', root, cfg['test_dataset']):
        print(f'[*] wrote {path}')


if __name__ == '__main__':
    app.run(main)
