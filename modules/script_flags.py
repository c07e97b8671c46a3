"""The absl flags several scripts share, defined once: --cfg_path (with the seed's default for a
stage-1 or stage-2 script), --gpu, and the testers' --sets and --test_dataset. A script calls
`define(...)` and then `flags.adopt_module_key_flags(script_flags)` so that --help lists them as
its own."""
from absl import flags

# The default --cfg_path of the seed's scripts: stage 1, stage 2, or none (a gallery knows its own).
CFG_PATH_DEFAULTS = {1: './configs/arc_res50.yaml',
                     2: './configs/config_15/cfg15_allloss_res100_512x8.yaml', None: None}


def define(stage, cfg_help, gpu=False):
    """Define --cfg_path (the seed's default for `stage`: 1, 2 or None) and, with gpu, --gpu."""
    flags.DEFINE_string('cfg_path', CFG_PATH_DEFAULTS[stage], cfg_help)
    if gpu:
        flags.DEFINE_string('gpu', None, "GPUs to use, e.g. '0' or '0,1' (default: all visible)")


def define_test_sets():
    """Define --sets and --test_dataset (test.py, test_twostage_iom.py)."""
    flags.DEFINE_list('sets', None, 'verification sets to evaluate, e.g. lfw,cfp_fp (default: '
                      'every one of lfw, agedb_30, cfp_fp, cfp_ff present in the test folder)')
    flags.DEFINE_string('test_dataset', None, "test folder (default: the config's test_dataset); "
                        'results are kept per test folder and set under logs/<sub_name>/results/')
