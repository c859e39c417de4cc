"""Module surgery every backend shares: put a module in place of another by name, turn GPT-2's Conv1D into the
nn.Linear it computes, run a module that computes in one dtype inside a model of another, and rotate a Linear's
input at run time (the rotate transform)."""

from __future__ import annotations

import torch
from torch import nn


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """transformers' Conv1D computes x @ W + b with W of shape (in, out): the same map as Linear with W.T."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where `name` is. A module accelerate placed (`--device-map`) carries a hook that moves its inputs to
    its execution device and, for offloaded weights, loads them by name for each forward: `new` gets a copy of it,
    so it runs where the old one ran and reads the same weights (sim's modules name theirs as a Linear does)."""
    import copy

    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    hook = getattr(getattr(parent, child), "_hf_hook", None)
    if hook is not None and getattr(new, "_hf_hook", None) is None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, copy.copy(hook))  # a copy: init_hook records the module's own tensors in it
    setattr(parent, child, new)


class DtypeBridge(nn.Module):
    """Runs a quantized Linear that only computes in `dtype` inside a model of another dtype."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype)).to(x.dtype)


class OnlineRotation(nn.Module):
    """x -> linear(x R): R is fused into `linear`'s weight offline, so the pair computes what `linear` alone did,
    while `linear` (and whatever later quantizes it) reads the rotated x."""

    def __init__(self, linear: nn.Linear, rotation: torch.Tensor) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("rotation", rotation.float().to(linear.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x.float() @ self.rotation).to(x.dtype))
