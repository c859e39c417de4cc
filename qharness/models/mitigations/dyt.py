"""Dynamic Tanh (Zhu et al. 2025, "Transformers without Normalization", arXiv 2503.10622): every normalization
layer becomes DyT(x) = gamma * tanh(alpha * x) + beta, with alpha one learnable scalar per layer. The paper found
alpha_0 = 1.0 best for the norms in front of attention and 0.5 elsewhere (the MLP and the output head); gamma
starts at 1 and beta at 0. tanh bounds every normalized value, which is what should starve massive activations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qharness.models.layers import decoder_layers, is_norm, norm_modules
from qharness.models.mitigations import MITIGATIONS, Mitigation, placed_like

ALPHA_ATTENTION = 1.0
ALPHA_OTHER = 0.5


class DyT(nn.Module):
    def __init__(self, dim: int, alpha_init: float = ALPHA_OTHER) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(dim))  # gamma
        self.bias = nn.Parameter(torch.zeros(dim))  # beta

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias

    def extra_repr(self) -> str:
        return f"dim={self.weight.numel()}, alpha={self.alpha.item():.3g}"


def attention_norms(model: nn.Module) -> set[int]:
    """ids of the norm in front of attention in each decoder layer: the first norm a layer registers (Llama's
    input_layernorm, GPT-2's ln_1, OPT's self_attn_layer_norm)."""
    firsts = set()
    for layer in decoder_layers(model):
        first = next((m for m in layer.modules() if m is not layer and is_norm(m)), None)
        if first is not None:
            firsts.add(id(first))
    return firsts


def apply_dyt_(model: nn.Module) -> int:
    """Replace every norm of `model` with DyT in place; returns how many were replaced."""
    before_attention = attention_norms(model)
    replaced = 0
    for name, norm in norm_modules(model).items():
        dim = norm.weight.numel() if getattr(norm, "weight", None) is not None else model.config.hidden_size
        alpha = ALPHA_ATTENTION if id(norm) in before_attention else ALPHA_OTHER
        parent, _, child = name.rpartition(".")
        reference = norm if getattr(norm, "weight", None) is not None else model  # a norm without affine weights
        setattr(model.get_submodule(parent), child, placed_like(DyT(dim, alpha), reference))
        replaced += 1
    return replaced


MITIGATIONS.add("dyt", Mitigation(
    name="dyt",
    description="every norm becomes gamma * tanh(alpha * x) + beta (alpha 1.0 before attention, 0.5 elsewhere)",
    reference="Zhu et al. 2025, Transformers without Normalization (arXiv 2503.10622)",
    build=apply_dyt_,
))
