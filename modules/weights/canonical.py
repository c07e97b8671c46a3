"""The canonical LResNet-IR description every converter fills, and its mapping to the weight dict.

Source-independent: our layer names -> parameters in the source's channel-first layout.
  conv:  {'kernel': (O, I, kh, kw), 'bias': (O,) or None}
  bn:    {'gamma': (C,) or None (fixed at 1), 'beta', 'mean', 'var', 'eps'}
  prelu: {'slope': (C,)}
  fc:    {'weight': (out, in) with in in (C, H, W) order, 'bias': (out,)}
"""
import math

import numpy as np

from modules.config import INSIGHT_BN_EPS as BN_EPS
from modules.config import INSIGHT_FILTERS as FILTERS
from modules.config import INSIGHT_UNITS
from modules.utils import UserError

FORMAT_TAG = 'iomface-insight-weights'
META_KEY = '__meta__'


def layer_plan(units):
    """Our layer names in order, as (name, kind, conv-specs) for a backbone with `units`."""
    plan = [('conv0', 'conv', (3, 1, 64)), ('bn0', 'bn', None), ('relu0', 'prelu', None)]
    for stage, (count, filters) in enumerate(zip(units, FILTERS), start=1):
        for unit in range(1, count + 1):
            p = f'stage{stage}_unit{unit}'
            stride = 2 if unit == 1 else 1
            plan += [(p + '_bn1', 'bn', None), (p + '_conv1', 'conv', (3, 1, filters)),
                     (p + '_bn2', 'bn', None), (p + '_relu1', 'prelu', None),
                     (p + '_conv2', 'conv', (3, stride, filters)), (p + '_bn3', 'bn', None)]
            if unit == 1:
                plan += [(p + '_conv1sc', 'conv', (1, 2, filters)), (p + '_sc', 'bn', None)]
    plan += [('bn1', 'bn', None), ('pre_fc1', 'fc', None), ('fc1', 'bn', None)]
    return plan


def bn_after(conv_name):
    """The BatchNormalization that follows a conv in our graph (where a folded bias goes)."""
    if conv_name == 'conv0':
        return 'bn0'
    if conv_name.endswith('_conv1sc'):
        return conv_name[:-len('_conv1sc')] + '_sc'
    if conv_name.endswith('_conv1'):
        return conv_name[:-len('_conv1')] + '_bn2'
    return conv_name[:-len('_conv2')] + '_bn3'


def supported_units():
    """Backbone name -> unit counts per stage, as modules/backbones.py defines them."""
    return dict(INSIGHT_UNITS)


def backbone_for_units(units, requested=None, where=''):
    """Name of the Insight backbone with these unit counts; UserError if none (or not `requested`)."""
    table = supported_units()
    if requested is not None:
        if requested not in table:
            raise UserError(f'unknown backbone {requested!r}; choose from {sorted(table)}')
        if tuple(table[requested]) != tuple(units):
            raise UserError(f'{where}the network has {list(units)} units per stage, but '
                            f'{requested} has {list(table[requested])}')
        return requested
    for name, counts in table.items():
        if tuple(counts) == tuple(units):
            return name
    raise UserError(f'{where}unsupported depth: {list(units)} units per stage (supported: '
                    + ', '.join(f'{n} {list(c)}' for n, c in table.items()) + ')')


def canonical_to_npy(canon, units, input_scale=1.0):
    """Convert canonical (channel-first) parameters into the Keras-layout weight dict.

    `input_scale` multiplies conv0's kernel: the source expects (x - 127.5) * 128 * input_scale /
    128, our input_norm layer gives (x - 127.5) / 128, and conv0 is linear without bias.
    """
    out = {}
    canon = dict(canon)
    for name, kind, _ in layer_plan(units):
        if kind != 'conv':
            continue
        bias = canon[name].get('bias')
        if bias is None:
            continue
        bn_name = bn_after(name)
        bn = canon.get(bn_name)
        if bn is None:  # folded away by the exporter: an identity BN carries the conv bias
            canon[bn_name] = {'gamma': None, 'beta': np.asarray(bias, np.float64),
                              'mean': np.zeros_like(bias, np.float64),
                              'var': np.full(bias.shape, 1.0 - BN_EPS), 'eps': BN_EPS}
        else:  # BN(z + b) normalises z with mean - b
            canon[bn_name] = dict(bn, mean=np.asarray(bn['mean'], np.float64) - bias)
    kernel, fc_bias = _fc_kernel(canon)
    for name, kind, _ in layer_plan(units):
        item = canon[name]
        if kind == 'conv':
            k = np.asarray(item['kernel'], np.float64).transpose(2, 3, 1, 0)
            if name == 'conv0':
                k = k * input_scale
            out[name] = [k.astype(np.float32)]
        elif kind == 'prelu':
            out[name] = [np.asarray(item['slope'], np.float32).reshape(-1)]
        elif kind == 'fc':
            out[name] = [kernel.astype(np.float32), fc_bias.astype(np.float32)]
        else:
            # Keras divides by sqrt(var + 2e-5): shift var so the source's eps is reproduced.
            var = np.asarray(item['var'], np.float64) + item['eps'] - BN_EPS
            arrays = [item['beta'], item['mean'], var]
            if name != 'fc1':
                gamma = item['gamma']
                arrays.insert(0, np.ones_like(var) if gamma is None else gamma)
            out[name] = [np.asarray(a, np.float32) for a in arrays]
    return out



def _fc_kernel(canon):
    """pre_fc1's Keras kernel and bias; an fc1 BatchNorm with a scale is folded into them (and
    fc1 in `canon` made neutral), since our fc1 has no scale."""
    fc = canon['pre_fc1']
    fc_bn = canon['fc1']
    weight = np.asarray(fc['weight'], np.float64)
    fc_bias = np.asarray(fc['bias'], np.float64)
    channels = FILTERS[-1]
    spatial = weight.shape[1] // channels
    side = math.isqrt(spatial)
    if side * side * channels != weight.shape[1]:
        raise UserError(f'pre_fc1: {weight.shape[1]} inputs is not {channels} channels on a '
                        'square feature map')
    # Channel-first flatten (C, H, W) -> Keras flatten of NHWC (H, W, C).
    kernel = weight.reshape(-1, channels, side, side).transpose(2, 3, 1, 0).reshape(
        -1, weight.shape[0])
    gamma = fc_bn.get('gamma')
    if gamma is not None and not np.all(np.asarray(gamma) == 1):
        factor = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(fc_bn['var'], np.float64)
                                                         + fc_bn['eps'])
        kernel = kernel * factor
        fc_bias = (fc_bias - fc_bn['mean']) * factor + fc_bn['beta']
        n = fc_bias.shape[0]
        canon['fc1'] = {'gamma': None, 'beta': np.zeros(n), 'mean': np.zeros(n),
                        'var': np.full(n, 1.0 - BN_EPS), 'eps': BN_EPS}
    return kernel, fc_bias


def norm_scale(a, b, described, where):
    """Scale for conv0 so that our (x - 127.5) / 128 input gives the source's a * x + b."""
    if a == 0 or abs(-b / a - 127.5) > 1e-3:
        raise UserError(f'{where}input normalisation {described} is not (x - 127.5) * s: only a '
                        '127.5 offset can be folded into conv0 exactly')
    return a * 128.0


def affine_text(a, b):
    """The affine map a * x + b written as (x - mean) / std."""
    return f'(x - {-b / a:g}) / {1 / a:g}'



def layer_channels(units):
    """{layer name: (input channels, output channels)} for the LResNet-IR with `units`."""
    chans = {'conv0': (3, FILTERS[0]), 'bn0': (FILTERS[0],) * 2, 'relu0': (FILTERS[0],) * 2}
    cur = FILTERS[0]
    for stage, (count, filters) in enumerate(zip(units, FILTERS), start=1):
        for unit in range(1, count + 1):
            p = f'stage{stage}_unit{unit}'
            chans[p + '_bn1'] = (cur, cur)
            chans[p + '_conv1'] = chans[p + '_conv1sc'] = (cur, filters)
            for suffix in ('_bn2', '_relu1', '_conv2', '_bn3', '_sc'):
                chans[p + suffix] = (filters, filters)
            cur = filters
    chans['bn1'] = (cur, cur)
    chans['pre_fc1'] = (None, 512)
    chans['fc1'] = (512, 512)
    return chans


def check_canonical(canon, units, where, sources=None):
    """Shape and finiteness checks of canonical parameters against the LResNet-IR with `units`.

    `sources` maps our layer names to the source's node or tensor names, quoted in messages.
    """
    chans = layer_channels(units)
    for name, kind, spec in layer_plan(units):
        item = canon.get(name)
        if item is None:
            continue  # a BN folded into its conv
        label = f"{where}layer '{name}'"
        if sources and name in sources:
            label += f" (source '{sources[name]}')"
        for key, value in item.items():
            if isinstance(value, np.ndarray) and not np.all(np.isfinite(value)):
                raise UserError(f'{label}: {key} holds {np.count_nonzero(~np.isfinite(value))} '
                                'NaN or infinite value(s): a damaged or diverged model, not '
                                'converted')
        in_ch, out_ch = chans[name]
        if kind == 'conv':
            want = (out_ch, in_ch, spec[0], spec[0])
            if tuple(item['kernel'].shape) != want:
                raise UserError(f"{label}: kernel shape {item['kernel'].shape}, "
                                f'expected {want} (O, I, kh, kw)')
            if item.get('bias') is not None and item['bias'].shape != (out_ch,):
                raise UserError(f"{label}: bias shape {item['bias'].shape}, "
                                f'expected ({out_ch},)')
        elif kind == 'bn':
            for key in ('gamma', 'beta', 'mean', 'var'):
                value = item.get(key)
                if value is not None and value.shape != (out_ch,):
                    raise UserError(f"{label}: {key} shape {value.shape}, "
                                    f'expected ({out_ch},)')
        elif kind == 'prelu':
            slope = np.asarray(item['slope']).reshape(-1)
            if slope.size == 1:
                slope = np.full(out_ch, slope[0])
            if slope.shape != (out_ch,):
                raise UserError(f"{label}: {slope.size} PReLU slopes, expected "
                                f'{out_ch}')
            item['slope'] = slope
        else:
            if item['weight'].ndim != 2 or item['weight'].shape[0] != out_ch:
                raise UserError(f"{label}: weight shape {item['weight'].shape}, "
                                f'expected ({out_ch}, {FILTERS[-1]} * H * W)')
            if item['bias'].shape != (out_ch,):
                raise UserError(f"{label}: bias shape {item['bias'].shape}, "
                                f'expected ({out_ch},)')


def weight_meta(source, backbone, norm_text):
    """The __meta__ entry of a converted weight dict."""
    return {'format': FORMAT_TAG, 'version': 1, 'source': source, 'backbone': backbone,
            'input_norm': norm_text}
