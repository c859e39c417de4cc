"""Quantization schemes: what is quantized (weights, activations), to which format, at which granularity.

A scheme is data (`QuantScheme`); the arithmetic lives in `sim.py` (the reference) and in library backends.
Add a scheme: one `QuantScheme` entry in `TABLE` (a table, not code: every scheme is the same few fields); `sim`
runs it at once, and a library backend runs it once its capability table (quant/backends/) lists it.
Names read `<format>-<what>-<activation granularity>`, e.g. `int8-w8a8-token`, with `-g<size>` when the weights are
grouped unlike their format's default. Microscaling formats (`mxfp8`, `mxfp4`, `nvfp4`) fix their own block size and
scale format, so their names stop at `<what>`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from qharness.core.errors import ConfigError
from qharness.core.registry import Registry

Format = Literal["int8", "int4", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4"]
FORMATS: tuple[str, ...] = ("int8", "int4", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4")
BITS = {"int8": 8, "int4": 4, "fp8_e4m3": 8, "fp8_e5m2": 8, "fp4_e2m1": 4, "nf4": 4}
BLOCK_ELEMENTS = ("fp8_e4m3", "fp8_e5m2", "fp4_e2m1")  # element formats a microscaling block can hold
BlockScale = Literal["e8m0", "e4m3"]
Observer = Literal["minmax", "percentile"]
ZeroPoint = Literal["int", "float"]
IntScale = Literal["qmax", "half-span"]
OutlierRule = Literal["column", "entries"]


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor: the granularity massive activations break."""

    kind: Literal["tensor"] = "tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (row) of a weight matrix."""

    kind: Literal["channel"] = "channel"


@dataclass(frozen=True)
class PerToken:
    """One scale per token (row) of an activation: an outlier token only costs its own precision."""

    kind: Literal["token"] = "token"


@dataclass(frozen=True)
class PerGroup:
    """One scale per `size` consecutive input channels of each row; a ragged last group gets its own scale."""

    size: int = 128
    kind: Literal["group"] = "group"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"group size must be >= 1, got {self.size}")


@dataclass(frozen=True)
class PerBlock:
    """Microscaling: one scale per `size` consecutive input channels of each row, itself stored in a narrow format.
    `e8m0`: a bare power of two (OCP MX: MXFP8, MXFP4). `e4m3`: an FP8 E4M3 number times one fp32 scale per tensor
    (NVIDIA's NVFP4), so the block scales use E4M3's range around the tensor's amax. A ragged last block gets its own
    scale, as if padded with zeros."""

    size: int = 32
    scale: BlockScale = "e8m0"
    kind: Literal["block"] = "block"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"block size must be >= 1, got {self.size}")
        if self.scale not in ("e8m0", "e4m3"):
            raise ConfigError(f"unknown block scale format '{self.scale}'; valid: e8m0, e4m3")


Granularity = PerTensor | PerChannel | PerToken | PerGroup | PerBlock


@dataclass(frozen=True)
class TensorQuant:
    """How one tensor (a weight or an activation) is quantized."""

    format: Format
    granularity: Granularity
    symmetric: bool = True  # False: integer formats get a zero point (asymmetric min/max range)
    dynamic: bool = True  # True: scales from the tensor itself at each forward pass; False: from calibration
    observer: Observer = "minmax"  # static only: calibration keeps the max |x|, or the mean per-batch percentile
    percentile: float = 99.99  # observer "percentile": which percentile of |x|
    scaled: bool = True  # False (fp8 only): cast as is, so values past the format's range saturate or overflow
    # asymmetric only. "int": an integer zero point, the range stretched to hold an exact 0. "float": the zero point
    # is a float (tinygemm's INT4 kernel: x' = (q - 8) s + z), the range is the group's own min..max, and s and z are
    # computed and stored in the tensor's dtype (bf16 on the GPU), as torchao's tinygemm primitives do
    zero_point: ZeroPoint = "int"
    # symmetric integer formats: the scale maps amax onto qmax ("qmax": amax/127 for int8, code -128 unused), or
    # onto half the code span ("half-span": amax/127.5, torchao's choose_qparams_affine: -amax reaches -128, +amax
    # rounds to 128 and clamps to 127)
    int_scale: IntScale = "qmax"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format '{self.format}'; valid: {', '.join(FORMATS)}")
        if not self.symmetric and not self.format.startswith("int"):
            raise ConfigError(f"format '{self.format}' is symmetric only; set symmetric=True")
        if not self.scaled and not self.format.startswith("fp8"):
            raise ConfigError(f"scaled=False is for fp8 formats only, not '{self.format}'")
        if self.zero_point not in ("int", "float"):
            raise ConfigError(f"unknown zero point '{self.zero_point}'; valid: int, float")
        if self.zero_point == "float" and (self.symmetric or not self.format.startswith("int")):
            raise ConfigError("a float zero point is for asymmetric integer formats; set symmetric=False")
        if self.observer not in ("minmax", "percentile"):
            raise ConfigError(f"unknown observer '{self.observer}'; valid: minmax, percentile")
        if self.int_scale not in ("qmax", "half-span"):
            raise ConfigError(f"unknown int_scale '{self.int_scale}'; valid: qmax, half-span")
        if self.int_scale != "qmax" and not (self.format.startswith("int") and self.symmetric):
            raise ConfigError(f"int_scale '{self.int_scale}' is for symmetric integer formats, not "
                              f"{'asymmetric ' if not self.symmetric else ''}'{self.format}'")
        if not 0 < self.percentile <= 100:
            raise ConfigError(f"percentile must be in (0, 100], got {self.percentile}")
        self._check_block()

    def _check_block(self) -> None:
        is_block = isinstance(self.granularity, PerBlock)
        if self.format == "fp4_e2m1" and not is_block:
            raise ConfigError(f"format 'fp4_e2m1' needs a PerBlock granularity (MX or NVFP4 scales), "
                              f"not {self.granularity}")
        if is_block and self.format not in BLOCK_ELEMENTS:
            raise ConfigError(f"PerBlock holds float elements ({', '.join(BLOCK_ELEMENTS)}), not '{self.format}'")
        if is_block and not self.dynamic:
            raise ConfigError("PerBlock scales are dynamic (computed from each block at every pass); set dynamic=True")
        if is_block and not self.scaled:
            raise ConfigError("PerBlock is a scaled format; scaled=False applies to per-tensor fp8 only")


@dataclass(frozen=True)
class QuantScheme:
    name: str
    weights: TensorQuant | None  # None: weights stay in the model's dtype
    activations: TensorQuant | None  # None: weight-only
    description: str = ""
    reference: str = ""  # where the scheme comes from
    outlier_threshold: float | None = None  # LLM.int8(): input columns with any |x| above it stay in fp
    # which entries of a kept outlier column leave the row's activation scale. "column": all of them (the paper's
    # decomposition: the kept columns are out of the int8 product, so out of its scale). "entries": only those at or
    # above the threshold; the column's other entries still count toward the row's absmax although the product
    # takes the whole column from x (bitsandbytes 0.50's MatMul8bitLt, whose threshold test is also >=)
    outlier_rule: OutlierRule = "column"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_bits(self) -> int | None:
        return BITS[self.weights.format] if self.weights else None

    @property
    def needs_calibration(self) -> bool:
        return self.activations is not None and not self.activations.dynamic

    def __post_init__(self) -> None:
        if self.outlier_rule not in ("column", "entries"):
            raise ConfigError(f"unknown outlier rule '{self.outlier_rule}'; valid: column, entries")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Keep:
    """What stays in full precision whatever the scheme: the causal check "quantize everything except the massive
    activations". Positions index the token axis of every quantized Linear's input (0 is BOS). Channels index the
    model's hidden (residual) dimension, where the scan finds massive activations; they are kept in the inputs of
    the Linears that read that dimension (attention q/k/v and MLP gate/up in Llama)."""

    positions: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()
    # Linears left unquantized, named by a part of their qualified name ('q_proj' keeps every layer's q_proj): to
    # find which weights a loss lives in (mixed precision by module, as in "skip lm_head" or "keep down_proj")
    linears: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(p < 0 for p in self.positions):
            raise ConfigError(f"kept positions must be >= 0, got {self.positions}")
        if any(c < 0 for c in self.channels):
            raise ConfigError(f"kept channels must be >= 0, got {self.channels}")
        bad = [name for name in self.linears if not re.fullmatch(r"[\w.]+", name)]
        if bad:
            raise ConfigError(f"kept Linears are parts of module names like q_proj or layers.0.mlp, got {bad}")

    def __bool__(self) -> bool:
        return bool(self.positions or self.channels or self.linears)

    @property
    def in_activations(self) -> bool:
        """Whether something is kept inside a quantized Linear's input (what a backend must support)."""
        return bool(self.positions or self.channels)

    def keeps_linear(self, name: str) -> bool:
        return any(part in name for part in self.linears)

    def linears_matching_none(self, names: Iterable[str]) -> list[str]:
        """The kept Linear names that are part of none of `names`: they would keep nothing."""
        names = list(names)
        return [part for part in self.linears if not any(part in name for name in names)]

    @property
    def label(self) -> str:
        """The results column: '' for nothing kept, else e.g. 'pos:0', 'ch:507', 'pos:0;ch:507' or 'lin:q_proj'."""
        parts = [f"{name}:{','.join(map(str, values))}"
                 for name, values in (("pos", self.positions), ("ch", self.channels), ("lin", self.linears))
                 if values]
        return ";".join(parts)


SMOOTHQUANT = "Xiao et al. 2023, SmoothQuant (arXiv 2211.10438)"
LLM_INT8 = "Dettmers et al. 2022, LLM.int8() (arXiv 2208.07339)"
FP8_FORMATS = "Micikevicius et al. 2022, FP8 Formats for Deep Learning (arXiv 2209.05433)"
QUAROT = "Ashkboos et al. 2024, QuaRot (arXiv 2404.00456)"
OCP_MX = "OCP Microscaling Formats (MX) v1.0 spec (2023); Rouhani et al. 2023 (arXiv 2310.10537)"
NVFP4 = "NVIDIA NVFP4 (Blackwell): E2M1 in blocks of 16, E4M3 block scales, one fp32 scale per tensor"
MX_BLOCK = PerBlock(32, "e8m0")
NVFP4_BLOCK = PerBlock(16, "e4m3")
TORCHAO_INT8 = ("torchao 0.18 Int8Tensor.from_hp -> choose_qparams_affine(MappingType.SYMMETRIC): "
                "scale = amax / ((127 - (-128)) / 2)")


# The schemes, as data: a scheme is a `QuantScheme`; adding one is one more entry here (or `SCHEMES.add(name,
# QuantScheme(...))` from another module), and `sim` runs it at once.
TABLE: tuple[QuantScheme, ...] = (
    # ---- INT8 -------------------------------------------------------------------------------------------------------
    QuantScheme(
        name="int8-w8a8-token",
        weights=TensorQuant("int8", PerChannel()),
        activations=TensorQuant("int8", PerToken()),
        description="INT8 weights per output channel, INT8 activations per token (dynamic), symmetric",
        reference=f"the W8A8 per-token baseline of {SMOOTHQUANT}",
    ),
    QuantScheme(
        name="int8-weight-channel",
        weights=TensorQuant("int8", PerChannel()),
        activations=None,
        description="INT8 weight-only, one scale per output channel, symmetric",
        reference="round-to-nearest weight-only; torchao Int8WeightOnlyConfig",
    ),
    QuantScheme(
        name="int8-w8a8-tensor",
        weights=TensorQuant("int8", PerChannel()),
        activations=TensorQuant("int8", PerTensor()),
        description="INT8 weights per channel, INT8 activations with one dynamic scale per tensor",
        reference=f"the naive W8A8 of {SMOOTHQUANT}: the scheme massive activations break",
    ),
    QuantScheme(
        name="int8-w8a8-tensor-static",
        weights=TensorQuant("int8", PerChannel()),
        activations=TensorQuant("int8", PerTensor(), dynamic=False, observer="minmax"),
        description="INT8 weights per channel, INT8 activations with a static per-tensor scale (calibrated max)",
        reference=f"static W8A8 of {SMOOTHQUANT}",
    ),
    QuantScheme(
        name="int8-w8a8-tensor-static-p9999",
        weights=TensorQuant("int8", PerChannel()),
        activations=TensorQuant("int8", PerTensor(), dynamic=False, observer="percentile", percentile=99.99),
        description="as int8-w8a8-tensor-static, scale from the 99.99th percentile of |x|: clips the outliers",
        reference="percentile calibration (Wu et al. 2020, arXiv 2004.09602)",
    ),
    QuantScheme(
        name="llm-int8",
        weights=TensorQuant("int8", PerChannel()),
        activations=TensorQuant("int8", PerToken()),
        description="LLM.int8(): W8A8 per token/channel, input columns with any |x| > 6 kept in 16-bit",
        reference=LLM_INT8,
        outlier_threshold=6.0,
    ),
    QuantScheme(
        name="llm-int8-bnb",
        weights=TensorQuant("int8", PerChannel()),
        activations=TensorQuant("int8", PerToken()),
        description="LLM.int8() as bitsandbytes computes it: columns with any |x| >= 6 kept in 16-bit, but only "
                    "the entries >= 6 leave each row's scale",
        reference=f"{LLM_INT8}; bitsandbytes 0.50 MatMul8bitLt (tests/quant/test_bnb.py writes its rule out)",
        outlier_threshold=6.0,
        outlier_rule="entries",
    ),
    # ---- INT4 -------------------------------------------------------------------------------------------------------
    QuantScheme(
        name="int4-weight-g128",
        weights=TensorQuant("int4", PerGroup(128), symmetric=False),
        activations=None,
        description="INT4 weight-only round-to-nearest, asymmetric, groups of 128 input channels",
        reference="RTN g128 baseline of GPTQ/AWQ papers; torchao IntxWeightOnlyConfig(int4, PerGroup(128))",
    ),
    QuantScheme(
        name="int4-weight-g128-tinygemm",
        weights=TensorQuant("int4", PerGroup(128), symmetric=False, zero_point="float"),
        activations=None,
        description="INT4 weight-only, groups of 128, tinygemm's arithmetic: float zero point, each group's own "
                    "min..max (0 not kept exact), scale and zero in the model's dtype",
        reference="torchao Int4WeightOnlyConfig(TILE_PACKED_TO_4D), the CUDA tinygemm kernel (gpt-fast); "
                  "torchao.quantization.quant_primitives._choose_qparams_affine_tinygemm",
    ),
    QuantScheme(
        name="int4-w4a8-token",
        weights=TensorQuant("int4", PerChannel()),
        activations=TensorQuant("int8", PerToken()),
        description="INT4 weights per output channel, INT8 activations per token (dynamic), symmetric",
        reference=f"the W4A8 setting of {QUAROT} and its successors, round-to-nearest",
    ),
    QuantScheme(
        name="int4-w4a4-token",
        weights=TensorQuant("int4", PerChannel()),
        activations=TensorQuant("int4", PerToken()),
        description="INT4 weights per output channel, INT4 activations per token (dynamic), symmetric",
        reference=f"the W4A4 round-to-nearest baseline of {QUAROT}",
    ),
    QuantScheme(
        name="int4-w4a4-tensor",
        weights=TensorQuant("int4", PerChannel()),
        activations=TensorQuant("int4", PerTensor()),
        description="INT4 weights per output channel, INT4 activations with one scale per tensor (dynamic)",
        reference=f"W4A4 with per-tensor activation scales, the setting outlier tokens break most ({QUAROT})",
    ),
    # Weights grouped by 128 input channels, activations as in the per-channel schemes above: only the weight
    # granularity changes, so symmetric like them (the asymmetric g128 of int4-weight-g128 would change two things).
    QuantScheme(
        name="int4-w4a8-token-g128",
        weights=TensorQuant("int4", PerGroup(128)),
        activations=TensorQuant("int8", PerToken()),
        description="INT4 weights in groups of 128 input channels, INT8 activations per token (dynamic), symmetric",
        reference=f"the W4A8 g128 setting of {QUAROT} and QServe (Lin et al. 2024, arXiv 2405.04532), RTN",
    ),
    QuantScheme(
        name="int4-w4a4-token-g128",
        weights=TensorQuant("int4", PerGroup(128)),
        activations=TensorQuant("int4", PerToken()),
        description="INT4 weights in groups of 128 input channels, INT4 activations per token (dynamic), symmetric",
        reference=f"the W4A4 g128 round-to-nearest baseline of {QUAROT}",
    ),
    QuantScheme(
        name="int4-w4a4-tensor-g128",
        weights=TensorQuant("int4", PerGroup(128)),
        activations=TensorQuant("int4", PerTensor()),
        description="INT4 weights in groups of 128 input channels, INT4 activations with one scale per tensor",
        reference=f"as int4-w4a4-tensor with grouped weights: isolates what the activations lose ({QUAROT})",
    ),
    QuantScheme(
        name="gptq-int4-g128",
        weights=TensorQuant("int4", PerGroup(128)),
        activations=None,
        description="GPTQ 4-bit, symmetric, groups of 128: calibrated second-order weight rounding (gptqmodel)",
        reference="Frantar et al. 2023, GPTQ (arXiv 2210.17323); gptqmodel",
    ),
    QuantScheme(
        name="nf4",
        weights=TensorQuant("nf4", PerGroup(64)),
        activations=None,
        description="NF4 weight-only (normal-float 4-bit codebook, absmax blocks of 64)",
        reference="Dettmers et al. 2023, QLoRA (arXiv 2305.14314); bitsandbytes Linear4bit",
    ),
    # ---- FP8 --------------------------------------------------------------------------------------------------------
    QuantScheme(
        name="fp8-e4m3-w8a8-tensor",
        weights=TensorQuant("fp8_e4m3", PerTensor()),
        activations=TensorQuant("fp8_e4m3", PerTensor()),
        description="FP8 E4M3 weights and activations, one dynamic scale per tensor (amax -> 448)",
        reference=f"{FP8_FORMATS}; torchao Float8DynamicActivationFloat8Weight(PerTensor)",
    ),
    QuantScheme(
        name="fp8-e4m3-w8a8-token",
        weights=TensorQuant("fp8_e4m3", PerChannel()),
        activations=TensorQuant("fp8_e4m3", PerToken()),
        description="FP8 E4M3, per-channel weight and per-token activation scales ('rowwise')",
        reference=f"{FP8_FORMATS}; torchao Float8DynamicActivationFloat8Weight(PerRow)",
    ),
    QuantScheme(
        name="fp8-e4m3-weight",
        weights=TensorQuant("fp8_e4m3", PerChannel()),
        activations=None,
        description="FP8 E4M3 weight-only, one scale per output channel",
        reference=f"{FP8_FORMATS}; torchao Float8WeightOnlyConfig",
    ),
    QuantScheme(
        name="fp8-e5m2-w8a8-tensor",
        weights=TensorQuant("fp8_e5m2", PerTensor()),
        activations=TensorQuant("fp8_e5m2", PerTensor()),
        description="FP8 E5M2 (more range, 2 mantissa bits), one dynamic scale per tensor",
        reference=FP8_FORMATS,
    ),
    QuantScheme(
        name="fp8-e4m3-unscaled",
        weights=TensorQuant("fp8_e4m3", PerTensor(), scaled=False),
        activations=TensorQuant("fp8_e4m3", PerTensor(), scaled=False),
        description="FP8 E4M3 plain cast, no scales: values past 448 (massive activations) saturate to 448",
        reference=f"{FP8_FORMATS}: what happens without scaling",
    ),
    QuantScheme(
        name="fp8-e5m2-unscaled",
        weights=TensorQuant("fp8_e5m2", PerTensor(), scaled=False),
        activations=TensorQuant("fp8_e5m2", PerTensor(), scaled=False),
        description="FP8 E5M2 plain cast, no scales: values past 57344 overflow to inf",
        reference=f"{FP8_FORMATS}: what happens without scaling",
    ),
    # ---- Microscaling (MX, NVFP4) ------------------------------------------------------------------------------------
    QuantScheme(
        name="mxfp8-w8a8",
        weights=TensorQuant("fp8_e4m3", MX_BLOCK),
        activations=TensorQuant("fp8_e4m3", MX_BLOCK),
        description="MXFP8: E4M3 weights and activations, a power-of-two (E8M0) scale per 32 input channels",
        reference=f"{OCP_MX}; torchao MXDynamicActivationMXWeightConfig(float8_e4m3fn)",
    ),
    QuantScheme(
        name="mxfp4-w4a4",
        weights=TensorQuant("fp4_e2m1", MX_BLOCK),
        activations=TensorQuant("fp4_e2m1", MX_BLOCK),
        description="MXFP4: FP4 E2M1 weights and activations, a power-of-two (E8M0) scale per 32 input channels",
        reference=f"{OCP_MX}; torchao MXDynamicActivationMXWeightConfig(float4_e2m1fn_x2)",
    ),
    QuantScheme(
        name="mxfp4-weight",
        weights=TensorQuant("fp4_e2m1", MX_BLOCK),
        activations=None,
        description="MXFP4 weight-only: FP4 E2M1, a power-of-two (E8M0) scale per 32 input channels",
        reference=OCP_MX,
    ),
    QuantScheme(
        name="nvfp4-w4a4",
        weights=TensorQuant("fp4_e2m1", NVFP4_BLOCK),
        activations=TensorQuant("fp4_e2m1", NVFP4_BLOCK),
        description="NVFP4: FP4 E2M1 weights and activations, E4M3 scale per 16 input channels + fp32 per tensor",
        reference=f"{NVFP4}; torchao NVFP4DynamicActivationNVFP4WeightConfig",
    ),
    QuantScheme(
        name="nvfp4-weight",
        weights=TensorQuant("fp4_e2m1", NVFP4_BLOCK),
        activations=None,
        description="NVFP4 weight-only: FP4 E2M1, E4M3 scale per 16 input channels + fp32 per tensor",
        reference=f"{NVFP4}; torchao NVFP4WeightOnlyConfig",
    ),
    # ---- Library arithmetic that differs from the schemes above ------------------------------------------------------
    # A backend may only run a scheme whose arithmetic it does; where a library's differs, the difference is a scheme of
    # its own, run by sim too, so a row's name always says what was computed and a test can hold the library to it.
    QuantScheme(
        name="int8-weight-channel-halfspan",
        weights=TensorQuant("int8", PerChannel(), int_scale="half-span"),
        activations=None,
        description="as int8-weight-channel, scale amax/127.5 (the full code span: -amax -> -128, +amax -> 127)",
        reference=f"{TORCHAO_INT8}; torchao Int8WeightOnlyConfig",
    ),
    QuantScheme(
        name="int8-w8a8-token-halfspan",
        weights=TensorQuant("int8", PerChannel(), int_scale="half-span"),
        activations=TensorQuant("int8", PerToken(), int_scale="half-span"),
        description="as int8-w8a8-token, weight and activation scales amax/127.5 (the full code span)",
        reference=f"{TORCHAO_INT8}; torchao Int8DynamicActivationInt8WeightConfig",
    ),
)
ALIASES = {  # short names people type -> the scheme they mean
    "int8": "int8-w8a8-token",
    "int8-wo": "int8-weight-channel",
    "int4": "int4-weight-g128",
    "gptq": "gptq-int4-g128",
    "fp8": "fp8-e4m3-w8a8-tensor",
}

SCHEMES: Registry[QuantScheme] = Registry("scheme")
for _scheme in TABLE:
    SCHEMES.add(_scheme.name, _scheme, aliases=tuple(a for a, name in ALIASES.items() if name == _scheme.name))


def get_scheme(name: str) -> QuantScheme:
    """The scheme called `name` (or one of its aliases); one shared frozen instance."""
    return SCHEMES.get(name)
