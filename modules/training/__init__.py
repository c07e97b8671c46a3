"""Training: the run machinery both stages share (`run`) and one training loop per stage
(`stage1`: ArcFace, `stage2`: Deep IoM hashing). The scripts and tests use the names below."""
from modules.training.run import NonFiniteLoss, configure_devices, get_strategy, make_optimizer
from modules.training.stage1 import train_stage1
from modules.training.stage2 import Stage2Model, train_stage2

__all__ = ['NonFiniteLoss', 'Stage2Model', 'configure_devices', 'get_strategy', 'make_optimizer',
           'train_stage1', 'train_stage2']
