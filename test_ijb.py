"""IJB-B / IJB-C 1:1 template verification: TAR at FAR 1e-6 .. 1e-1 of the float embedding and,
with --iom, of the stage-2 IoM codes (InsightFace's protocol, see modules/ijb.py)."""
import os
import time

from absl import app, flags

from modules import script_flags
from modules.config import STAGE2_REQUIRED, TEST_REQUIRED, load_config, log_dir
from modules.utils import UserError, cli_guard, quiet_tensorflow

script_flags.define(None, 'stage-1 config (a stage-2 config with --iom)', gpu=True)
flags.adopt_module_key_flags(script_flags)  # listed by --help as the script's own
flags.DEFINE_string('ijb_root', None, 'folder holding IJBC/ and IJBB/ (InsightFace IJB_release)')
flags.DEFINE_enum('dataset', 'IJBC', ['IJBC', 'IJBB'], 'which IJB set')
flags.DEFINE_bool('iom', False, 'also hash the templates with the stage-2 model and compare the '
                  'codes by Hamming similarity')
flags.DEFINE_integer('batch_size', None, 'embedding batch size (default: eval_batch_size)')
flags.DEFINE_integer('chunk_size', 4096, 'images per cached feature chunk: a killed run resumes '
                     'at the first missing chunk')
flags.mark_flags_as_required(['cfg_path', 'ijb_root'])
FLAGS = flags.FLAGS


def build_models(cfg, iom):
    """(embedding model, IoM model or None, description of the loaded weights or None)."""
    from modules.models import arcface_from_config, load_backbone_weights, load_iom_model
    if iom:
        iom_model = load_iom_model(cfg)
        return iom_model.get_layer('arcface_model'), iom_model, iom_model.loaded_from['backbone']
    model = arcface_from_config(cfg, use_pretrain=False)
    return model, None, load_backbone_weights(model, cfg, run=cfg['sub_name'])


@cli_guard
def main(_):
    """Embed the aligned loose crops (cached), pool templates, score the pairs, report TAR@FAR."""
    cfg = load_config(FLAGS.cfg_path, STAGE2_REQUIRED if FLAGS.iom else TEST_REQUIRED)
    from modules import ijb
    if FLAGS.chunk_size < 1 or (FLAGS.batch_size is not None and FLAGS.batch_size < 1):
        raise UserError('--chunk_size and --batch_size must be positive')
    meta = ijb.read_meta(FLAGS.ijb_root, FLAGS.dataset)  # bad data fails before the model is built
    quiet_tensorflow()
    from modules.training import configure_devices
    configure_devices(FLAGS.gpu)
    embedder, iom_model, source = build_models(cfg, FLAGS.iom)
    print(f"[*] model: {source or 'random weights'}")
    cache_dir = None
    if source:
        cache_dir = os.path.join(log_dir(cfg), f'ijb_{FLAGS.dataset}_features')
    else:
        print('[*] Warning: random weights differ from run to run: image features are not cached')
    start = time.perf_counter()
    feats, reused = ijb.image_features(embedder, meta, cache_dir, source, cfg['input_size'],
                                       FLAGS.batch_size or cfg['eval_batch_size'],
                                       FLAGS.chunk_size)
    embed_seconds = time.perf_counter() - start
    if reused:
        print(f'[*] resumed: {reused} feature chunk(s) read from {cache_dir}')

    start = time.perf_counter()
    template_ids, template_feats = ijb.template_features(feats, meta.templates, meta.medias,
                                                         meta.faceness)
    methods = {'float (cosine)': (template_feats, 'cosine')}
    if FLAGS.iom:
        codes = ijb.iom_template_codes(iom_model, template_feats, feats)
        methods[f"IoM m={cfg['m']} q={cfg['q']} (Hamming)"] = (codes, 'Hamming')
    tars, rocs = {}, {}
    for name, (templates, measure) in methods.items():
        scores = ijb.pair_scores(templates, template_ids, meta.pairs, measure)
        tars[name], rocs[name] = ijb.tar_at_far(scores, meta.labels)
    score_seconds = time.perf_counter() - start

    genuine = int(meta.labels.sum())
    summary = {'dataset': FLAGS.dataset, 'images': len(meta.names),
               'templates': int(template_ids.size), 'pairs': len(meta.labels),
               'genuine_pairs': genuine, 'impostor_pairs': len(meta.labels) - genuine,
               'model': source, 'flip': True, 'faceness': True,
               'tar_at_far': {name: {f'{far:.0e}': tar for far, tar in t.items()}
                              for name, t in tars.items()},
               'seconds': {'features': round(embed_seconds, 2),
                           'templates_and_scores': round(score_seconds, 2)}}
    print(f"{FLAGS.dataset}: {summary['images']} images, {summary['templates']} templates, "
          f"{summary['pairs']} pairs ({genuine} genuine); features {embed_seconds:.1f} s, "
          f'pooling + scoring {score_seconds:.1f} s')
    print(ijb.format_table(tars, FLAGS.dataset))
    for path in ijb.write_report(summary, rocs, log_dir(cfg), FLAGS.dataset):
        print(f'[*] wrote {path}')


if __name__ == '__main__':
    app.run(main)
