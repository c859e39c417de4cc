"""Quantization schemes: what is quantized (weights, activations), to which format, at which granularity.

A scheme is data (`QuantScheme`); the arithmetic lives in `sim.py` (the reference) and in library backends.
Add a scheme: one function returning a `QuantScheme`, decorated with `@SCHEMES.register("name")`.
Names read `<format>-<what>-<activation granularity>`, e.g. `int8-w8a8-token`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from qharness.errors import ConfigError
from qharness.registry import Registry

Format = Literal["int8", "int4", "fp8_e4m3", "fp8_e5m2"]
FORMATS: tuple[str, ...] = ("int8", "int4", "fp8_e4m3", "fp8_e5m2")
BITS = {"int8": 8, "int4": 4, "fp8_e4m3": 8, "fp8_e5m2": 8}


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


Granularity = PerTensor | PerChannel | PerToken | PerGroup


@dataclass(frozen=True)
class TensorQuant:
    """How one tensor (a weight or an activation) is quantized."""

    format: Format
    granularity: Granularity
    symmetric: bool = True  # False: integer formats get a zero point (asymmetric min/max range)
    dynamic: bool = True  # True: scales from the tensor itself at each forward pass

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown format '{self.format}'; valid: {', '.join(FORMATS)}")
        if not self.symmetric and self.format.startswith("fp8"):
            raise ConfigError(f"format '{self.format}' is symmetric only; set symmetric=True")


@dataclass(frozen=True)
class QuantScheme:
    name: str
    weights: TensorQuant | None  # None: weights stay in the model's dtype
    activations: TensorQuant | None  # None: weight-only
    description: str = ""
    reference: str = ""  # where the scheme comes from
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_bits(self) -> int | None:
        return BITS[self.weights.format] if self.weights else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SCHEMES: Registry[Any] = Registry("scheme")  # name -> () -> QuantScheme


def get_scheme(name: str) -> QuantScheme:
    return SCHEMES.get(name)()


@SCHEMES.register("int8-w8a8-token", aliases=("int8",))
def int8_w8a8_token() -> QuantScheme:
    return QuantScheme(
        name="int8-w8a8-token",
        weights=TensorQuant("int8", PerChannel()),
        activations=TensorQuant("int8", PerToken()),
        description="INT8 weights per output channel, INT8 activations per token (dynamic), symmetric",
        reference="SmoothQuant's W8A8 per-token baseline (Xiao et al. 2023, arXiv 2211.10438)",
    )
