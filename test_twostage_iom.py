"""Evaluate a stage-2 Deep IoM model: verification on LFW / AgeDB-30 / CFP-FP, optional retrieval."""
import json
import os

from absl import app, flags

from modules import script_flags
from modules.config import STAGE2_REQUIRED, load_config, log_dir
from modules.utils import atomic_output, cli_guard, quiet_tensorflow

script_flags.define(2, 'stage-2 config file path', gpu=True)
flags.adopt_module_key_flags(script_flags)  # listed by --help as the script's own
flags.DEFINE_enum('measure', 'Hamming', ['Hamming', 'Euclidean', 'Jaccard'],
                  'distance between IoM codes')
flags.DEFINE_bool('isLUT', False, 'compare the log2(q)-bit LUT binarisation of the codes (Hamming '
                  'on bits) instead of --measure')
FLAGS = flags.FLAGS


@cli_guard
def main(_):
    """Hash every test image with the trained IoM model and report verification and retrieval."""
    cfg = load_config(FLAGS.cfg_path, STAGE2_REQUIRED)
    quiet_tensorflow()
    from modules import evaluations as ev
    from modules import testsets
    from modules.models import iom_hasher, load_iom_model
    from modules.training import configure_devices
    configure_devices(FLAGS.gpu)
    measure = 'LUT' if FLAGS.isLUT else FLAGS.measure
    val_sets = testsets.get_val_data(cfg['test_dataset'])  # bad test data fails before the model is built
    model = load_iom_model(cfg)
    hasher = iom_hasher(model, cfg['is_flip'])
    options = dict(q=cfg['q'], batch_size=cfg['eval_batch_size'], is_ccrop=cfg['is_ccrop'])
    results = ev.evaluate_verification(hasher, val_sets, measure, **options)
    print(f"IoM codes m={cfg['m']} q={cfg['q']}, measure {measure}")
    print(ev.format_table(results))
    prefix = f'iom_{measure}'
    for path in ev.write_report(results, log_dir(cfg), prefix):
        print(f'[*] wrote {path}')
    retrieval = {}
    for key, name in (('test_dataset_ytf', 'ytf'), ('test_dataset_fs', 'facescrub')):
        if cfg[key]:
            images, labels, _ = testsets.load_identity_folders(cfg[key], cfg['img_ext'])
            retrieval[name] = ev.evaluate_retrieval(hasher, images, labels, measure, **options)
    if retrieval:
        print(ev.format_retrieval_table(retrieval))
        path = os.path.join(log_dir(cfg), f'{prefix}_retrieval.json')
        with atomic_output(path, 'w') as fh:
            json.dump(retrieval, fh, indent=2, default=float)
        print(f'[*] wrote {path}')


if __name__ == '__main__':
    app.run(main)
