"""Gated attention (beyond the paper): a sigmoid gate on each head's output lets a head do nothing without an
attention sink, reported to remove massive activations (Qiu et al. 2025; Bondarenko et al. 2023)."""

from __future__ import annotations

from torch import nn

from qharness.models.attention import AttentionGate, stash_gate_input, use_mitigated_attention_
from qharness.models.layers import attention_modules
from qharness.models.mitigations import MITIGATIONS, Mitigation, placed_like


def add_attention_gate_(model: nn.Module) -> None:
    config = model.config
    for attention in attention_modules(model):
        gate = AttentionGate(config.hidden_size, config.num_attention_heads, attention.head_dim)
        attention.gate = placed_like(gate, attention)
        attention.register_forward_pre_hook(stash_gate_input, with_kwargs=True)
    use_mitigated_attention_(model)


MITIGATIONS.add("gated_attention", Mitigation(
    name="gated_attention",
    description="attention output * sigmoid(W x + b), elementwise per head, x the attention input",
    reference="Qiu et al. 2025, Gated Attention for LLMs (arXiv 2505.06708); Bondarenko et al. 2023 (2306.12929)",
    build=add_attention_gate_,
))
