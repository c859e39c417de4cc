"""L_p magnitude loss on what W8A8 quantizes: the input of every Linear inside the decoder layers (GPT-2's Conv1D
included). While training,

    strength * mean over Linears of  mean over entries of  (|x| / threshold)^power

is added to the next-token loss, x being each Linear's input (q/k/v share one input and are counted once each, as
each quantizes it on its own). `lp_penalty` puts the same loss on the decoder layers' outputs, the residual stream,
which per-tensor W8A8 never quantizes: the norms divide it by each token's RMS before q/k/v and gate/up see it. What
a per-tensor activation scale does see is down_proj's input, the SwiGLU product where the massive activation is
born. Measured on one 1,024-token KJV window (benchmarks/linear_input_range.py), the 400-step control's largest
Linear inputs are 12-32 for q/k/v, o, gate/up and 2,919 for down_proj (BOS, layer 11; 105 on other tokens), and
after 400 steps of `lp_penalty` down_proj's still reach 112 on ordinary tokens in layer 29 (median entry 0.08):
keeping down_proj in full precision takes that model's per-tensor static INT8 cost from +19% to +6.5%. So this
penalty aims at the tensor the scheme quantizes.

The defaults are this harness's, not a paper's: threshold 8 (the other Linears' inputs stay below 32 in both models),
power 4, strength 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from qharness.models.mitigations import MITIGATIONS, Mitigation
from qharness.models.mitigations.lp_penalty import LpPenalty

if TYPE_CHECKING:
    from torch import nn


@dataclass
class LpInputPenalty(LpPenalty):
    threshold: float = 8.0  # tau: the |x| that costs 1
    power: float = 4.0
    strength: float = 1.0
    name: ClassVar[str] = "lp_input_penalty"
    observed: ClassVar[str] = "|x| of a Linear's input"

    def _record_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._observe(args[0])

    def _hooks(self, model: nn.Module) -> list[Any]:
        from torch import nn
        from transformers.pytorch_utils import Conv1D

        from qharness.core.errors import ConfigError
        from qharness.models.layers import decoder_layers

        # GPT-2's projections are transformers' Conv1D (a Linear with its weight transposed)
        handles = [linear.register_forward_pre_hook(self._record_input) for layer in decoder_layers(model)
                   for linear in layer.modules() if isinstance(linear, nn.Linear | Conv1D)]
        if not handles:  # nothing to penalize: training would be the control under this mitigation's name
            raise ConfigError(f"{self.name}: the decoder layers of this {type(model).__name__} hold no Linear "
                              "(nn.Linear or Conv1D) whose input it could penalize")
        return handles


MITIGATIONS.add("lp_input_penalty", Mitigation(
    name="lp_input_penalty",
    description="loss += strength * mean (|x| / threshold)^power over every decoder Linear's input (8, 4, 1.0)",
    reference="lp_penalty aimed at the tensors W8A8 quantizes (down_proj's input above all); constants are this "
              "harness's",
    penalty=lambda settings: LpInputPenalty(**(settings or {})),
    settings=("threshold", "power", "strength"),
    preserves_function=True,
))
