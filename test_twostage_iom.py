"""Evaluate a stage-2 Deep IoM model: verification on LFW / AgeDB-30 / CFP-FP / CFP-FF, optional
retrieval, and with --baseline random the float embedding and a seeded random IoM beside it."""
import json
import os

from absl import app, flags

from modules import script_flags
from modules.config import STAGE2_REQUIRED, load_config, log_dir
from modules.utils import atomic_output, cli_guard, quiet_tensorflow

script_flags.define(2, 'stage-2 config file path', gpu=True)
script_flags.define_test_sets()
flags.adopt_module_key_flags(script_flags)  # listed by --help as the script's own
flags.DEFINE_enum('measure', 'Hamming', ['Hamming', 'Euclidean', 'Jaccard'],
                  'distance between IoM codes')
flags.DEFINE_bool('isLUT', False, 'compare the log2(q)-bit LUT binarisation of the codes (Hamming '
                  'on bits) instead of --measure')
flags.DEFINE_enum('baseline', None, ['random'], "random: also hash the same embeddings with Jin "
                  "et al.'s random IoM (Gaussian projections, same m, q and key) and print float / "
                  'learned / random in one table')
flags.DEFINE_integer('seed', None, 'seed of the random IoM projections (--baseline random; '
                     "default: modules.models.RANDOM_IOM_SEED, the one stage 2's monitor uses)")
FLAGS = flags.FLAGS


@cli_guard
def main(_):
    """Hash every test image with the trained IoM model and report verification and retrieval."""
    cfg = load_config(FLAGS.cfg_path, STAGE2_REQUIRED)
    quiet_tensorflow()
    from modules import evaluations as ev
    from modules import testsets
    from modules.models import (
        RANDOM_IOM_SEED,
        iom_codes,
        iom_hasher,
        load_iom_model,
        random_iom_codes,
    )
    from modules.training import configure_devices
    configure_devices(FLAGS.gpu)
    measure = 'LUT' if FLAGS.isLUT else FLAGS.measure
    root = FLAGS.test_dataset or cfg['test_dataset']
    val_sets = testsets.get_val_data(root, FLAGS.sets)  # bad test data fails before the model is built
    model = load_iom_model(cfg)
    options = dict(batch_size=cfg['eval_batch_size'], is_ccrop=cfg['is_ccrop'])
    # One embedding per image (flip-summed first, as the hasher does); every code comes from it.
    arcface = model.get_layer('arcface_model')
    embeddings = {name: ev.extract_embeddings(arcface, images, is_flip=cfg['is_flip'], **options)
                  for name, (images, _) in val_sets.items()}
    issame = {name: pairs for name, (_, pairs) in val_sets.items()}
    q = cfg['q']
    results = {name: ev.evaluate_pairs(iom_codes(model, emb), issame[name], measure, q)
               for name, emb in embeddings.items()}
    print(f"IoM codes m={cfg['m']} q={q}, measure {measure}")
    print(ev.format_table(results))
    prefix = f'iom_{measure}'
    for path in ev.write_reports(results, log_dir(cfg), prefix, root, cfg['test_dataset']):
        print(f'[*] wrote {path}')
    if FLAGS.baseline == 'random':
        seed = RANDOM_IOM_SEED if FLAGS.seed is None else FLAGS.seed
        rows = {'float': {name: ev.evaluate_pairs(emb, issame[name], 'cosine')
                          for name, emb in embeddings.items()},
                'learned': results,
                'random': {name: ev.evaluate_pairs(
                    random_iom_codes(emb, cfg['m'], q, cfg['perm_key'], seed),
                    issame[name], measure, q) for name, emb in embeddings.items()}}
        code = f"IoM m={cfg['m']} q={q} ({measure})"
        labels = {'float': 'ArcFace float (cosine)', 'learned': f'{code}, learned',
                  'random': f'{code}, random (seed {seed})'}
        record = ev.comparison_record(rows, labels, measure=measure, m=cfg['m'], q=q,
                                      perm_key=cfg['perm_key'], random_seed=seed,
                                      test_dataset=os.path.realpath(root),
                                      model=dict(model.loaded_from))
        print(ev.format_comparison(record))
        targets = [os.path.join(ev.results_dir(log_dir(cfg), root), f'{prefix}_comparison.json')]
        if os.path.realpath(root) == os.path.realpath(cfg['test_dataset']):
            targets.append(os.path.join(log_dir(cfg), f'{prefix}_comparison.json'))
        for path in targets:
            with atomic_output(path, 'w') as fh:
                json.dump(record, fh, indent=2)
            print(f'[*] wrote {path}')
    retrieval = {}
    hasher = iom_hasher(model, cfg['is_flip'])
    for key, name in (('test_dataset_ytf', 'ytf'), ('test_dataset_fs', 'facescrub')):
        if cfg[key]:
            images, labels, _ = testsets.load_identity_folders(cfg[key], cfg['img_ext'])
            retrieval[name] = ev.evaluate_retrieval(hasher, images, labels, measure, q=q,
                                                    **options)
    if retrieval:
        print(ev.format_retrieval_table(retrieval))
        path = os.path.join(log_dir(cfg), f'{prefix}_retrieval.json')
        with atomic_output(path, 'w') as fh:
            json.dump(retrieval, fh, indent=2, default=float)
        print(f'[*] wrote {path}')


if __name__ == '__main__':
    app.run(main)
