"""Quantization backends: who does the arithmetic. `sim` (pure torch, every device, the reference) and optional
library backends (bitsandbytes, torchao, gptqmodel, optimum-quanto), one file each, registered in `BACKENDS`.

A backend declares as data what it runs: `capabilities` maps each scheme it implements to one `Capability` per
device type (the model dtypes, CUDA compute capability, widths and build tools that scheme needs there). That table
is the only place that says which backend runs which scheme: `QuantScheme.backends`, `check`, `select_backend`
and `qharness list` all read it. `check` raises a one-line `BackendUnavailable` naming what would work, before any
weight moves; `apply(model, scheme, targets, keep, context)` swaps the target Linears in place. Add a backend: a new
file in this folder that registers a `Backend` (every module here is imported when the backends are first asked for,
the way model sources are).

`auto` picks, per scheme, a real kernel backend on CUDA (highest `preference` first) and `sim` on CPU (the same
math, so CI exercises it), falling back to whichever backend accepts the scheme, device, dtype and model.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qharness.core.errors import BackendUnavailable
from qharness.core.registry import Registry
from qharness.quant.types import Capability, QuantContext, everywhere

# re-exported: each backend module takes what it declares from here (bnb.py: Backend, Capability, QuantContext, ...)
__all__ = ["BACKENDS", "Backend", "Capability", "QuantContext", "everywhere", "recipe", "select_backend"]

if TYPE_CHECKING:
    import torch
    from torch import nn

# Declarations import no torch (kernels and libraries load inside `apply`), so `qharness list` stays fast.
PIP_NAMES = {"bitsandbytes": "bitsandbytes", "torchao": "torchao", "gptqmodel": "gptqmodel",
             "optimum.quanto": "optimum-quanto"}


def _has_nvcc() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME  # where torch's JIT builder looks for nvcc

    return shutil.which("nvcc") is not None or (
        CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))


def _has_ninja() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return is_ninja_available()


# tools a backend may need to build its kernels at first use: name -> (probe, how to get it)
TOOLS: dict[str, tuple[Callable[[], bool], str]] = {
    "nvcc": (_has_nvcc, "install the CUDA toolkit (nvcc) and set CUDA_HOME"),
    "ninja": (_has_ninja, "pip install ninja"),
    "c++": (lambda: shutil.which("c++") is not None, "install a C++ compiler"),
}


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    apply: Callable[..., None]  # (model, scheme, targets: dict[str, nn.Linear], keep, context) -> None
    capabilities: Mapping[str, tuple[Capability, ...]] = field(default_factory=dict)  # scheme name -> per device
    default: tuple[Capability, ...] = ()  # for schemes not in `capabilities` (sim: every scheme); () none
    requires: tuple[str, ...] = ()  # importable packages
    supports_keep: bool = False  # can keep token positions in full precision
    preference: int = 0  # auto on CUDA tries the highest first; sim (0) is the fallback

    def runs(self, scheme: Any) -> tuple[Capability, ...]:
        """How this backend runs `scheme` on each device type; () if it does not implement it."""
        return self.capabilities.get(scheme.name, self.default)

    @property
    def schemes(self) -> tuple[str, ...] | None:
        """The schemes it implements by name; None: any scheme not excluded in `capabilities` (sim)."""
        return None if self.default else tuple(name for name, caps in self.capabilities.items() if caps)

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device type it runs some scheme on (`qharness list backends` prints it)."""
        caps = [c for caps in (*self.capabilities.values(), self.default) for c in caps]
        return tuple(d for d in ("cpu", "cuda") if any(c.device == d for c in caps))

    def check(self, device: torch.device, scheme: Any = None, dtype: torch.dtype | None = None,
              targets: Mapping[str, nn.Module] | None = None) -> None:
        """Raise a one-line BackendUnavailable unless this backend can run `scheme` on `device` for a model of
        `dtype` whose target Linears are `targets` (either None: not known yet, not checked)."""
        if scheme is not None and not self.runs(scheme):  # first: installing the library would not help
            raise BackendUnavailable(f"backend '{self.name}' does not implement scheme '{scheme.name}'; "
                                     f"its backends: {', '.join(backends_for(scheme)) or 'none'}")
        missing = [p for p in self.requires if not _installed(p)]
        if missing:
            pip = " ".join(PIP_NAMES.get(p, p) for p in missing)
            raise BackendUnavailable(f"backend '{self.name}' needs {', '.join(missing)}: "
                                     f"pip install -c constraints.txt {pip}")
        if scheme is None:
            if device.type not in self.devices:
                raise BackendUnavailable(f"backend '{self.name}' runs on {', '.join(self.devices)}, not "
                                         f"{device.type}; use --backend sim (same math, any device) or another device")
            return
        caps = self.runs(scheme)
        cap = next((c for c in caps if c.device == device.type), None)
        if cap is None:
            raise BackendUnavailable(f"backend '{self.name}' runs '{scheme.name}' on "
                                     f"{', '.join(c.device for c in caps)}, not {device.type}; "
                                     f"{_alternatives(self, scheme, device)}")
        self._check_capability(cap, device, scheme, dtype)
        if targets is not None:
            _check_widths(self, cap, scheme, targets, device)

    def _check_capability(self, cap: Capability, device: torch.device, scheme: Any, dtype: torch.dtype | None) -> None:
        what = f"backend '{self.name}' runs '{scheme.name}' on {device.type}"
        if cap.min_compute is not None:
            have = compute_capability(device)
            if have < cap.min_compute:
                raise BackendUnavailable(f"{what} with compute capability >= {cap.min_compute[0]}.{cap.min_compute[1]}"
                                         f", not {have[0]}.{have[1]}; {_alternatives(self, scheme, device)}")
        if dtype is not None and cap.dtypes and _dtype_name(dtype) not in cap.dtypes:
            raise BackendUnavailable(f"{what} in {' or '.join(cap.dtypes)} only, not {_dtype_name(dtype)}; pass "
                                     f"--dtype {cap.dtypes[0]} or {_alternatives(self, scheme, device)}")
        absent = [tool for tool in cap.needs if not TOOLS[tool][0]()]
        if absent:
            hints = "; ".join(TOOLS[tool][1] for tool in absent)
            raise BackendUnavailable(f"{what} with a kernel it compiles at first use, which needs "
                                     f"{', '.join(absent)} (not found): {hints}; or "
                                     f"{_alternatives(self, scheme, device)}")


def _check_widths(backend: Backend, cap: Capability, scheme: Any, targets: Mapping[str, nn.Module],
                  device: torch.device) -> None:
    """Kernels that silently skip a Linear of the wrong shape (torchao leaves it in full precision and logs at
    INFO) would report full-precision numbers under the scheme's name; refuse the model instead."""
    group = getattr(scheme.weights.granularity, "size", None) if cap.whole_groups else None
    for name, linear in targets.items():
        out_features, in_features = linear.weight.shape
        if group and in_features % group:
            raise BackendUnavailable(f"backend '{backend.name}' runs '{scheme.name}' on input widths divisible by "
                                     f"{group}; {name} has {in_features}; {_alternatives(backend, scheme, device)} "
                                     "(ragged groups)")
        if in_features % cap.input_multiple:
            raise BackendUnavailable(f"backend '{backend.name}' runs '{scheme.name}' on input widths divisible by "
                                     f"{cap.input_multiple} (packed operands); {name} has {in_features}; "
                                     f"{_alternatives(backend, scheme, device)}")
        if cap.not_shape is not None and (out_features, in_features) == cap.not_shape[0]:
            raise BackendUnavailable(f"backend '{backend.name}' cannot run '{scheme.name}' on a "
                                     f"{out_features}x{in_features} weight ({name}): {cap.not_shape[1]}; "
                                     f"{_alternatives(backend, scheme, device)}")
        if out_features % cap.width_multiple or in_features % cap.width_multiple:
            raise BackendUnavailable(f"backend '{backend.name}' runs '{scheme.name}' on widths divisible by "
                                     f"{cap.width_multiple}; {name} is {in_features}x{out_features}; "
                                     f"{_alternatives(backend, scheme, device)}")


def _alternatives(backend: Backend, scheme: Any, device: torch.device) -> str:
    """What would work instead: other backends that declare the scheme on this device (most preferred first, sim
    last), else the devices this backend runs it on."""
    others = [name for name in backends_for(scheme) if name != backend.name
              and any(c.device == device.type for c in BACKENDS.get(name).runs(scheme))]
    if others:
        return "use " + " or ".join(f"--backend {name}" + (" (same math, any device)" if name == "sim" else "")
                                    for name in others)
    devices = [c.device for c in backend.runs(scheme) if c.device != device.type]
    return f"use --device {devices[0]}" if devices else f"no backend runs '{scheme.name}' on {device.type}"


def _dtype_name(dtype: torch.dtype) -> str:
    from qharness.models.sources import dtype_name  # the --dtype spelling (fp32, bf16, fp16)

    return dtype_name(dtype)


def compute_capability(device: torch.device) -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else (0, 0)


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


BACKENDS: Registry[Backend] = Registry("backend")


def load_backends() -> Registry[Backend]:
    """Every backend, each registered by importing its module (a no-op after the first time: modules are cached by
    the import system, so no flag of our own says whether it happened)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return BACKENDS


def _apply_sim(*args: Any) -> None:
    from qharness.quant.sim import apply_sim  # the arithmetic imports torch; the declaration below does not

    apply_sim(*args)


# The reference backend, declared here rather than in sim.py so that listing it loads no torch.
BACKENDS.add("sim", Backend(
    name="sim",
    description="pure-torch fake quantization: the reference arithmetic, any device",
    apply=_apply_sim,
    # every scheme on every device and dtype, except GPTQ: its calibrated rounding is a different method, and
    # round-to-nearest under its name would be a wrong number
    default=everywhere(),
    capabilities={"gptq-int4-g128": ()},
    supports_keep=True,
))


def backends_for(scheme: Any) -> tuple[str, ...]:
    """The backends that implement `scheme`, most preferred on CUDA first (sim last)."""
    entries = sorted(load_backends(), key=lambda entry: -entry.obj.preference)
    return tuple(entry.name for entry in entries if entry.obj.runs(scheme))


def recipe(table: Mapping[str, Any], backend: str, scheme: Any) -> Any:
    """`table[scheme.name]` for a backend's own per-scheme table; a miss is an error, never a default branch."""
    if scheme.name not in table:
        raise BackendUnavailable(f"backend '{backend}' does not implement scheme '{scheme.name}'; "
                                 f"it implements {', '.join(table)}")
    return table[scheme.name]


def capability_on(backend: str, scheme: Any, device: torch.device) -> Capability | None:
    """How `backend` runs `scheme` on `device`'s type; None where it does not."""
    return next((c for c in load_backends().get(backend).runs(scheme) if c.device == device.type), None)


def _needs_build(backend: str, scheme: Any, device: torch.device) -> bool:
    cap = capability_on(backend, scheme, device)
    return bool(cap and cap.needs)


def select_backend(scheme: Any, device: torch.device, requested: str = "auto", dtype: torch.dtype | None = None,
                   targets: Mapping[str, nn.Module] | None = None) -> str:
    """The backend that will run `scheme` on `device` for a model of `dtype` with these target Linears (None: not
    known yet, so not checked); raises BackendUnavailable with what would work. `auto` skips a backend that declines
    (a dtype, a ragged width) and falls back to the next, sim last; a backend that compiles its kernel at first use
    comes after every one that needs no build."""
    backends = load_backends()
    if requested != "auto":
        backends.get(requested).check(device, scheme, dtype, targets)
        return backends.get(requested).name
    order = sorted(backends_for(scheme), key=lambda name: _needs_build(name, scheme, device))  # stable
    if device.type == "cpu" and "sim" in order:
        order = ["sim"]  # the reference math on CPU, so CPU runs are comparable whatever is installed
    reasons = []
    for name in order:
        try:
            backends.get(name).check(device, scheme, dtype, targets)
            return name
        except BackendUnavailable as exc:
            reasons.append(str(exc))
    raise BackendUnavailable(f"no backend can run scheme '{scheme.name}' on {device.type}: "
                             f"{'; '.join(reasons) or 'none implements it'}")


def build_note(backend: Backend, scheme: Any, device: torch.device) -> str | None:
    """The line to say before `backend` compiles its kernel for `scheme` at first use (minutes with no output
    otherwise); None when it needs no build. Reads the backend's own table only, no registry."""
    cap = next((c for c in backend.runs(scheme) if c.device == device.type), None)
    if cap is None or not cap.needs:
        return None
    return (f"{backend.name} compiles its kernel for '{scheme.name}' at first use ({cap.build_note or 'minutes'}); "
            "later runs reuse it")


def backend_note(chosen: str, scheme: Any, device: torch.device, requested: str = "auto") -> str | None:
    """One line a user should read before quantizing starts, or None: a kernel compiled at first use, or `auto` on
    CUDA running sim because no library kernel computes this scheme exactly."""
    note = build_note(load_backends().get(chosen), scheme, device)
    if note:
        return note
    if requested == "auto" and chosen == "sim" and device.type == "cuda":
        return (f"no library kernel computes '{scheme.name}' exactly on this GPU: running sim, the reference "
                "arithmetic (fake quantization: numbers, not speed)")
    return None
