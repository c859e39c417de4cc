"""Apply a scheme to a model: `quantize_(model, scheme)` swaps every Linear inside the decoder layers in place.

    from qharness.quant.apply import quantize_
    from qharness.quant.schemes import Keep, get_scheme
    quantize_(model, get_scheme("int8-w8a8-tensor"), keep=Keep(positions=(0,)))   # BOS stays in full precision

The LM head and the embeddings stay in full precision: they sit outside the decoder layers. GPT-2's Conv1D
projections are converted to equivalent nn.Linear first, so every backend sees the same modules.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from qharness.errors import BackendUnavailable
from qharness.models.layers import decoder_layers
from qharness.quant.backend import QuantContext, backend_note, load_backends, select_backend
from qharness.quant.modules import conv1d_to_linear, swap_module
from qharness.quant.schemes import Keep, QuantScheme


def target_linears(model: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> dict[str, nn.Linear]:
    """Qualified name -> nn.Linear for every Linear (or Conv1D, converted in place) inside the decoder layers
    that `skip` does not exclude."""
    layer_ids = {id(layer) for layer in decoder_layers(model)}
    targets: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if id(module) not in layer_ids:
            continue
        for sub_name, sub in module.named_modules(prefix=name):
            if skip(sub_name):
                continue
            if type(sub).__name__ == "Conv1D":
                sub = conv1d_to_linear(sub)
                swap_module(model, sub_name, sub)
            if isinstance(sub, nn.Linear):
                targets[sub_name] = sub
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
    is checked against this model's dtype and widths first, so `auto` falls back (to sim) where a kernel declines
    the model, and a named backend that declines it raises before any weight changes."""
    first = next(model.parameters())
    context = context or QuantContext(first.device)
    keep = keep or Keep()
    targets = target_linears(model, lambda name: skip(name) or keep.keeps_linear(name))
    chosen = select_backend(scheme, first.device, backend, dtype=first.dtype, targets=targets)
    impl = load_backends().get(chosen)
    if keep.in_activations and not impl.supports_keep:
        raise BackendUnavailable(f"backend '{chosen}' cannot keep token positions or channels in full precision; "
                                 "use --backend sim")
    note = backend_note(chosen, scheme, first.device, backend)
    if note:  # the CLI's runner says it too; a library user gets it through logging
        logging.getLogger("qharness").warning(note)
    impl.apply(model, scheme, targets, keep, context)
    return chosen
