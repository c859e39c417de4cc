"""Apply a scheme to a model: `quantize_(model, scheme)` swaps every Linear inside the decoder layers in place.

    from qharness.quant.apply import quantize_
    from qharness.quant.schemes import Keep, get_scheme
    quantize_(model, get_scheme("int8-w8a8-tensor"), keep=Keep(positions=(0,)))   # BOS stays in full precision

The LM head and the embeddings stay in full precision: they sit outside the decoder layers. GPT-2's Conv1D
projections are converted to equivalent nn.Linear first (`convert_conv1d_`, a step of its own), so every backend
sees the same modules; `target_linears` only lists them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from qharness.core.errors import BackendUnavailable
from qharness.models.layers import decoder_layers
from qharness.quant.backends import Backend, QuantContext, backend_note, build_note, load_backends, select_backend
from qharness.quant.modules import conv1d_to_linear, swap_module
from qharness.quant.schemes import Keep, QuantScheme


def _decoder_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) for every module inside the decoder layers, the layers themselves included."""
    layer_ids = {id(layer) for layer in decoder_layers(model)}
    return [(sub_name, sub) for name, module in model.named_modules() if id(module) in layer_ids
            for sub_name, sub in module.named_modules(prefix=name)]


def convert_conv1d_(model: nn.Module) -> int:
    """Swap every GPT-2 Conv1D inside the decoder layers for the equivalent nn.Linear, in place, so that every
    backend (and `target_linears`) sees Linears only; returns how many were swapped (0 for models without any)."""
    conv = [(name, sub) for name, sub in _decoder_modules(model) if type(sub).__name__ == "Conv1D"]
    for name, sub in conv:
        swap_module(model, name, conv1d_to_linear(sub))
    return len(conv)


def target_linears(model: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> dict[str, nn.Linear]:
    """Qualified name -> nn.Linear for every Linear inside the decoder layers that `skip` does not exclude. A query:
    it changes nothing, so a Conv1D still there is a caller's bug (run `convert_conv1d_` first), not a module to
    leave out in silence."""
    targets: dict[str, nn.Linear] = {}
    for name, sub in _decoder_modules(model):
        if type(sub).__name__ == "Conv1D":
            raise TypeError(f"{name} is a Conv1D; call convert_conv1d_(model) before listing the target Linears")
        if isinstance(sub, nn.Linear) and not skip(name):
            targets[name] = sub
    return targets


def quantize_(
    model: nn.Module,
    scheme: QuantScheme,
    backend: str = "auto",
    keep: Keep | None = None,
    skip: Callable[[str], bool] = lambda name: False,
    context: QuantContext | None = None,
) -> str:
    """Quantize the target Linears of `model` in place; returns the name of the backend that did it. The backend
    is chosen for this model's dtype and widths first, so `auto` falls back (to sim) where a kernel declines the
    model, and a named backend that declines it raises before any weight changes. (A run's plan chooses once and
    calls `apply_backend_`.)"""
    first = next(model.parameters())
    keep = keep or Keep()
    convert_conv1d_(model)
    targets = target_linears(model, lambda name: skip(name) or keep.keeps_linear(name))
    chosen = select_backend(scheme, first.device, backend, dtype=first.dtype, targets=targets)
    if backend == "auto" and chosen == "sim":  # e.g. on CUDA a scheme no library kernel computes exactly
        note = backend_note(chosen, scheme, first.device, backend)
        if note:
            logging.getLogger("qharness").warning(note)
    apply_backend_(model, scheme, load_backends().get(chosen), keep, skip, context)
    return chosen


def apply_backend_(
    model: nn.Module,
    scheme: QuantScheme,
    backend: Backend,
    keep: Keep | None = None,
    skip: Callable[[str], bool] = lambda name: False,
    context: QuantContext | None = None,
    announce: bool = True,
) -> None:
    """Quantize with a backend already chosen: checked against this model's dtype and widths (raising before any
    weight changes), never chosen again. `announce`: log a kernel build (a run's plan says it instead)."""
    first = next(model.parameters())
    context = context or QuantContext(first.device)
    keep = keep or Keep()
    convert_conv1d_(model)
    targets = target_linears(model, lambda name: skip(name) or keep.keeps_linear(name))
    backend.check(first.device, scheme, first.dtype, targets)
    if keep.in_activations and not backend.supports_keep:
        raise BackendUnavailable(f"backend '{backend.name}' cannot keep token positions or channels in full "
                                 "precision; use --backend sim")
    note = build_note(backend, scheme, first.device) if announce else None
    if note:  # a kernel compiled at first use: minutes with no output otherwise
        logging.getLogger("qharness").warning(note)
    backend.apply(model, scheme, targets, keep, context)
