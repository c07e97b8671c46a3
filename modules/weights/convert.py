"""Converting any supported source into a weight-dict .npy, and describing the result."""
import os
import re
import time

from modules.weights.mxnet import mxnet_to_npy
from modules.weights.npy import write_weight_dict
from modules.weights.onnx import onnx_to_npy
from modules.weights.torch_pth import TORCH_INPUT_NORM, pth_to_npy

# The input normalisation (mean, std) each source format assumes when its graph has none.
DEFAULT_NORM = {'onnx': (127.5, 127.5), 'pth': TORCH_INPUT_NORM, 'mxnet': (127.5, 128.0)}


def source_format(source):
    """'onnx', 'pth' or 'mxnet' (a checkpoint prefix or one of its files), from the name."""
    lower = source.lower()
    if lower.endswith('.onnx'):
        return 'onnx'
    if lower.endswith(('.pth', '.pt')):
        return 'pth'
    return 'mxnet'


def convert_checkpoint(source, output, epoch=0, backbone=None, assume_norm=None):
    """Convert an ONNX file, a .pth state dict or an MXNet checkpoint into a weight-dict .npy."""
    start, cpu_start = time.perf_counter(), time.process_time()
    kind = source_format(source)
    if kind == 'onnx':
        weights, summary = onnx_to_npy(source, backbone, assume_norm)
    elif kind == 'pth':
        weights, summary = pth_to_npy(source, backbone, assume_norm)
    else:
        prefix = source
        named_epoch = re.search(r'-(\d{4})\.params$', prefix)
        if named_epoch:  # a .params file was given: its name says the epoch
            epoch = int(named_epoch.group(1))
        prefix = re.sub(r'(-\d{4}\.params|-symbol\.json)$', '', prefix)
        weights, summary = mxnet_to_npy(prefix, epoch, backbone, assume_norm)
    write_weight_dict(weights, output)
    summary['output'] = output
    summary['bytes'] = os.path.getsize(output)
    summary['total_seconds'] = time.perf_counter() - start
    summary['cpu_seconds'] = time.process_time() - cpu_start  # stable when the machine is busy
    return summary


def format_summary(summary):
    """Human-readable lines describing a conversion."""
    lines = [f"source:      {summary['source']}",
             f"backbone:    {summary['backbone']} (units per stage {list(summary['units'])})",
             f"layers:      {summary['layers']} weighted layers mapped"
             + (f", {summary['folded_bn']} conv biases folded into the following BN"
                if summary['folded_bn'] else ''),
             f"input norm:  {summary['input_norm']}; conv0 kernel scaled by "
             f"{summary['conv0_scale']:.8g} to fit our (x - 127.5) / 128"]
    if summary['ignored']:
        lines.append('ignored:     ' + ', '.join(summary['ignored']) + ' (not in the backbone)')
    if 'output' in summary:
        lines.append(f"output:      {summary['output']} ({summary['bytes'] / 2**20:.1f} MiB)")
        lines.append(f"time:        {summary['total_seconds']:.2f} s (reading and mapping "
                     f"{summary['seconds']:.2f} s; CPU {summary['cpu_seconds']:.2f} s)")
    return '\n'.join(lines)
