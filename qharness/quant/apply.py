"""Apply a scheme to a model: `quantize_(model, scheme)` swaps every Linear inside the decoder layers in place.

    from qharness.quant.apply import quantize_
    from qharness.quant.schemes import get_scheme
    quantize_(model, get_scheme("int8-w8a8-token"))

The LM head and the embeddings stay in full precision: they sit outside the decoder layers.
"""


from __future__ import annotations

from collections.abc import Callable

from torch import nn

from qharness.errors import UnknownName
from qharness.models.layers import decoder_layers
from qharness.quant.schemes import QuantScheme
from qharness.quant.sim import SimQuantLinear

BACKENDS = ("sim",)


def target_linears(model: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> dict[str, nn.Linear]:
    """Qualified name -> nn.Linear for every Linear inside the decoder layers that `skip` does not exclude."""
    layer_ids = {id(layer) for layer in decoder_layers(model)}
    targets: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if id(module) in layer_ids:
            for sub_name, sub in module.named_modules(prefix=name):
                if isinstance(sub, nn.Linear) and not skip(sub_name):
                    targets[sub_name] = sub
    return targets


def quantize_(
    model: nn.Module,
    scheme: QuantScheme,
    backend: str = "sim",
    skip: Callable[[str], bool] = lambda name: False,
) -> nn.Module:
    """Replace the target Linears of `model` in place with quantized ones; returns `model`."""
    if backend not in BACKENDS:
        raise UnknownName(f"unknown backend '{backend}'; known: {', '.join(BACKENDS)}")
    for name, linear in target_linears(model, skip).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, SimQuantLinear(linear, scheme))
    return model
