"""Statistics of one layer's output for one sequence, and the massive-activation criterion. Pure functions.

Criterion (Sun et al. 2024): a hidden state h of a decoder layer has massive activations when
max|h| > 100 and max|h| >= 1000 * median|h|. Small models rarely cross 100, so we report the continuous
quantities too (max, median, ratio, top-k with positions and channels, kurtosis) and call entries with
|h| >= OUTLIER_RATIO * median|h| outliers: the same structure at a scale small models reach.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MASSIVE_ABS = 100.0
MASSIVE_RATIO = 1000.0
OUTLIER_RATIO = 100.0


@dataclass(frozen=True)
class TopEntry:
    value: float  # signed
    position: int  # token index in the sequence
    channel: int


@dataclass(frozen=True)
class LayerStats:
    max: float  # max |h|
    median: float  # median |h|
    kurtosis: float  # Pearson kurtosis of all entries (3 for a Gaussian)
    top: tuple[TopEntry, ...]  # the k largest |h|, largest first
    nonfinite: int  # entries that are inf or NaN (fp16 overflows at 65504)

    @property
    def ratio(self) -> float:
        return self.max / self.median if self.median > 0 else float("inf")

    @property
    def is_massive(self) -> bool:
        return is_massive(self.max, self.median)


def is_massive(max_abs: float, median_abs: float, abs_threshold: float = MASSIVE_ABS,
               ratio_threshold: float = MASSIVE_RATIO) -> bool:
    """The paper's criterion: max > 100 and max >= 1000 x median (both inclusive of the ratio bound)."""
    return max_abs > abs_threshold and max_abs >= ratio_threshold * median_abs


def layer_stats(hidden: Tensor, k: int = 3) -> LayerStats:
    """`hidden`: one sequence's layer output, shape (T, C). Non-finite entries are counted, then ignored.
    fp32 throughout (the scan runs this once per layer and sequence; it must stay cheap next to the forward)."""
    h = hidden.detach().float()
    finite = torch.isfinite(h)
    nonfinite = 0 if bool(finite.all()) else int((~finite).sum())
    if nonfinite:
        h = torch.where(finite, h, torch.zeros_like(h))
    flat = h.flatten()
    magnitudes = flat.abs()
    values, indices = magnitudes.topk(min(k, flat.numel()))
    channels = h.shape[-1]
    top = tuple(TopEntry(float(flat[i]), int(i) // channels, int(i) % channels) for i in indices)
    centred = flat - flat.mean()
    squared = centred * centred
    variance = squared.mean()
    kurtosis = float((squared * squared).mean() / (variance * variance)) if variance > 0 else 0.0
    return LayerStats(float(values[0]), float(magnitudes.median()), kurtosis, top, nonfinite)


def outlier_mask(hidden: Tensor, ratio: float = OUTLIER_RATIO, median: float | None = None) -> Tensor:
    """Bool (T, C): entries at least `ratio` times the median magnitude (pass `median` if already known)."""
    magnitudes = hidden.detach().abs().float()
    return magnitudes >= ratio * (magnitudes.median() if median is None else median)
