"""Pure-torch fake quantization: quantize, then dequantize, in the model's own dtype. The reference arithmetic.

Why by hand: the library backends (torchao, bitsandbytes, quanto) each cover part of the schemes, some only on
CUDA, and none exposes per-tensor *and* per-token *and* grouped scales with the same rounding on every device.
This file is the exact definition every backend is checked against.

Integer formats, symmetric:  s = amax / qmax,  q = clamp(round(x / s), qmin, qmax),  x' = q * s
Integer formats, asymmetric: s = (max - min) / (qmax - qmin),  z = qmin - round(min / s),
                             q = clamp(round(x / s) + z, qmin, qmax),  x' = (q - z) * s
FP8 (E4M3 max 448, E5M2 max 57344): s = amax / fmax,  x' = fp8(x / s) * s  (round to nearest even by torch)
A zero amax gives s = 1 (the group is exactly zero). NaN and inf propagate: they are reported, never clipped.
A fake-quantized product equals the integer GEMM it stands for, s_x s_w sum(q_x q_w), up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qharness.quant.schemes import PerChannel, PerGroup, PerTensor, PerToken, QuantScheme, TensorQuant

INT_RANGE = {"int8": (-128, 127), "int4": (-8, 7)}
FP8_DTYPE = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _upcast(x: Tensor) -> Tensor:
    """Scales and rounding in at least fp32: bf16 cannot even represent every int8 code times a scale."""
    return x if x.dtype == torch.float64 else x.float()


def _reduce_dims(x: Tensor, tq: TensorQuant) -> tuple[int, ...] | None:
    """Dims over which one scale is shared; None for the whole tensor."""
    if isinstance(tq.granularity, PerTensor):
        return None
    if isinstance(tq.granularity, PerChannel | PerToken):
        return (-1,)  # a weight row is an output channel; an activation row is a token
    raise TypeError(f"granularity {tq.granularity} is handled by grouping, not reduction")


def _amax(x: Tensor, dims: tuple[int, ...] | None) -> Tensor:
    return x.abs().amax() if dims is None else x.abs().amax(dim=dims, keepdim=True)


def _safe_scale(scale: Tensor) -> Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _quantize_int(x: Tensor, tq: TensorQuant, dims: tuple[int, ...] | None) -> Tensor:
    qmin, qmax = INT_RANGE[tq.format]
    xf = _upcast(x)
    if tq.symmetric:
        scale = _safe_scale(_amax(xf, dims) / qmax)
        return (torch.clamp(torch.round(xf / scale), qmin, qmax) * scale).to(x.dtype)
    lo = xf.amin() if dims is None else xf.amin(dim=dims, keepdim=True)
    hi = xf.amax() if dims is None else xf.amax(dim=dims, keepdim=True)
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)  # zero must be exact (padding, ReLU zeros)
    scale = _safe_scale((hi - lo) / (qmax - qmin))
    zero = qmin - torch.round(lo / scale)
    q = torch.clamp(torch.round(xf / scale) + zero, qmin, qmax)
    return ((q - zero) * scale).to(x.dtype)


def _quantize_fp8(x: Tensor, tq: TensorQuant, dims: tuple[int, ...] | None) -> Tensor:
    dtype = FP8_DTYPE[tq.format]
    xf = _upcast(x)
    scale = _safe_scale(_amax(xf, dims) / torch.finfo(dtype).max)
    return ((xf / scale).to(dtype).to(xf.dtype) * scale).to(x.dtype)


def _quantize_grouped(x: Tensor, tq: TensorQuant) -> Tensor:
    """Split the last dim into groups (the ragged remainder is its own group) and quantize each per row."""
    size = tq.granularity.size
    per_row = TensorQuant(tq.format, PerChannel(), tq.symmetric, tq.dynamic)
    full = x.shape[-1] // size * size
    parts = []
    if full:
        grouped = x[..., :full].reshape(*x.shape[:-1], full // size, size)
        parts.append(fake_quantize(grouped, per_row).reshape(*x.shape[:-1], full))
    if full < x.shape[-1]:
        parts.append(fake_quantize(x[..., full:], per_row))
    return torch.cat(parts, dim=-1)


def fake_quantize(x: Tensor, tq: TensorQuant) -> Tensor:
    """Quantize and dequantize `x` as `tq` says; same shape and dtype as `x`."""
    if isinstance(tq.granularity, PerGroup):
        return _quantize_grouped(x, tq)
    dims = _reduce_dims(x, tq)
    if tq.format in INT_RANGE:
        return _quantize_int(x, tq, dims)
    return _quantize_fp8(x, tq, dims)


class SimQuantLinear(nn.Module):
    """A Linear whose weight is stored fake-quantized and whose input is fake-quantized at every call."""

    def __init__(self, linear: nn.Linear, scheme: QuantScheme) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme_name = scheme.name
        self.activations = scheme.activations
        weight = linear.weight.detach()
        if scheme.weights is not None:
            weight = fake_quantize(weight, scheme.weights)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.activations is not None:
            x = fake_quantize(x, self.activations)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme_name}"
