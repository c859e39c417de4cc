"""Rank statistics for the comparator: Spearman's rho and a bootstrap interval for it. Written here because the
comparator needs two short functions and scipy is not a dependency (scipy.stats.spearmanr agrees; a test checks
the textbook formula)."""

from __future__ import annotations

import random


def rank(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2  # ties share their mean rank
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (Pearson on ranks, ties averaged); NaN when either side is constant."""
    rx, ry = rank(x), rank(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else float("nan")


def bootstrap_interval(x: list[float], y: list[float], resamples: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of Spearman's rho over (x, y) pairs resampled with replacement; resamples
    whose rho is undefined (a constant side) are dropped. Seeded: the same leaderboard gives the same interval."""
    rng = random.Random(seed)
    n = len(x)
    values = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        rho = spearman([x[i] for i in picks], [y[i] for i in picks])
        if rho == rho:
            values.append(rho)
    if not values:
        return float("nan"), float("nan")
    values.sort()
    tail = (1 - level) / 2
    return values[int(tail * (len(values) - 1))], values[int((1 - tail) * (len(values) - 1))]
