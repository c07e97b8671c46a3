"""Stage 2: learn Deep IoM hashing on top of the frozen stage-1 embedding model."""
from absl import app, flags

from modules import script_flags
from modules.config import STAGE2_REQUIRED, load_config
from modules.utils import cli_guard, quiet_tensorflow

script_flags.define(2, 'stage-2 config file path', gpu=True)
flags.adopt_module_key_flags(script_flags)  # listed by --help as the script's own
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
