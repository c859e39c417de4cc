"""Quantization backends: who does the arithmetic. `sim` (pure torch, every device, the reference) and optional
library backends (bitsandbytes, torchao, gptqmodel, optimum-quanto), one file each, registered in `BACKENDS`.

A backend declares its needs as data (`requires`, `devices`) and has two functions: `check`, which raises a
one-line `BackendUnavailable` naming what would work, and `apply(model, scheme, targets, keep, context)`, which
swaps the target Linears in place. Add one: a new file that registers a `Backend`, and its name in `MODULES`.

`auto` picks, per scheme, a real kernel backend on CUDA and `sim` on CPU (the same math, so CI exercises it),
falling back to whichever listed backend can run.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from qharness.errors import BackendUnavailable, QHarnessError
from qharness.registry import Registry

MODULES = ("qharness.quant.sim", "qharness.quant.bnb", "qharness.quant.torchao", "qharness.quant.gptq",
           "qharness.quant.quanto")
PIP_NAMES = {"bitsandbytes": "bitsandbytes", "torchao": "torchao", "gptqmodel": "gptqmodel",
             "optimum.quanto": "optimum-quanto"}


@dataclass
class QuantContext:
    """What a backend may need beyond the model: the device, and calibration batches made on demand."""

    device: torch.device
    calibration: Callable[[], list[torch.Tensor]] | None = None
    tokenizer: Any = None  # for backends that work on a saved model folder (gptq)

    def calibration_batches(self, scheme_name: str) -> list[torch.Tensor]:
        if self.calibration is None:
            raise QHarnessError(f"scheme '{scheme_name}' needs calibration data; pass calibration batches")
        return self.calibration()


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    apply: Callable[..., None]  # (model, scheme, targets: dict[str, nn.Linear], keep, context) -> None
    requires: tuple[str, ...] = ()  # importable packages
    devices: tuple[str, ...] = ("cpu", "cuda")
    supports_keep: bool = False  # can keep token positions in full precision
    schemes: tuple[str, ...] | None = None  # the schemes it implements; None: any scheme that lists it
    scheme_check: Callable[[Any, torch.device], None] | None = field(default=None, repr=False)  # further limits

    def check(self, device: torch.device, scheme: Any = None) -> None:
        missing = [p for p in self.requires if not _installed(p)]
        if missing:
            pip = " ".join(PIP_NAMES.get(p, p) for p in missing)
            raise BackendUnavailable(f"backend '{self.name}' needs {', '.join(missing)}: "
                                     f"pip install -c constraints.txt {pip}")
        if device.type not in self.devices:
            raise BackendUnavailable(f"backend '{self.name}' runs on {', '.join(self.devices)}, not {device.type}; "
                                     "use --backend sim (same math, any device) or another device")
        if scheme is not None and self.schemes is not None and scheme.name not in self.schemes:
            raise BackendUnavailable(f"backend '{self.name}' implements {', '.join(self.schemes)}, "
                                     f"not '{scheme.name}'")
        if scheme is not None and self.scheme_check is not None:
            self.scheme_check(scheme, device)


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


BACKENDS: Registry[Backend] = Registry("backend")
_loaded = False


def load_backends() -> Registry[Backend]:
    """Import every backend module once; each registers itself (heavy libraries load only when used)."""
    global _loaded
    if not _loaded:
        for module in MODULES:
            importlib.import_module(module)
        _loaded = True
    return BACKENDS


def select_backend(scheme: Any, device: torch.device, requested: str = "auto") -> str:
    """The backend that will run `scheme` on `device`; raises BackendUnavailable with what would work."""
    backends = load_backends()
    if requested != "auto":
        backend = backends.get(requested)
        if backend.name not in scheme.backends:
            raise BackendUnavailable(f"backend '{backend.name}' does not implement scheme '{scheme.name}'; "
                                     f"its backends: {', '.join(scheme.backends)}")
        backend.check(device, scheme)
        return backend.name
    order = list(scheme.backends)
    if device.type == "cpu" and "sim" in order:
        order = ["sim"]
    elif device.type == "cuda":
        order = [b for b in order if b != "sim"] + (["sim"] if "sim" in order else [])
    reasons = []
    for name in order:
        try:
            backends.get(name).check(device, scheme)
            return name
        except BackendUnavailable as exc:
            reasons.append(str(exc))
    raise BackendUnavailable(f"no backend can run scheme '{scheme.name}' on {device.type}: {'; '.join(reasons)}")
