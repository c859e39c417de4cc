"""Clipped softmax (beyond the paper): attention probabilities stretched past [0, 1] and clipped, so a head reaches
exact zeros at finite logits instead of growing ever larger outliers to approach them (Bondarenko et al. 2023)."""

from __future__ import annotations

from torch import nn

from qharness.models.attention import SoftmaxClip, use_mitigated_attention_
from qharness.models.layers import attention_modules
from qharness.models.mitigations import MITIGATIONS, Mitigation


def add_softmax_clip_(model: nn.Module) -> None:
    for attention in attention_modules(model):
        attention.softmax_clip = SoftmaxClip()
    use_mitigated_attention_(model)


MITIGATIONS.add("clipped_softmax", Mitigation(
    name="clipped_softmax",
    description="clip((zeta - gamma) * softmax + gamma, 0, 1), gamma -0.03, zeta 1",
    reference="Bondarenko et al. 2023, Quantizable Transformers (arXiv 2306.12929)",
    build=add_softmax_clip_,
))
