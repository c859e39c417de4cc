"""Dynamic Tanh (Zhu et al. 2025, "Transformers without Normalization", arXiv 2503.10622): every normalization
layer becomes DyT(x) = gamma * tanh(alpha * x) + beta, with alpha one learnable scalar per layer. The paper found
alpha_0 = 1.0 best for the norms in front of attention and 0.5 elsewhere (the MLP and the output head); gamma
starts at 1 and beta at 0. tanh bounds every normalized value, which is what should starve massive activations.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from qharness.core.errors import ConfigError
from qharness.models.mitigations import MITIGATIONS, Mitigation, placed_like

if TYPE_CHECKING:
    from torch import Tensor, nn

    from qharness.models.norms import DyT

ALPHA_ATTENTION = 1.0
ALPHA_OTHER = 0.5


def __getattr__(name: str) -> Any:
    """`from qharness.models.mitigations.dyt import DyT` still works: the class lives in models/norms.py, imported
    on first use so that registering this mitigation loads no torch."""
    if name == "DyT":
        from qharness.models.norms import DyT

        return DyT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attention_norms(model: nn.Module) -> set[int]:
    """ids of the norm in front of attention in each decoder layer: the first norm a layer registers (Llama's
    input_layernorm, GPT-2's ln_1, OPT's self_attn_layer_norm)."""
    from qharness.models.layers import decoder_layers, is_norm

    firsts = set()
    for layer in decoder_layers(model):
        first = next((m for m in layer.modules() if m is not layer and is_norm(m)), None)
        if first is not None:
            firsts.add(id(first))
    return firsts


def apply_dyt_(model: nn.Module) -> int:
    """Replace every norm of `model` with DyT in place; returns how many were replaced."""
    from qharness.models.layers import norm_modules

    before_attention = attention_norms(model)
    replaced = 0
    for name, norm in norm_modules(model).items():
        replace_with_dyt_(model, name, norm, ALPHA_ATTENTION if id(norm) in before_attention else ALPHA_OTHER)
        replaced += 1
    if not replaced:
        raise ConfigError(f"dyt replaces normalization layers and {type(model).__name__} has none qharness "
                          "recognizes (torch's LayerNorm/RMSNorm or a class named *RMSNorm / *LayerNorm)")
    return replaced


def replace_with_dyt_(model: nn.Module, name: str, norm: nn.Module, alpha: float) -> DyT:
    """The norm called `name` becomes a DyT of its width, on its device and in its dtype."""
    from qharness.models.norms import DyT

    dim = norm.weight.numel() if getattr(norm, "weight", None) is not None else model.config.hidden_size
    reference = norm if getattr(norm, "weight", None) is not None else model  # a norm without affine weights
    parent, _, child = name.rpartition(".")
    dyt = placed_like(DyT(dim, alpha), reference)
    setattr(model.get_submodule(parent), child, dyt)
    return dyt


# The fit of a DyT to a trained norm: alpha on a log grid (10^-4 .. 10^1, 61 points), then gamma and beta per channel
# by least squares.
ALPHA_GRID = (-4.0, 1.0, 61)


class _Reached(Exception):
    """Raised by a pre-hook to stop a forward pass at the module whose input it wanted."""


def retrofit_dyt_(model: nn.Module, batches: list[Tensor]) -> None:
    """A norm divides each token by its own RMS and tanh cannot, so no DyT equals a trained norm. The DyTs are fitted
    one at a time in the order the forward pass reaches the norms, each on the inputs the model produces with every
    norm before it already replaced, to the outputs the original norm gave in the original model (alpha by grid;
    gamma, beta per channel by least squares): each DyT absorbs what it can of the drift of those below it, instead
    of being fitted to inputs the converted model no longer produces. The caller measures the function change, and
    continued training does the rest."""
    import torch

    with torch.no_grad():
        targets = norm_inputs_and_outputs(model, batches)  # in the order the forward pass reaches them
        for name, (_, y) in targets.items():
            x = input_of(model, name, batches)
            dyt = replace_with_dyt_(model, name, model.get_submodule(name), ALPHA_OTHER)
            fit_dyt_(dyt, x, y)


def input_of(model: nn.Module, name: str, batches: list[Tensor]) -> Tensor:
    """What the module called `name` receives on `batches` as the model is now, (tokens, channels) in fp32; each
    forward pass stops there."""
    import torch

    seen: list[Tensor] = []

    def stop(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        seen.append(args[0].flatten(0, -2).float())
        raise _Reached

    handle = model.get_submodule(name).register_forward_pre_hook(stop)
    try:
        for ids in batches:
            with contextlib.suppress(_Reached):
                model(input_ids=ids)
    finally:
        handle.remove()
    return torch.cat(seen)


def norm_inputs_and_outputs(model: nn.Module, batches: list[Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Qualified norm name -> (inputs, outputs), each (tokens, channels) in fp32, over all batches, in the order the
    forward pass reaches the norms."""
    import torch

    from qharness.models.layers import norm_modules

    seen: dict[str, list[tuple[Tensor, Tensor]]] = {}
    handles = [module.register_forward_hook(
        lambda m, args, out, name=name: seen.setdefault(name, []).append(
            (args[0].flatten(0, -2).float(), out.flatten(0, -2).float())))
        for name, module in norm_modules(model).items()]
    try:
        for ids in batches:
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])) for name, pairs in seen.items()}


def fit_dyt_(dyt: DyT, x: Tensor, y: Tensor) -> float:
    """Set dyt's alpha, gamma, beta to minimise the squared error to y over x; returns the relative residual."""
    import torch

    with torch.no_grad():
        return _fit(dyt, x, y, torch.logspace(*ALPHA_GRID[:2], int(ALPHA_GRID[2])).tolist())


def _fit(dyt: DyT, x: Tensor, y: Tensor, alphas: list[float]) -> float:
    import torch

    y_centered = y - y.mean(0)
    best = (float("inf"), 0.0, None, None)
    for alpha in alphas:
        t = torch.tanh(alpha * x)
        t_centered = t - t.mean(0)
        variance = t_centered.pow(2).sum(0).clamp_min(1e-12)
        gamma = (t_centered * y_centered).sum(0) / variance
        error = float((y_centered - gamma * t_centered).pow(2).sum())
        if error < best[0]:
            best = (error, alpha, gamma, y.mean(0) - gamma * t.mean(0))
    error, alpha, gamma, beta = best
    dyt.alpha.fill_(alpha)
    dyt.weight.copy_(gamma.to(dyt.weight.dtype))
    dyt.bias.copy_(beta.to(dyt.bias.dtype))
    return (error / float(y_centered.pow(2).sum().clamp_min(1e-12))) ** 0.5


MITIGATIONS.add("dyt", Mitigation(
    name="dyt",
    description="every norm becomes gamma * tanh(alpha * x) + beta (alpha 1.0 before attention, 0.5 elsewhere)",
    reference="Zhu et al. 2025, Transformers without Normalization (arXiv 2503.10622)",
    build=apply_dyt_,
    retrofit=retrofit_dyt_,
    version="sequential",  # fitted in forward order on the converted model's own inputs (was: all at once)
))
