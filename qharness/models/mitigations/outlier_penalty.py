"""Activation-outlier penalty: a mitigation through the loss, not the architecture (the idea of TWEO, arXiv
2511.23225, and of the outlier regularizers Bondarenko et al. 2023 discuss). While training, every decoder layer's
output h adds

    strength * mean over layers of  mean over entries of  relu(|h| / threshold - 1)^2

to the next-token loss: entries below `threshold` cost nothing, so ordinary activations are free, and a massive one
(|h| = 25,000 against a threshold of 64) pays quadratically in how many times the threshold it is. It changes no
module, so it can be added to a pretrained model without changing the function it computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qharness.errors import ConfigError
from qharness.models.layers import decoder_layers
from qharness.models.mitigations import MITIGATIONS, Mitigation


@dataclass
class OutlierPenalty:
    threshold: float = 64.0  # |h| at or below this costs nothing
    strength: float = 1.0  # weight of the penalty against the next-token loss (0.05 barely moved SmolLM2's, 10 cost
    #                        38% more training loss: README, "Continued training")
    _terms: list[Tensor] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        # a threshold <= 0 divides by zero or penalizes every entry; a strength < 0 rewards massive activations
        if not (self.threshold > 0 and math.isfinite(self.threshold)):
            raise ConfigError(f"outlier_penalty threshold must be a number > 0 (the |h| that starts to cost), "
                              f"got {self.threshold}")
        if not (self.strength > 0 and math.isfinite(self.strength)):
            raise ConfigError(f"outlier_penalty strength must be a number > 0 (use --mitigation none for no "
                              f"penalty), got {self.strength}")

    def _record(self, module: nn.Module, args: object, output: object) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if torch.is_grad_enabled():  # the training forward, not the activation probe under no_grad
            self._terms.append((hidden.abs() / self.threshold - 1).relu().pow(2).mean())

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[OutlierPenalty]:
        """Observe every decoder layer's output while training; all hooks removed on exit."""
        handles = [layer.register_forward_hook(self._record) for layer in decoder_layers(model)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._terms.clear()

    def take(self) -> Tensor | None:
        """The penalty of the forward pass since the last call (None if none ran), and forget it."""
        if not self._terms:
            return None
        value = self.strength * torch.stack(self._terms).mean()
        self._terms.clear()
        return value


MITIGATIONS.add("outlier_penalty", Mitigation(
    name="outlier_penalty",
    description="loss += strength * mean relu(|h| / threshold - 1)^2 over decoder layer outputs (64, 1.0)",
    reference="after TWEO (arXiv 2511.23225) and Bondarenko et al. 2023 (arXiv 2306.12929)",
    penalty=lambda settings: OutlierPenalty(**(settings or {})),
    preserves_function=True,
))
