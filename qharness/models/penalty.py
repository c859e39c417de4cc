"""What the loss-side mitigations share: a term computed from activations while training, added to the next-token
loss (outlier_penalty, lp_penalty, lp_input_penalty). A subclass says what one observed tensor costs (`term`) and
may say which tensors are observed (`_hooks`: every decoder layer's output by default); this class keeps one term
per observed tensor of the forward pass in flight and hands back strength x their mean. torch is imported inside
the methods, so registering a penalty loads nothing."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qharness.core.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor, nn


def check_positive(owner: str, name: str, value: float, meaning: str) -> None:
    """One-line refusal of a setting that is not a finite number > 0."""
    if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
        raise ConfigError(f"{owner} {name} must be a number > 0 ({meaning}), got {value}")


@dataclass
class LayerPenalty(ABC):
    strength: float = 1.0  # weight of the penalty against the next-token loss
    _terms: list[Tensor] = field(default_factory=list, repr=False)

    @abstractmethod
    def term(self, hidden: Tensor) -> Tensor:
        """What one observed tensor costs (a scalar tensor)."""

    def _observe(self, hidden: Tensor) -> None:
        import torch

        if torch.is_grad_enabled():  # the training forward, not the activation probe under no_grad
            self._terms.append(self.term(hidden))

    def _record(self, module: nn.Module, args: object, output: object) -> None:
        self._observe(output[0] if isinstance(output, tuple) else output)

    def _hooks(self, model: nn.Module) -> list[Any]:
        """Hook what the penalty observes: every decoder layer's output."""
        from qharness.models.layers import decoder_layers

        return [layer.register_forward_hook(self._record) for layer in decoder_layers(model)]

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[Any]:
        """Observe the penalized tensors while training; all hooks removed on exit."""
        handles = self._hooks(model)
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._terms.clear()

    def take(self) -> Tensor | None:
        """The penalty of the forward pass since the last call (None if none ran), and forget it."""
        import torch

        if not self._terms:
            return None
        value = self.strength * torch.stack(self._terms).mean()
        self._terms.clear()
        return value
