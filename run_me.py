"""Hash two photos of one person and one of another with the IoM model; print code distances."""
import os

from absl import app, flags

from modules import script_flags
from modules.align import ALIGN_MODES
from modules.config import STAGE2_REQUIRED, load_config
from modules.utils import cli_guard, quiet_tensorflow

script_flags.define(2, 'stage-2 config file path', gpu=True)
flags.adopt_module_key_flags(script_flags)  # listed by --help as the script's own
flags.DEFINE_string('sample_dir', os.path.join('data', 'samples'),
                    'folder with personA_1.jpg, personA_2.jpg and personB_1.jpg: aligned 112x112 '
                    'crops or photographs (see --align)')
flags.DEFINE_enum('align', 'auto', ALIGN_MODES,
                  'detect and align faces: auto = only photos that are not already input_size '
                  'square, always = every photo, never = resize as they are')
FLAGS = flags.FLAGS
SAMPLES = ('personA_1.jpg', 'personA_2.jpg', 'personB_1.jpg')


@cli_guard
def main(_):
    """Build and load the IoM model, print its summary, the codes and the two distances."""
    cfg = load_config(FLAGS.cfg_path, STAGE2_REQUIRED)
    quiet_tensorflow()
    import numpy as np

    from modules.align import load_face
    from modules.models import load_iom_model
    from modules.training import configure_devices
    configure_devices(FLAGS.gpu)
    images = np.stack([load_face(os.path.join(FLAGS.sample_dir, name), cfg['input_size'],
                                 FLAGS.align) for name in SAMPLES]).astype(np.float32) / 255.0
    model = load_iom_model(cfg)
    model.summary()
    codes = model(images, training=False).numpy()
    for name, code in zip(SAMPLES, codes):
        shown = ' '.join(map(str, code[:32])) + (' ...' if len(code) > 32 else '')
        print(f'{name}: [{shown}]')
    dist_positive = float(np.sum(codes[0] != codes[1]))
    dist_negative = float(np.sum(codes[0] != codes[2]))
    print(f'dist_positive: {dist_positive}, dist_negative: {dist_negative}')


if __name__ == '__main__':
    app.run(main)
