"""Pre-built InsightFace weights: the .npy weight dict and the converters that produce it.

One file per format: `npy` (the weight dict: safe reading, writing, loading into Keras), `mxnet`
(.params + -symbol.json), `onnx` (iresnet ONNX graphs), `torch_pth` (arcface_torch .pth state
dicts, read without PyTorch). `canonical` holds the layer plan and the channel-first -> Keras
mapping the converters share; `convert` picks the converter for a file; `verify` runs a converted
model beside its ONNX source.
"""
from modules.weights.canonical import (
    BN_EPS,
    FILTERS,
    FORMAT_TAG,
    META_KEY,
    backbone_for_units,
    canonical_to_npy,
    layer_plan,
    supported_units,
)
from modules.weights.convert import convert_checkpoint, format_summary
from modules.weights.mxnet import (
    MX_DTYPES,
    ND_LIST_MAGIC,
    ND_V1_MAGIC,
    ND_V2_MAGIC,
    ND_V3_MAGIC,
    mxnet_to_npy,
    read_mxnet_params,
)
from modules.weights.npy import (
    apply_identity_output_layer,
    load_npy_weights,
    read_weight_dict,
    save_npy_weights,
    write_weight_dict,
)
from modules.weights.onnx import onnx_to_npy
from modules.weights.torch_pth import pth_to_npy, read_state_dict

__all__ = [
    'BN_EPS', 'FILTERS', 'FORMAT_TAG', 'META_KEY', 'MX_DTYPES', 'ND_LIST_MAGIC', 'ND_V1_MAGIC',
    'ND_V2_MAGIC', 'ND_V3_MAGIC', 'apply_identity_output_layer', 'backbone_for_units',
    'canonical_to_npy', 'convert_checkpoint', 'format_summary', 'layer_plan', 'load_npy_weights',
    'mxnet_to_npy', 'onnx_to_npy', 'pth_to_npy', 'read_mxnet_params', 'read_state_dict',
    'read_weight_dict', 'save_npy_weights', 'supported_units', 'write_weight_dict',
]
