"""Gated attention (beyond the paper): a sigmoid gate on each head's output lets a head do nothing without an
attention sink, reported to remove massive activations (Qiu et al. 2025; Bondarenko et al. 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qharness.models.mitigations import MITIGATIONS, Mitigation, placed_like

if TYPE_CHECKING:
    import torch
    from torch import nn

SCALE_KEY = "qharness_gate_scale"  # in the config, so a reloaded retrofitted model rebuilds its gates alike
RETROFIT_SCALE = 2.0


def add_attention_gate_(model: nn.Module) -> None:
    from qharness.models.attention import AttentionGate, stash_gate_input, use_mitigated_attention_
    from qharness.models.layers import attention_modules

    config = model.config
    scale = float(getattr(config, SCALE_KEY, 1.0))
    for attention in attention_modules(model):
        gate = AttentionGate(config.hidden_size, config.num_attention_heads, attention.head_dim, scale)
        attention.gate = placed_like(gate, attention)
        attention.register_forward_pre_hook(stash_gate_input, with_kwargs=True)
    use_mitigated_attention_(model)


def retrofit_attention_gate_(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Gates 2 * sigmoid(0) = 1 exactly: the trained model's attention passes through unchanged, and each gate learns
    from sigmoid's steepest point. (A bias of +20 would also give 1.0 in fp32, but with a slope of 2e-9: no gate
    would ever learn.)"""
    import torch

    from qharness.models.layers import attention_modules

    setattr(model.config, SCALE_KEY, RETROFIT_SCALE)
    add_attention_gate_(model)
    with torch.no_grad():
        for attention in attention_modules(model):
            attention.gate.proj.weight.zero_()
            attention.gate.proj.bias.zero_()


MITIGATIONS.add("gated_attention", Mitigation(
    name="gated_attention",
    description="attention output * sigmoid(W x + b), elementwise per head, x the attention input",
    reference="Qiu et al. 2025, Gated Attention for LLMs (arXiv 2505.06708); Bondarenko et al. 2023 (2306.12929)",
    build=add_attention_gate_,
    retrofit=retrofit_attention_gate_,
))
