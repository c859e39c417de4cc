"""The paper's intervention: at the first layer with massive activations, set the massive channels of that layer's
output to zero, or to their mean over calibration sequences (one mean for position 0, one for the other positions),
and measure perplexity. If the model needs those values, zeroing them destroys it while the mean keeps it intact
(LLaMA-2-7B 5.13 -> 8976.89 -> 5.13 in the paper); if not (GPT-2), neither matters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from qharness.activations.scan import layer_output

Mode = Literal["zero", "mean"]


def replaced(hidden: Tensor, channels: list[int], mode: Mode, mean_first: list[float] | None = None,
             mean_rest: list[float] | None = None) -> Tensor:
    """A copy of `hidden` (B, T, C) with `channels` set to zero or to the given means; nothing else changes."""
    out = hidden.clone()
    if mode == "zero":
        out[..., channels] = 0
        return out
    out[:, 0, channels] = torch.tensor(mean_first, dtype=out.dtype, device=out.device)
    out[:, 1:, channels] = torch.tensor(mean_rest, dtype=out.dtype, device=out.device)
    return out


@contextlib.contextmanager
def intervention(layer: nn.Module, channels: list[int], mode: Mode, mean_first: list[float] | None = None,
                 mean_rest: list[float] | None = None) -> Iterator[None]:
    """While active, `layer`'s output has `channels` replaced as `replaced` says."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        new = replaced(layer_output(output), channels, mode, mean_first, mean_rest)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
