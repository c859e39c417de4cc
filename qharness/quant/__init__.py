"""Quantization: what a scheme is (`schemes.py`, a table), the reference arithmetic (`sim.py`), who else computes it
(`backends/`, one file a library), where in a model it goes (`apply.py`), plus KV-cache settings (`kv.py`), post-hoc
transforms (`transforms/`), calibration and the weights' footprint.

What callers use is importable from here, each name loaded on first use (so `qharness list quants` pays for no
torch):

    from qharness.quant import get_scheme, quantize_, select_backend
"""

from __future__ import annotations

import importlib
from typing import Any

_FACE = {
    # schemes: what is quantized, to which format, at which granularity
    "SCHEMES": "schemes", "QuantScheme": "schemes", "TensorQuant": "schemes", "Keep": "schemes",
    "get_scheme": "schemes",
    # where it goes and who computes it
    "quantize_": "apply", "apply_backend_": "apply", "target_linears": "apply", "convert_conv1d_": "apply",
    "fake_quantize": "sim",
    "Backend": "backends", "load_backends": "backends", "select_backend": "backends", "backend_note": "backends",
    "backends_for": "backends", "QuantContext": "types", "Capability": "types",
    # around a scheme: the KV cache, transforms, calibration, the weights kept aside, the footprint
    "KVSetting": "kv", "get_kv": "kv", "split_quants": "kv", "check_kv_model": "kv", "kv_quantized": "kv",
    "TransformSpec": "transforms", "check_transform": "transforms", "parse_transform": "transforms",
    "transform_": "transforms",
    "CALIBRATION_LENGTH": "calibrate", "calibration_batches": "calibrate", "calibration_text": "calibrate",
    "FpWeights": "fp_weights", "weight_bytes": "footprint",
}


def __getattr__(name: str) -> Any:
    if name in _FACE:
        return getattr(importlib.import_module(f"{__name__}.{_FACE[name]}"), name)
    raise AttributeError(f"module 'qharness.quant' has no attribute '{name}'")


__all__ = list(_FACE)
