"""L_p activation-magnitude loss: a mitigation through the loss, of the kind TWEO (arXiv 2511.23225) proposes. While
training, every decoder layer's output h adds

    strength * mean over layers of  mean over entries of  (|h| / threshold)^power

to the next-token loss. Unlike `outlier_penalty` nothing is free: an entry at the threshold costs 1, one at half of
it 1/16 (power 4) or 1/256 (power 8), and one at 400x the threshold 400^power, so the gradient goes almost entirely
to the largest entries, and a higher power makes that selection sharper. It changes no module, so it can be added to
a pretrained model without changing the function it computes.

This is not called TWEO: the paper's own text (its formula and constants) could not be read here, so neither is
claimed. The defaults are this harness's: threshold 64, the |h| where `outlier_penalty` starts to cost (SmolLM2-135M's
layer outputs have medians of 0.6 to 18 and 99.9th percentiles of 18 to 540 across its 30 layers, and a BOS entry of
about 27,000 from layer 11 on); power 4; strength 1. Measured on two 256-token calibration sequences, the unweighted
term starts at 8.7e4 there (threshold 64, power 4) against a next-token loss of 3.6; gradient clipping and AdamW's
per-parameter scaling keep such a start from being a step of that size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from qharness.models.mitigations import MITIGATIONS, Mitigation
from qharness.models.penalty import LayerPenalty, check_positive

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class LpPenalty(LayerPenalty):
    threshold: float = 64.0  # tau: the |h| that costs 1
    power: float = 4.0  # p: how sharply the cost grows past the threshold (try 4 and 8)
    strength: float = 1.0  # weight of the penalty against the next-token loss
    name: ClassVar[str] = "lp_penalty"  # the mitigation, for its refusals
    observed: ClassVar[str] = "|h|"  # what it penalizes, for its refusals

    def __post_init__(self) -> None:
        check_positive(self.name, "threshold", self.threshold, f"the {self.observed} that costs 1")
        check_positive(self.name, "power", self.power, "e.g. 4 or 8")
        check_positive(self.name, "strength", self.strength, "use --mitigation none for no penalty")

    def term(self, hidden: Tensor) -> Tensor:
        # in fp32: under bf16 autocast (|h| / 64)^8 keeps its range but loses the digits the mean needs
        return (hidden.float().abs() / self.threshold).pow(self.power).mean()


MITIGATIONS.add("lp_penalty", Mitigation(
    name="lp_penalty",
    description="loss += strength * mean (|h| / threshold)^power over decoder layer outputs (64, 4, 1.0)",
    reference="an L_p magnitude loss of the kind TWEO proposes (arXiv 2511.23225); constants are this harness's",
    penalty=lambda settings: LpPenalty(**(settings or {})),
    settings=("threshold", "power", "strength"),
    preserves_function=True,
))
