"""Pure-torch fake quantization: quantize, then dequantize, in the model's own dtype. The reference arithmetic.

Why by hand: the library backends (torchao, bitsandbytes, quanto) each cover part of the schemes, some only on
CUDA, and none exposes per-tensor *and* per-token *and* grouped scales with the same rounding on every device.
This file is the exact definition every backend is checked against.

Integer formats, symmetric:  s = amax / qmax,  q = clamp(round(x / s), qmin, qmax),  x' = q * s
    (int_scale "half-span", torchao's: s = amax / ((qmax - qmin) / 2), q = clamp(round(x * (1 / s)), qmin, qmax);
    the reciprocal is part of it: -amax * (1 / s) lands a float step either side of -127.5, so it rounds to -128
    or -127 row by row, as torchao's codes do)
Integer formats, asymmetric: s = (max - min) / (qmax - qmin),  z = qmin - round(min / s),
                             q = clamp(round(x / s) + z, qmin, qmax),  x' = (q - z) * s
Integer, float zero point (tinygemm, unsigned codes 0..2^b-1, mid = 2^(b-1)), in x's own dtype:
                             s = max((max - min) / (2^b - 1), smallest normal),  z = min + mid s,
                             q = clamp(round((x - (z - mid s)) / s), 0, 2^b - 1),  x' = (q - mid) s + z
FP8 (E4M3 max 448, E5M2 max 57344): s = amax / fmax,  x' = fp8(clamp(x / s, +-fmax)) * s  (round to nearest
    even by torch). Unscaled FP8 is the plain cast: E4M3 saturates at 448 (inf too), E5M2 overflows to inf.
NF4 (QLoRA): s = absmax of the block, x' = s * (the NF4 code nearest to x / s).
Microscaling, one scale per block of `size` input channels (OCP MX v1.0 section 6.3; NVIDIA NVFP4):
    E8M0 (MXFP8, MXFP4): s = 2^clamp(floor(log2 amax_block) - emax_elem, -127, 127), emax_elem the element format's
        largest exponent (E4M3 8, E5M2 15, E2M1 2); an all-zero block gets 2^-127.
    E4M3 (NVFP4): s_t = amax_tensor / (448 * fmax_elem) in fp32, s = e4m3(clamp(amax_block / fmax_elem / s_t,
        2^-6, 448)) * s_t, as torchao's nvfp4_quantize: the clamp at E4M3's smallest normal keeps an all-zero
        block finite, and is where a tensor-wide outlier costs small blocks their precision.
    x' = elem(x / s) * s, elem rounding to nearest even and saturating at the element format's max (E2M1: 6).
    A NaN or inf in a block makes the whole block NaN (MX's NaN scale) rather than saturating it.
Static scales: amax comes from calibration instead of the tensor; values past it clamp to the grid's edge.
A zero amax gives s = 1 (the group is exactly zero). NaN and inf propagate: they are reported, never clipped.
A fake-quantized product equals the integer GEMM it stands for, s_x s_w sum(q_x q_w), up to float rounding.

Mixed precision (`SimQuantLinear`): chosen token positions (e.g. BOS), chosen input channels, and for LLM.int8()
every input column with some |x| above the outlier threshold stay in full precision; they are zeroed before the
scale is computed, so they neither lose precision nor stretch the scale of everything else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qharness.core.errors import QHarnessError
from qharness.quant.modules import swap_module
from qharness.quant.schemes import (
    Keep,
    PerBlock,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantScheme,
    TensorQuant,
)
from qharness.quant.types import QuantContext

INT_RANGE = {"int8": (-128, 127), "int4": (-8, 7)}
FP8_DTYPE = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# bitsandbytes' NF4 code (QLoRA appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# float element formats: (largest exponent emax, mantissa bits, smallest normal exponent, largest value)
FLOAT_ELEMENT = {"fp8_e4m3": (8, 3, -6, 448.0), "fp8_e5m2": (15, 2, -14, 57344.0), "fp4_e2m1": (2, 1, 0, 6.0)}
E8M0_EXPONENTS = (-127, 127)  # 0xFF is NaN
E4M3_MAX, E4M3_MIN_NORMAL = FLOAT_ELEMENT["fp8_e4m3"][3], 2.0**-6


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


def _quantize_int_float_zero(x: Tensor, tq: TensorQuant, dims: tuple[int, ...] | None) -> Tensor:
    """tinygemm's asymmetric integers, op for op as torchao's `_choose_qparams_affine_tinygemm`,
    `_quantize_affine_tinygemm` and `_dequantize_affine_tinygemm` compute them, and in the tensor's own dtype rather
    than fp32: the CUDA kernel stores s and z in bf16, and that rounding is part of what it computes (on a weight
    with one x40 input channel it moves the output 0.3 relative from the integer-zero-point scheme's, measured)."""
    qmin, qmax = INT_RANGE[tq.format]
    levels = qmax - qmin  # 15 for int4: codes 0..15
    mid = (levels + 1) / 2
    lo = x.amin() if dims is None else x.amin(dim=dims, keepdim=True)
    hi = x.amax() if dims is None else x.amax(dim=dims, keepdim=True)
    scale = torch.clamp((hi - lo) / float(levels), min=torch.finfo(x.dtype).smallest_normal)
    zero = lo + scale * mid
    q = torch.clamp(torch.round((x - (zero - scale * mid)) / scale), 0, levels)
    return (q - mid) * scale + zero


def _quantize_int(x: Tensor, tq: TensorQuant, dims: tuple[int, ...] | None, amax: Tensor | None) -> Tensor:
    if tq.zero_point == "float":
        return _quantize_int_float_zero(x, tq, dims)
    qmin, qmax = INT_RANGE[tq.format]
    xf = _upcast(x)
    if tq.symmetric:
        if tq.int_scale == "half-span":  # torchao's quantize_affine multiplies by the reciprocal: x * (1 / s)
            scale = _safe_scale((_amax(xf, dims) if amax is None else amax.to(xf.dtype)) / ((qmax - qmin) / 2))
            return (torch.clamp(torch.round(xf * (1.0 / scale)), qmin, qmax) * scale).to(x.dtype)
        scale = _safe_scale((_amax(xf, dims) if amax is None else amax.to(xf.dtype)) / qmax)
        return (torch.clamp(torch.round(xf / scale), qmin, qmax) * scale).to(x.dtype)
    lo = xf.amin() if dims is None else xf.amin(dim=dims, keepdim=True)
    hi = xf.amax() if dims is None else xf.amax(dim=dims, keepdim=True)
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)  # zero must be exact (padding, ReLU zeros)
    scale = _safe_scale((hi - lo) / (qmax - qmin))
    zero = qmin - torch.round(lo / scale)
    q = torch.clamp(torch.round(xf / scale) + zero, qmin, qmax)
    return ((q - zero) * scale).to(x.dtype)


def _quantize_fp8(x: Tensor, tq: TensorQuant, dims: tuple[int, ...] | None, amax: Tensor | None) -> Tensor:
    dtype = FP8_DTYPE[tq.format]
    xf = _upcast(x)
    if not tq.scaled:
        return xf.to(dtype).to(x.dtype)
    fmax = torch.finfo(dtype).max
    scale = _safe_scale((_amax(xf, dims) if amax is None else amax.to(xf.dtype)) / fmax)
    return (torch.clamp(xf / scale, -fmax, fmax).to(dtype).to(xf.dtype) * scale).to(x.dtype)


def _quantize_nf4(x: Tensor, dims: tuple[int, ...] | None) -> Tensor:
    xf = _upcast(x)
    scale = _safe_scale(_amax(xf, dims))
    code = torch.tensor(NF4_CODE, dtype=xf.dtype, device=x.device)
    nearest = (xf / scale).unsqueeze(-1).sub(code).abs().argmin(dim=-1)
    return (code[nearest] * scale).to(x.dtype)


def _quantize_grouped(x: Tensor, tq: TensorQuant) -> Tensor:
    """Split the last dim into groups (the ragged remainder is its own group) and quantize each per row."""
    size = tq.granularity.size
    per_row = dataclasses.replace(tq, granularity=PerChannel())
    full = x.shape[-1] // size * size
    parts = []
    if full:
        grouped = x[..., :full].reshape(*x.shape[:-1], full // size, size)
        parts.append(fake_quantize(grouped, per_row).reshape(*x.shape[:-1], full))
    if full < x.shape[-1]:
        parts.append(fake_quantize(x[..., full:], per_row))
    return torch.cat(parts, dim=-1)


def round_to_float(x: Tensor, fmt: str) -> Tensor:
    """`x` on the grid of float format `fmt`: nearest value, ties to even, saturating at +-max; NaN stays NaN."""
    _, mbits, emin, fmax = FLOAT_ELEMENT[fmt]
    x = torch.clamp(x, -fmax, fmax)
    if fmt in FP8_DTYPE:
        return x.to(FP8_DTYPE[fmt]).to(x.dtype)
    # no torch cast to FP4: round on the grid's local spacing, 2^(exponent - mantissa bits), subnormals below emin.
    # frexp gives the exponent exactly (log2 rounds just below a power of two up to it); dividing by a power of
    # two is exact, so torch.round's ties-to-even applies to the true value, and an even multiple of the spacing
    # is an even mantissa.
    _, exponent = torch.frexp(x)  # x = m 2^e with 0.5 <= |m| < 1, so floor(log2 |x|) = e - 1
    spacing = torch.exp2((exponent - 1).clamp(min=emin).to(x.dtype) - mbits)
    return torch.round(x / spacing) * spacing


def _e8m0_scale(amax: Tensor, x: Tensor, fmt: str) -> Tensor:
    """OCP MX: the power of two that puts amax in the element format's top binade."""
    _, exponent = torch.frexp(amax)
    shared = torch.where(amax > 0, exponent - 1 - FLOAT_ELEMENT[fmt][0], E8M0_EXPONENTS[0])
    return torch.exp2(shared.clamp(*E8M0_EXPONENTS).to(amax.dtype))


def _e4m3_scale(amax: Tensor, x: Tensor, fmt: str) -> Tensor:
    """NVFP4: E4M3 block scales relative to one fp32 scale that maps the tensor's amax onto 448 * fmax."""
    fmax = FLOAT_ELEMENT[fmt][3]
    tensor_scale = _safe_scale(x.abs().amax().float() / (E4M3_MAX * fmax)).to(amax.dtype)  # stored as fp32
    block = torch.clamp(amax / fmax / tensor_scale, E4M3_MIN_NORMAL, E4M3_MAX)
    return block.to(torch.float8_e4m3fn).to(amax.dtype) * tensor_scale


BLOCK_SCALES = {"e8m0": _e8m0_scale, "e4m3": _e4m3_scale}  # (block amax, whole tensor, element format) -> scale


def _quantize_block(x: Tensor, tq: TensorQuant) -> Tensor:
    """Microscaling along the last dim, every block at once: zero-pad to whole blocks (zeros change no amax)."""
    size, width = tq.granularity.size, x.shape[-1]
    xf = _upcast(x)
    blocks = F.pad(xf, (0, -width % size)).unflatten(-1, (-1, size))  # (..., n_blocks, size)
    amax = blocks.abs().amax(dim=-1, keepdim=True)  # NaN if the block has one
    scale = BLOCK_SCALES[tq.granularity.scale](amax, xf, tq.format)
    out = round_to_float(blocks / scale, tq.format) * scale
    out = torch.where(torch.isfinite(amax), out, torch.nan)  # never saturate an inf into a finite value
    return out.flatten(-2)[..., :width].to(x.dtype)


def fake_quantize(x: Tensor, tq: TensorQuant, amax: Tensor | None = None) -> Tensor:
    """Quantize and dequantize `x` as `tq` says; same shape and dtype as `x`. `amax`: a static (calibrated)
    per-tensor range to use instead of the tensor's own."""
    if isinstance(tq.granularity, PerBlock):
        return _quantize_block(x, tq)
    if isinstance(tq.granularity, PerGroup):
        return _quantize_grouped(x, tq)
    dims = _reduce_dims(x, tq)
    if tq.format in INT_RANGE:
        return _quantize_int(x, tq, dims, amax)
    if tq.format == "nf4":
        return _quantize_nf4(x, dims)
    return _quantize_fp8(x, tq, dims, amax)


class SimQuantLinear(nn.Module):
    """A Linear whose weight is stored fake-quantized and whose input is fake-quantized at every call. A weight that
    accelerate offloaded (`--device-map`: on `meta` here, loaded by the module's hook for each forward) is stored
    as it is and fake-quantized at each call instead, so the forward computes the same numbers.

    Static activation scales come from `observe` mode: while `observing` is set, inputs pass through unquantized
    and their range is recorded (max of the per-call max, or mean of the per-call percentile); `finish_observing`
    turns that into `act_amax`.
    """

    def __init__(self, linear: nn.Linear, scheme: QuantScheme, keep: Keep | None = None,
                 in_place: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme_name = scheme.name
        self.activations = scheme.activations
        self.outlier_threshold = scheme.outlier_threshold
        self.outlier_rule = scheme.outlier_rule
        self.keep_positions = keep.positions if keep else ()
        self.keep_channels = keep.channels if keep else ()
        weight = linear.weight.detach()
        # a weight accelerate offloaded (on `meta`, loaded by its hook for each forward) is quantized as it loads
        on_load = weight.device.type == "meta"
        self.weights_on_load = scheme.weights if on_load else None
        if scheme.weights is not None and not on_load:
            quantized = fake_quantize(weight, scheme.weights)
            # in place: into the Linear's own storage, so a run holds one model, not two
            weight = weight.copy_(quantized) if in_place else quantized
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.register_buffer("act_amax", None)
        self.observing = False
        self._observed: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        if self.activations is not None:
            x = self._quantize_input(x)
        weight = self.weight if self.weights_on_load is None else fake_quantize(self.weight, self.weights_on_load)
        return F.linear(x, weight, self.bias)

    def _masks(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Bool masks broadcastable to x, None where empty: (kept, out of scale). Kept entries stay in full
        precision; entries out of scale are zeroed before the scale is computed. They are the same mask except under
        bitsandbytes' outlier rule, where an outlier column is kept whole but only its outlier entries leave the
        rows' scales."""
        mask = None
        if self.keep_positions and x.dim() >= 2:
            positions = [p for p in self.keep_positions if p < x.shape[-2]]
            mask = torch.zeros(x.shape[-2], 1, dtype=torch.bool, device=x.device)
            mask[positions] = True
        if self.keep_channels:
            columns = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
            columns[[c for c in self.keep_channels if c < x.shape[-1]]] = True
            mask = columns if mask is None else mask | columns
        if self.outlier_threshold is None:
            return mask, mask
        # bitsandbytes counts the threshold itself as an outlier; the paper's rule (and sim's llm-int8) does not
        magnitude = x.abs()
        outliers = magnitude >= self.outlier_threshold if self.outlier_rule == "entries" else \
            magnitude > self.outlier_threshold
        columns = outliers.reshape(-1, x.shape[-1]).any(dim=0)  # (C,)
        kept = columns if mask is None else mask | columns
        if self.outlier_rule == "column":
            return kept, kept
        return kept, outliers if mask is None else outliers | mask

    def _quantize_input(self, x: Tensor) -> Tensor:
        kept, out_of_scale = self._masks(x)
        inner = x if out_of_scale is None else x.masked_fill(out_of_scale, 0)
        if self.observing:
            self._observed.append(self._range(inner))
            return x
        if not self.activations.dynamic and self.act_amax is None:
            raise QHarnessError(f"scheme '{self.scheme_name}' has static activation scales: calibrate it first "
                                "(qharness.quant.sim.calibrate_)")
        quantized = fake_quantize(inner, self.activations, amax=self.act_amax)
        return quantized if kept is None else torch.where(kept, x, quantized)

    def _range(self, x: Tensor) -> Tensor:
        magnitudes = _upcast(x.detach()).abs().flatten()
        if self.activations.observer == "minmax":
            return magnitudes.max()
        k = max(1, math.ceil(self.activations.percentile / 100 * magnitudes.numel()))
        return magnitudes.kthvalue(k).values

    def finish_observing(self) -> None:
        if not self._observed:
            raise QHarnessError(f"calibration never reached a '{self.scheme_name}' layer; is the data empty?")
        ranges = torch.stack(self._observed)
        self.act_amax = ranges.max() if self.activations.observer == "minmax" else ranges.mean()
        self.observing, self._observed = False, []

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme_name}"


def static_layers(model: nn.Module) -> list[SimQuantLinear]:
    return [m for m in model.modules()
            if isinstance(m, SimQuantLinear) and m.activations is not None and not m.activations.dynamic]


def calibrate_(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Run `batches` through the model while every static layer observes its input range, then freeze the ranges;
    returns how many layers were calibrated."""
    layers = static_layers(model)
    if not layers:
        return 0
    for layer in layers:
        layer.observing = True
    try:
        with torch.inference_mode():
            for input_ids in batches:
                model(input_ids=input_ids)
        for layer in layers:
            layer.finish_observing()
    finally:  # an interrupted calibration must not leave layers passing inputs through unquantized
        for layer in layers:
            layer.observing, layer._observed = False, []
    return len(layers)


def apply_sim(model: nn.Module, scheme: QuantScheme, targets: dict[str, nn.Linear], keep: Keep,
              context: QuantContext) -> None:
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    positions_only = Keep(positions=keep.positions)
    for name, linear in targets.items():  # hidden channels are only meaningful where the input is the hidden state
        layer_keep = keep if linear.in_features == hidden else positions_only
        swap_module(model, name, SimQuantLinear(linear, scheme, layer_keep, in_place=context.consume))
    if scheme.needs_calibration:
        calibrate_(model, context.calibration_batches(scheme.name))

