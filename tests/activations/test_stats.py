import math

import pytest
import torch

from qharness.activations.stats import is_massive, layer_stats, outlier_mask


def brute_force(h: torch.Tensor, k: int):
    values = [(abs(v), v, t, c) for t, row in enumerate(h.tolist()) for c, v in enumerate(row)]
    values.sort(key=lambda item: -item[0])
    magnitudes = sorted(item[0] for item in values)
    n = len(magnitudes)
    median = magnitudes[(n - 1) // 2]  # torch.median: the lower of the two middle values
    flat = [item[1] for item in values]
    mean = sum(flat) / n
    m2 = sum((x - mean) ** 2 for x in flat) / n
    m4 = sum((x - mean) ** 4 for x in flat) / n
    return values[0][0], median, m4 / m2**2, [(v, t, c) for _, v, t, c in values[:k]]


@pytest.mark.parametrize("seed", range(3))
def test_layer_stats_match_brute_force(seed):
    torch.manual_seed(seed)
    h = torch.randn(7, 11) * (seed + 1)
    h[3, 4] = -60.0
    stats = layer_stats(h, k=3)
    max_abs, median, kurtosis, top = brute_force(h.double(), 3)
    assert stats.max == pytest.approx(max_abs)
    assert stats.median == pytest.approx(median)
    assert stats.kurtosis == pytest.approx(kurtosis, rel=1e-5)  # fp32 moments
    assert [(e.value, e.position, e.channel) for e in stats.top] == [pytest.approx(t, rel=1e-6) for t in top]
    assert stats.top[0].position == 3 and stats.top[0].channel == 4 and stats.top[0].value == -60.0


def test_gaussian_kurtosis_is_about_three():
    torch.manual_seed(0)
    assert layer_stats(torch.randn(400, 500)).kurtosis == pytest.approx(3.0, abs=0.05)


@pytest.mark.parametrize(
    ("max_abs", "median", "expected"),
    [
        (100.0, 0.01, False),  # max must exceed 100
        (100.5, 0.1005, True),  # ratio exactly 1000 counts
        (100.5, 0.1006, False),  # ratio just under 1000
        (5000.0, 0.0, True),  # a zero median
        (50.0, 0.001, False),  # a huge ratio but small in absolute terms
    ],
)
def test_criterion_edges(max_abs, median, expected):
    assert is_massive(max_abs, median) is expected


def test_nonfinite_entries_are_counted_not_propagated():
    h = torch.ones(4, 4)
    h[1, 2] = float("inf")
    h[2, 3] = float("nan")
    stats = layer_stats(h)
    assert stats.nonfinite == 2 and math.isfinite(stats.max) and stats.max == 1.0


def test_outlier_mask_marks_entries_at_least_ratio_times_the_median():
    h = torch.ones(3, 5)
    h[0, 1] = 100.0
    h[2, 4] = 99.0
    assert outlier_mask(h, ratio=100).nonzero().tolist() == [[0, 1]]
