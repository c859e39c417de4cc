"""Target Variance Rescaling (arXiv 2503.17500) with layer-index-rescaled initialisation (LIR).

LIR: every 2-D weight inside decoder layer l (1-based) starts as N(0, sigma^2 / l).
TVR: every `interval` optimizer steps, each such weight whose std exceeds `threshold x target` is rescaled
    w <- (w - mean(w)) / std(w) * target + mean(w)
Embeddings, the LM head and the norms are outside the decoder layers' 2-D weights and are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from qharness.models.mitigations import MITIGATIONS, Mitigation

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class TVRConfig:
    target: float = 0.02  # the std weights are pulled back to (the paper: 0.01 to 0.02)
    threshold: float = 1.2  # rescale only weights whose std exceeds threshold x target
    interval: int = 50  # optimizer steps between rescales
    init_sigma: float = 0.02  # LIR: layer l starts at N(0, init_sigma^2 / l)


def decoder_matrices(model: nn.Module) -> list[tuple[int, nn.Parameter]]:
    """(1-based layer index, weight) for every 2-D weight inside the decoder layers."""
    from qharness.models.layers import decoder_layers

    return [(index, param) for index, layer in enumerate(decoder_layers(model), start=1)
            for param in layer.parameters() if param.dim() == 2]


def lir_init_(model: nn.Module, config: TVRConfig = TVRConfig()) -> None:
    import torch

    with torch.no_grad():
        for index, weight in decoder_matrices(model):
            weight.normal_(0.0, config.init_sigma / index**0.5)


def rescale_(model: nn.Module, targets: list[float], threshold: float) -> int:
    """One rescale pass, matrix i pulled back to std targets[i] if its std exceeds threshold x that; returns how many
    weights were rescaled."""
    import torch

    rescaled = 0
    with torch.no_grad():
        for (_, weight), target in zip(decoder_matrices(model), targets, strict=True):
            std = weight.std()
            if std > threshold * target:
                mean = weight.mean()
                weight.sub_(mean).div_(std).mul_(target).add_(mean)
                rescaled += 1
    return rescaled


def tvr_rescale_(model: nn.Module, config: TVRConfig = TVRConfig()) -> int:
    return rescale_(model, [config.target] * len(decoder_matrices(model)), config.threshold)


# A trained model's weights are far from TVR's 0.02 (SmolLM2-135M's 210 decoder matrices: std 0.047 to 0.40), and
# pulling them there would destroy it. Continued training keeps TVR's rule with each matrix's own pretrained std as
# its target: nothing changes at step 0, and the variance cannot grow past threshold x where it started.
RETROFIT_ATTRIBUTE = "qharness_tvr_targets"  # on the model object, for the run only: nothing to save or reload
RETROFIT_INTERVAL = 10  # continued training runs 40 steps by default (recipe.TUNE_TRAIN): 50 would never fire


def retrofit_tvr_(model: nn.Module, batches: list[torch.Tensor]) -> None:
    setattr(model, RETROFIT_ATTRIBUTE, [float(weight.detach().std()) for _, weight in decoder_matrices(model)])


def tvr_after_step(model: nn.Module, step: int, config: TVRConfig = TVRConfig()) -> int:
    """The training hook: rescale every `interval` steps (step counts from 1), to each matrix's own starting std
    when TVR was added to a trained model."""
    own = getattr(model, RETROFIT_ATTRIBUTE, None)
    if own is not None:
        return rescale_(model, own, config.threshold) if step % RETROFIT_INTERVAL == 0 else 0
    return tvr_rescale_(model, config) if step % config.interval == 0 else 0


MITIGATIONS.add("tvr", Mitigation(
    name="tvr",
    description="layer-index-rescaled init, and decoder weights pulled back to std 0.02 every 50 steps",
    reference="Target Variance Rescaling (arXiv 2503.17500)",
    init=lir_init_,
    after_step=tvr_after_step,
    retrofit=retrofit_tvr_,
))
