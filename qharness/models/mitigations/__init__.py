"""Training-time mitigations of massive activations, one file each (dyt.py, tvr.py), registered by name.

A mitigation changes one place, declared as data in a `Mitigation`: `build` changes the architecture before
training (DyT replaces the norms), `init` sets the starting weights (TVR's layer-index-rescaled init), `after_step`
runs after each optimizer step (TVR's rescale). Attention KV bias, gated attention and clipped softmax, the
training loop and the model zoo are still to come (issue 6).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qharness.registry import Registry

MODULES = ("qharness.models.mitigations.dyt", "qharness.models.mitigations.tvr")


@dataclass(frozen=True)
class Mitigation:
    name: str
    description: str
    reference: str
    build: Callable[[Any], Any] | None = None  # (model) -> None: change the architecture in place
    init: Callable[[Any], Any] | None = None  # (model) -> None: starting weights
    after_step: Callable[[Any, int], Any] | None = None  # (model, step) -> None: after each optimizer step


MITIGATIONS: Registry[Mitigation] = Registry("mitigation")


def load_mitigations() -> Registry[Mitigation]:
    for module in MODULES:
        importlib.import_module(module)
    return MITIGATIONS
