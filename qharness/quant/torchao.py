"""torchao backend: real int8 / int4 / fp8 kernels through `torchao.quantization.quantize_`.

On CPU: int8 weight-only, int8 dynamic W8A8, int4 grouped weight-only (IntxWeightOnly), fp8 weight-only.
On CUDA: the same plus fp8 dynamic W8A8 (needs compute capability >= 8.9) and the tinygemm int4 kernel.
Numerics against `sim` (tests/quant/test_torchao.py): fp8 weight-only and int4 g128 agree to float rounding; int8
differs by one grid convention (torchao scales by amax/127.5, sim and bitsandbytes by amax/127), within 1%.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qharness.errors import BackendUnavailable
from qharness.quant.backend import BACKENDS, Backend, QuantContext
from qharness.quant.schemes import Keep, QuantScheme

FP8_DYNAMIC = ("fp8-e4m3-w8a8-tensor", "fp8-e4m3-w8a8-token")
SCHEMES_HERE = ("int8-weight-channel", "int8-w8a8-token", "int4-weight-g128", "fp8-e4m3-weight", *FP8_DYNAMIC)


def torchao_config(scheme: QuantScheme, device: torch.device) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        PerTensor,
    )

    if scheme.name == "int8-weight-channel":
        return Int8WeightOnlyConfig()
    if scheme.name == "int8-w8a8-token":
        return Int8DynamicActivationInt8WeightConfig()
    if scheme.name == "int4-weight-g128":
        return _int4_config(scheme.weights.granularity.size, device)
    if scheme.name == "fp8-e4m3-weight":
        return Float8WeightOnlyConfig()
    granularity = PerRow() if scheme.name == "fp8-e4m3-w8a8-token" else PerTensor()
    return Float8DynamicActivationFloat8WeightConfig(granularity=granularity)


def _int4_config(group_size: int, device: torch.device) -> Any:
    from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quant_primitives import MappingType

    if device.type == "cuda":  # the tinygemm kernel; its zero point lives in the float domain
        return Int4WeightOnlyConfig(group_size=group_size)
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size),
                                mapping_type=MappingType.ASYMMETRIC)


def check_fp8_device(scheme: QuantScheme, device: torch.device) -> None:
    if scheme.name in FP8_DYNAMIC:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < (8, 9):
            where = f"compute capability {capability[0]}.{capability[1]}" if capability else device.type
            raise BackendUnavailable(f"torchao's fp8 dynamic W8A8 ('{scheme.name}') needs a CUDA GPU of compute "
                                     f"capability >= 8.9, not {where}; use --backend sim (same math, any device)")


def apply_torchao(model: nn.Module, scheme: QuantScheme, targets: dict[str, nn.Linear], keep: Keep,
                  context: QuantContext) -> None:
    from torchao.quantization import quantize_ as torchao_quantize_

    if scheme.name == "int4-weight-g128":
        size = scheme.weights.granularity.size
        ragged = [name for name, linear in targets.items() if linear.in_features % size]
        if ragged:
            raise BackendUnavailable(f"torchao int4 needs input widths divisible by {size}; {ragged[0]} has "
                                     f"{targets[ragged[0]].in_features}; use --backend sim (ragged groups)")
    names = set(targets)
    torchao_quantize_(model, torchao_config(scheme, context.device), filter_fn=lambda module, fqn: fqn in names)


BACKENDS.add("torchao", Backend(
    name="torchao",
    description="torchao kernels: int8 weight-only / dynamic W8A8, int4 g128, fp8 (fp8 W8A8 on CUDA >= 8.9)",
    apply=apply_torchao,
    requires=("torchao",),
    schemes=SCHEMES_HERE,
    scheme_check=check_fp8_device,
))
