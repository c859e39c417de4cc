"""Normalization layers the mitigations install in place of a model's own: DyT (mitigations/dyt.py says how it is
placed and fitted). Kept out of the mitigation's file so that registering mitigations imports no torch."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al. 2025, arXiv 2503.10622): gamma * tanh(alpha * x) + beta, alpha one scalar."""

    def __init__(self, dim: int, alpha_init: float = 0.5) -> None:  # 0.5: the paper's alpha_0 away from attention
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))
        self.weight = nn.Parameter(torch.ones(dim))  # gamma
        self.bias = nn.Parameter(torch.zeros(dim))  # beta

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias

    def extra_repr(self) -> str:
        return f"dim={self.weight.numel()}, alpha={self.alpha.item():.3g}"
