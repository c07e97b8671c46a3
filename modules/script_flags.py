"""The absl flags several scripts share, defined once: --cfg_path (with the seed's default for a
stage-1 or stage-2 script) and --gpu. A script calls `define(...)` and then
`flags.adopt_module_key_flags(script_flags)` so that --help lists them as its own."""
from absl import flags

# The default --cfg_path of the seed's scripts: stage 1, stage 2, or none (a gallery knows its own).
CFG_PATH_DEFAULTS = {1: './configs/arc_res50.yaml',
                     2: './configs/config_15/cfg15_allloss_res100_512x8.yaml', None: None}


def define(stage, cfg_help, gpu=False):
    """Define --cfg_path (the seed's default for `stage`: 1, 2 or None) and, with gpu, --gpu."""
    flags.DEFINE_string('cfg_path', CFG_PATH_DEFAULTS[stage], cfg_help)
    if gpu:
        flags.DEFINE_string('gpu', None, "GPUs to use, e.g. '0' or '0,1' (default: all visible)")
