"""Clipped softmax (beyond the paper): attention probabilities stretched past [0, 1] and clipped, so a head reaches
exact zeros at finite logits instead of growing ever larger outliers to approach them (Bondarenko et al. 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qharness.models.mitigations import MITIGATIONS, Mitigation

if TYPE_CHECKING:
    import torch
    from torch import nn

RETROFIT_RAMP_STEPS = 10  # a quarter of the default continued training (recipe.TUNE_TRAIN: 40 steps)


def add_softmax_clip_(model: nn.Module) -> None:
    from qharness.models.attention import SoftmaxClip, use_mitigated_attention_
    from qharness.models.layers import attention_modules

    for attention in attention_modules(model):
        attention.softmax_clip = SoftmaxClip()
    use_mitigated_attention_(model)


def retrofit_softmax_clip_(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """gamma = 0 makes the clip the identity on probabilities, so the trained model computes what it did; a jump to
    -0.03 would zero every probability under 0.03 at once. It ramps there instead (`ramp_clips`). The ramp restarts
    from step 0's value on a resumed run until the next step's hook: a resume mid-ramp is off by one step's gamma."""
    from qharness.models.layers import attention_modules

    add_softmax_clip_(model)
    for attention in attention_modules(model):
        clip = attention.softmax_clip
        clip.target_gamma, clip.ramp_steps, clip.gamma = clip.gamma, RETROFIT_RAMP_STEPS, 0.0


def ramp_clips(model: nn.Module, step: int) -> None:
    from qharness.models.layers import attention_modules

    for attention in attention_modules(model):
        attention.softmax_clip.ramp_(step)


MITIGATIONS.add("clipped_softmax", Mitigation(
    name="clipped_softmax",
    description="clip((zeta - gamma) * softmax + gamma, 0, 1), gamma -0.03, zeta 1",
    reference="Bondarenko et al. 2023, Quantizable Transformers (arXiv 2306.12929)",
    build=add_softmax_clip_,
    after_step=ramp_clips,
    retrofit=retrofit_softmax_clip_,
))
