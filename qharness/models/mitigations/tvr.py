"""Target Variance Rescaling (arXiv 2503.17500) with layer-index-rescaled initialisation (LIR).

LIR: every 2-D weight inside decoder layer l (1-based) starts as N(0, sigma^2 / l).
TVR: every `interval` optimizer steps, each such weight whose std exceeds `threshold x target` is rescaled
    w <- (w - mean(w)) / std(w) * target + mean(w)
Embeddings, the LM head and the norms are outside the decoder layers' 2-D weights and are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qharness.models.layers import decoder_layers
from qharness.models.mitigations import MITIGATIONS, Mitigation


@dataclass(frozen=True)
class TVRConfig:
    target: float = 0.02  # the std weights are pulled back to (the paper: 0.01 to 0.02)
    threshold: float = 1.2  # rescale only weights whose std exceeds threshold x target
    interval: int = 50  # optimizer steps between rescales
    init_sigma: float = 0.02  # LIR: layer l starts at N(0, init_sigma^2 / l)


def decoder_matrices(model: nn.Module) -> list[tuple[int, nn.Parameter]]:
    """(1-based layer index, weight) for every 2-D weight inside the decoder layers."""
    return [(index, param) for index, layer in enumerate(decoder_layers(model), start=1)
            for param in layer.parameters() if param.dim() == 2]


@torch.no_grad()
def lir_init_(model: nn.Module, config: TVRConfig = TVRConfig()) -> None:
    for index, weight in decoder_matrices(model):
        weight.normal_(0.0, config.init_sigma / index**0.5)


@torch.no_grad()
def tvr_rescale_(model: nn.Module, config: TVRConfig = TVRConfig()) -> int:
    """One rescale pass; returns how many weights were rescaled."""
    rescaled = 0
    for _, weight in decoder_matrices(model):
        std = weight.std()
        if std > config.threshold * config.target:
            mean = weight.mean()
            weight.sub_(mean).div_(std).mul_(config.target).add_(mean)
            rescaled += 1
    return rescaled


def tvr_after_step(model: nn.Module, step: int, config: TVRConfig = TVRConfig()) -> int:
    """The training hook: rescale every `interval` steps (step counts from 1)."""
    return tvr_rescale_(model, config) if step % config.interval == 0 else 0


MITIGATIONS.add("tvr", Mitigation(
    name="tvr",
    description="layer-index-rescaled init, and decoder weights pulled back to std 0.02 every 50 steps",
    reference="Target Variance Rescaling (arXiv 2503.17500)",
    init=lir_init_,
    after_step=tvr_after_step,
))
