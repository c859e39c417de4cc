"""Post-hoc outlier transforms: rewrite a full-precision model into one that computes the same function but whose
Linears read inputs that quantize better, before any scheme quantizes it. One file each, registered by name in
`TRANSFORMS`; the command line takes `--transform NAME` or `--transform NAME:ARG` (`smoothquant:0.5`).

A transform must not change what the fp model computes. `transform_` measures the logits of one calibration
sequence before and after and refuses a model whose logits moved: a layout that only looks like one the transform
knows (a mitigation's extra modules, another norm) is refused instead of silently changed. So the fp baseline of a
transformed run is the untransformed model's, and its quantized rows name the transform in the `transform` column.

Add a transform: a file here that registers a `Transform` (every module here is imported when transforms are
first asked for).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qharness.core.errors import BackendUnavailable, ConfigError
from qharness.core.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor, nn

@dataclass(frozen=True)
class Transform:
    name: str
    description: str
    reference: str
    apply: Callable[[nn.Module, float | None, list[Tensor]], None]  # (model, argument, calibration batches)
    argument: str | None = None  # the name of its one numeric argument ("alpha"); None: it takes none
    default: float | None = None  # the argument when none is given
    bounds: tuple[float, float] = (0.0, 1.0)  # the argument's valid range, inclusive
    requires: tuple[str, ...] = ()  # importable packages it needs
    mixes_channels: bool = False  # hidden channel c no longer means what it did, so --keep-channels cannot apply
    # backend -> why it cannot quantize the transformed model
    refuses_backends: dict[str, str] = field(default_factory=dict)


TRANSFORMS: Registry[Transform] = Registry("transform")


def load_transforms() -> Registry[Transform]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return TRANSFORMS


@dataclass(frozen=True)
class TransformSpec:
    name: str  # canonical registry name
    argument: float | None = None

    @property
    def label(self) -> str:
        """What the leaderboard's `transform` column says: the argument always written, so `smoothquant` and
        `smoothquant:0.5` are one experiment."""
        return self.name if self.argument is None else f"{self.name}:{self.argument:g}"


def names_a_transform(text: str) -> bool:
    """'' and 'none' (any spacing) mean no transform."""
    return text.strip() not in ("", "none")


def parse_transform(text: str) -> TransformSpec | None:
    """'' or 'none' -> None; 'rotate' -> rotate; 'smoothquant:0.8' -> smoothquant with alpha 0.8."""
    if not names_a_transform(text):
        return None
    name, has_argument, raw = text.strip().partition(":")
    entry = load_transforms().get(name)
    if entry.argument is None:
        if has_argument:
            raise ConfigError(f"transform '{entry.name}' takes no argument, got '{text}'; use --transform "
                              f"{entry.name}")
        return TransformSpec(entry.name)
    low, high = entry.bounds
    try:
        value = float(raw) + 0.0 if has_argument else entry.default  # + 0.0: -0 is 0, one label and one row key
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise ConfigError(f"transform '{entry.name}' takes {entry.argument} in [{low:g}, {high:g}], got '{raw}'; "
                          f"e.g. --transform {entry.name}:{entry.default:g}")
    return TransformSpec(entry.name, value)


def check_transform(spec: TransformSpec, keep_channels: tuple[int, ...], backends: dict[str, str]) -> None:
    """What can be refused before a model loads: a missing package, kept channels a rotation moves, a backend
    that cannot quantize the transformed model (`backends`: scheme -> backend)."""
    entry = TRANSFORMS.get(spec.name)
    missing = [package for package in entry.requires if importlib.util.find_spec(package) is None]
    if missing:
        raise BackendUnavailable(f"transform '{spec.name}' needs {', '.join(missing)}: pip install "
                                 f"{' '.join(missing)}")
    if keep_channels and entry.mixes_channels:
        raise ConfigError(f"transform '{spec.name}' mixes the hidden channels, so --keep-channels would keep "
                          "others than those named; drop --keep-channels (or keep positions instead)")
    for scheme, backend in backends.items():
        if backend in entry.refuses_backends:
            raise ConfigError(f"transform '{spec.name}' cannot run with backend '{backend}' (scheme {scheme}): "
                              f"{entry.refuses_backends[backend]}; pick another --backend")


def logit_tolerance(dtype: object) -> float:
    """How far the transformed fp model's logits may move, relative to their largest magnitude, in fp32 or fp64.
    Measured: fp32 rounding moves SmolLM2-135M's by 2.5e-6 (smoothquant) and 3.5e-6 (rotate); a transform applied
    to a layout it does not know (kv_bias's extra value) moved them by 0.31 (smoothquant) and 0.53 (rotate). 16-bit
    models are checked on an fp32 copy (`transform_`), so no tolerance is given for them."""
    import torch

    return {torch.float64: 1e-8, torch.float32: 1e-3}[dtype]


def transform_(model: nn.Module, spec: TransformSpec, batches: list[Tensor]) -> float:
    """Transform `model` in place; returns how far its logits moved on the first batch (relative to their largest
    magnitude). Raises ConfigError, with the model left transformed, when the layout is not what the transform knows.

    In 16 bits the logits cannot tell a wrong layout from rounding: re-rounding the transformed weights to bf16 alone
    moves SmolLM2-135M's logits by 3.7e-2 to 4.3e-2 (its own bf16-vs-fp32 difference is 3.4e-2) and a tiny Llama with
    0.3-std weights' by 0.1 to 0.25, as far as a wrong layout moves them. bf16 is what `--dtype auto` loads on CUDA.
    So a 16-bit model's layout is checked by transforming an fp32 copy first (one more copy of the model in memory,
    on its device, for the check), and the 16-bit model itself is only held to finite logits."""
    import torch

    from qharness.models.drift import logit_drift

    entry = TRANSFORMS.get(spec.name)
    dtype = next(model.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):
        import copy

        probe = copy.deepcopy(model).float()
        _check_layout(spec, logit_drift(probe, batches[:1], lambda: entry.apply(probe, spec.argument, batches)),
                      torch.float32, " (checked on an fp32 copy)")
        del probe
    drift = logit_drift(model, batches[:1], lambda: entry.apply(model, spec.argument, batches))
    if dtype not in (torch.float16, torch.bfloat16):
        _check_layout(spec, drift, dtype, "")
    elif not math.isfinite(drift):
        raise ConfigError(f"transform '{spec.label}' made this {str(dtype).removeprefix('torch.')} model's logits "
                          f"overflow (its layout checked out in fp32); use --dtype "
                          f"{'bf16 or fp32' if dtype == torch.float16 else 'fp32'}")
    return drift


def _check_layout(spec: TransformSpec, drift: float, dtype: object, where: str) -> None:
    tolerance = logit_tolerance(dtype)
    if not drift <= tolerance:
        from qharness.models.layers import LLAMA_STYLE

        raise ConfigError(f"transform '{spec.label}' changed this model's fp logits by {drift:.1e} of their "
                          f"largest magnitude{where} (tolerance {tolerance:.0e}), so its layout is not what the "
                          f"transform knows; it supports {LLAMA_STYLE}")
