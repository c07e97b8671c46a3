"""The match decision: the Hamming-distance threshold (given, or read from the model's last
evaluation in logs/) and the accept rule shared by gallery.py and the service."""
import json
import os

from modules.config import log_dir
from modules.utils import UserError

RESULTS_NAME = 'iom_Hamming_results.json'


def decision_threshold(cfg, threshold=None, far=None):
    """(threshold, where it came from): accept a probe when its Hamming distance is <= threshold.

    An explicit `threshold` wins; else the EER threshold (or, with `far`, the largest threshold
    whose false-accept rate was <= far) of the latest test_twostage_iom.py results of the model,
    on LFW when it was evaluated, else on the first set in the file.
    """
    if threshold is not None:
        if threshold < 0:
            raise UserError(f'--threshold must not be negative, got {threshold}')
        return float(threshold), 'given with --threshold'
    path = os.path.join(log_dir(cfg), RESULTS_NAME)
    if not os.path.isfile(path):
        raise UserError(f'{path} not found: run test_twostage_iom.py --cfg_path <cfg> --measure '
                        'Hamming first, or pass --threshold')
    try:
        with open(path, encoding='utf-8') as fh:
            results = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f'{path}: not a results JSON ({err})') from None
    sets = sorted(name for name, r in results.items() if isinstance(r, dict) and 'eer' in r)
    if not sets:
        raise UserError(f'{path}: holds no verification results')
    name = 'lfw' if 'lfw' in sets else sets[0]
    res = results[name]
    if 'eer_threshold' not in res or 'roc_far' not in res:
        raise UserError(f'{path}: written by an older test_twostage_iom.py without the EER '
                        'threshold; run it again or pass --threshold')
    if far is None:
        return float(res['eer_threshold']), (f"EER threshold on {name} (EER {res['eer']:.4f}), "
                                             f'{path}')
    from modules.evaluations import threshold_at_far
    if not 0 < far < 1:
        raise UserError(f'--far must lie in (0, 1), got {far}')
    try:
        threshold, measured = threshold_at_far(res['roc_far'], res['roc_thresholds'], far)
    except UserError as err:
        raise UserError(f'{path}: on {name}, {err}; pass --threshold') from None
    return threshold, f'FAR <= {far:g} on {name} (measured FAR {measured:.2e}), {path}'


def accepts(distance, threshold):
    """The decision: a probe matches when its Hamming distance is <= the threshold."""
    return distance <= threshold
