"""Activation-outlier penalty: a mitigation through the loss, not the architecture (the idea of TWEO, arXiv
2511.23225, and of the outlier regularizers Bondarenko et al. 2023 discuss). While training, every decoder layer's
output h adds

    strength * mean over layers of  mean over entries of  relu(|h| / threshold - 1)^2

to the next-token loss: entries below `threshold` cost nothing, so ordinary activations are free, and a massive one
(|h| = 25,000 against a threshold of 64) pays quadratically in how many times the threshold it is. It changes no
module, so it can be added to a pretrained model without changing the function it computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qharness.models.mitigations import MITIGATIONS, Mitigation
from qharness.models.penalty import LayerPenalty, check_positive

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class OutlierPenalty(LayerPenalty):
    threshold: float = 64.0  # |h| at or below this costs nothing
    strength: float = 1.0  # weight of the penalty against the next-token loss (0.05 barely moved SmolLM2's, 10 cost
    #                        38% more training loss: README, "Continued training")

    def __post_init__(self) -> None:
        # a threshold <= 0 divides by zero or penalizes every entry; a strength < 0 rewards massive activations
        check_positive("outlier_penalty", "threshold", self.threshold, "the |h| that starts to cost")
        check_positive("outlier_penalty", "strength", self.strength, "use --mitigation none for no penalty")

    def term(self, hidden: Tensor) -> Tensor:
        return (hidden.abs() / self.threshold - 1).relu().pow(2).mean()


MITIGATIONS.add("outlier_penalty", Mitigation(
    name="outlier_penalty",
    description="loss += strength * mean relu(|h| / threshold - 1)^2 over decoder layer outputs (64, 1.0)",
    reference="after TWEO (arXiv 2511.23225) and Bondarenko et al. 2023 (arXiv 2306.12929)",
    penalty=lambda settings: OutlierPenalty(**(settings or {})),
    settings=("threshold", "strength"),
    preserves_function=True,
))
