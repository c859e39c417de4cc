"""SmoothQuant (Xiao et al., ICML 2023, arXiv:2211.10438): move activation outliers into the weights.

A group of Linears reading the same X computes X W^T = (X diag(s)^-1) (W diag(s))^T for any positive s. Per input
channel j,
    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)
with max|X_j| measured on the calibration text (tasks/data/calibration.txt: the 8 x 256 tokens static schemes
calibrate on) and max|W_:,j| over every Linear of the group. alpha = 0.5 gives X and W the same per-channel
range; alpha = 1 flattens X's channels. The division by s is folded into the op that produces X, so nothing runs online:
- q/k/v_proj read input_layernorm and gate/up_proj read post_attention_layernorm: the norm's weight (and bias) is
  divided by s. These are the paper's two smoothed inputs.
- o_proj has no norm before it. Its input is attention's output, which is linear in v_proj's output channel by
  channel (softmax weights mix tokens, not channels), so v_proj's rows are divided by s instead. Under
  grouped-query attention the query heads that share a value head share its s, from the largest activation among
  them.
- down_proj reads act(gate) * up, linear in up_proj's output channel by channel: up_proj's rows are divided by s.
The paper leaves o_proj and fc2 unsmoothed (OPT's fc2 reads a ReLU); the last two pairs are AWQ's v->o and up->down,
exact for the reason given. They matter here: down_proj's input carries a GLU model's largest activations (the
"super activation" of Yu et al. 2024, arXiv:2411.07191).

Written here rather than taken from torchao.prototype.smoothquant or llm-compressor: torchao's smooths one Linear at
a time, keeps 1/s as an online multiply inside its own quantized tensor (`act_pre_scale`, so it runs only with
torchao's kernels, not with sim or the other backends) and stores every calibration input; llm-compressor is a
training-stack dependency this harness does not carry.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from qharness.core.errors import ConfigError
from qharness.quant.transforms import TRANSFORMS, Transform

if TYPE_CHECKING:  # torch is imported where it runs, so `qharness list` stays fast
    from torch import Tensor, nn

    from qharness.models.layers import BlockLayout

MIN_SCALE = 1e-5  # the paper's clamp on both ranges: a dead channel must not divide by zero


@contextmanager
def input_maxima(linears: list[nn.Linear]) -> Iterator[dict[nn.Linear, Tensor]]:
    """Per input channel max |x| of each Linear's input while the block runs; every hook is removed on exit. The
    statistic streams (a running max), so memory is one vector per Linear, never per token."""
    import torch

    maxima: dict[nn.Linear, Tensor] = {}

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).double()
        maxima[module] = torch.maximum(maxima[module], x) if module in maxima else x

    handles = [linear.register_forward_pre_hook(hook) for linear in linears]
    try:
        yield maxima
    finally:
        for handle in handles:
            handle.remove()


def smoothing_scale(act_max: Tensor, weight_max: Tensor, alpha: float) -> Tensor:
    return act_max.clamp(min=MIN_SCALE).pow(alpha) / weight_max.clamp(min=MIN_SCALE).pow(1 - alpha)


def _column_max(*linears: nn.Linear) -> Tensor:
    import torch

    return torch.cat([linear.weight.detach().double() for linear in linears]).abs().amax(dim=0)


def _scale_(tensor: Tensor | None, factor: Tensor, rows: bool = False) -> None:
    """tensor *= factor along its input columns (or, `rows`, along its output rows), computed in float64."""
    if tensor is not None:
        tensor.data.copy_((tensor.double() * (factor[:, None] if rows else factor)).to(tensor.dtype))


def _smooth_after_norm(norm: nn.Module, linears: list[nn.Linear], act_max: Tensor, alpha: float) -> None:
    s = smoothing_scale(act_max, _column_max(*linears), alpha)
    _scale_(norm.weight, 1 / s)
    _scale_(getattr(norm, "bias", None), 1 / s)
    for linear in linears:
        _scale_(linear.weight, s)


def _smooth_after_linear(producer: nn.Linear, consumer: nn.Linear, s: Tensor) -> None:
    """producer's output row j /= s_j and consumer's input column j *= s_j (an op between them is linear in j)."""
    _scale_(producer.weight, 1 / s, rows=True)
    _scale_(producer.bias, 1 / s, rows=True)
    _scale_(consumer.weight, s)


def _smooth_value_output(block: BlockLayout, act_max: Tensor, alpha: float) -> None:
    """v -> o: one s per value channel, shared by the query heads of its group."""
    groups = block.heads // block.kv_heads
    shape = (block.kv_heads, groups, block.head_dim)  # o_proj's input channels: query head h reads value head h // G
    s = smoothing_scale(act_max.reshape(shape).amax(dim=1), _column_max(block.o).reshape(shape).amax(dim=1), alpha)
    _scale_(block.v.weight, 1 / s.reshape(-1), rows=True)
    _scale_(block.v.bias, 1 / s.reshape(-1), rows=True)
    _scale_(block.o.weight, s[:, None, :].expand(shape).reshape(-1))


def smoothquant_(model: nn.Module, alpha: float | None, batches: list[Tensor]) -> None:
    import torch

    from qharness.models.layers import LLAMA_STYLE, llama_layout

    layout = llama_layout(model)
    if layout is None:
        raise ConfigError(f"transform 'smoothquant' supports {LLAMA_STYLE}; {type(model).__name__} is not one")
    alpha = 0.5 if alpha is None else alpha
    blocks = layout.blocks
    with input_maxima([linear for b in blocks for linear in (b.q, b.gate, b.o, b.down)]) as maxima, \
            torch.inference_mode():
        for input_ids in batches:
            model(input_ids=input_ids)
    # One calibration pass serves every pair: smoothing a pair changes only its consumer's input (to X / s, as
    # intended), never the residual stream or another pair's input.
    for b in blocks:
        _smooth_after_norm(b.attn_norm, [b.q, b.k, b.v], maxima[b.q], alpha)
        _smooth_after_norm(b.mlp_norm, [b.gate, b.up], maxima[b.gate], alpha)
        _smooth_value_output(b, maxima[b.o], alpha)
        _smooth_after_linear(b.up, b.down, smoothing_scale(maxima[b.down], _column_max(b.down), alpha))


TRANSFORMS.add("smoothquant", Transform(
    name="smoothquant",
    description="SmoothQuant: per-channel scales s = max|X|^alpha / max|W|^(1-alpha) folded into the norms, v_proj "
                "and up_proj (default alpha 0.5)",
    reference="Xiao et al. 2023, arXiv:2211.10438",
    apply=smoothquant_,
    argument="alpha",
    default=0.5,
))
