"""Stage 2: learn Deep IoM hashing on top of the frozen stage-1 embedding model."""
from absl import app, flags

from modules.utils import STAGE2_REQUIRED, cli_guard, load_config, quiet_tensorflow

flags.DEFINE_string('cfg_path', './configs/config_15/cfg15_allloss_res100_512x8.yaml',
                    'stage-2 config file path')
flags.DEFINE_string('gpu', None, "GPUs to use, e.g. '0' or '0,1' (default: all visible)")
FLAGS = flags.FLAGS


@cli_guard
def main(_):
    """Load the config and run the stage-2 training loop."""
    cfg = load_config(FLAGS.cfg_path, STAGE2_REQUIRED)
    quiet_tensorflow()
    from modules.training import configure_devices, train_stage2
    configure_devices(FLAGS.gpu)
    train_stage2(cfg)


if __name__ == '__main__':
    app.run(main)
