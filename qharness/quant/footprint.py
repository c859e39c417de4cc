"""Storage a scheme needs for the weights it quantizes: the codes plus their scales and zero points.

Computed from the layer shapes, not measured from tensors: `sim` stores dequantized floats and each library packs
differently, so the honest comparable number is what the format needs (what a packed checkpoint would hold).
"""

from __future__ import annotations

import math

from torch import nn

from qharness.quant.schemes import BITS, PerBlock, PerChannel, PerGroup, PerTensor, QuantScheme

SCALE_BYTES = 4  # one fp32 scale per group
ZERO_POINT_BYTES = 1  # one integer zero point per group (asymmetric formats)
BLOCK_SCALE_BYTES = 1  # microscaling: one E8M0 or E4M3 scale per block (NVFP4 adds one fp32 scale per tensor)


def scales_per_weight(shape: tuple[int, int], scheme: QuantScheme) -> int:
    out_features, in_features = shape
    granularity = scheme.weights.granularity
    if isinstance(granularity, PerTensor):
        return 1
    if isinstance(granularity, PerChannel):
        return out_features
    if isinstance(granularity, PerGroup | PerBlock):
        return out_features * math.ceil(in_features / granularity.size)
    raise TypeError(f"weights cannot use granularity {granularity}")


def weight_bytes(linears: dict[str, nn.Linear], scheme: QuantScheme | None) -> int:
    """Bytes of the weights (bias excluded) of `linears` stored as `scheme` says (None: as they are)."""
    total = 0
    for linear in linears.values():
        weight = linear.weight
        if scheme is None or scheme.weights is None:
            total += weight.numel() * weight.element_size()
            continue
        total += math.ceil(weight.numel() * BITS[scheme.weights.format] / 8) + _scale_bytes(tuple(weight.shape), scheme)
    return total


def _scale_bytes(shape: tuple[int, int], scheme: QuantScheme) -> int:
    groups = scales_per_weight(shape, scheme)
    granularity = scheme.weights.granularity
    if isinstance(granularity, PerBlock):
        return groups * BLOCK_SCALE_BYTES + (SCALE_BYTES if granularity.scale == "e4m3" else 0)
    return groups * (SCALE_BYTES + (0 if scheme.weights.symmetric else ZERO_POINT_BYTES))
