"""Intervals on every number: a seeded, paired block bootstrap over per-token NLLs and an item bootstrap over
per-item scores. Pure numpy: no model, nothing recomputed (the units come from the leaderboard's units files).

Perplexity. A quantized row's `rel_delta` is ppl_q / ppl_fp - 1 = exp(mean_t(nll_q[t] - nll_fp[t])) - 1 over the
same predicted tokens, so the natural unit is the per-token NLL difference d[t], and pairing (both models on the
same tokens) removes the text's own difficulty from the spread. Tokens are not independent: the text evaluated is
4 (KJV) or 7 (WordNet) windows of 2,047 tokens, and many findings use 2, so resampling windows is degenerate and
resampling tokens understates the spread. We resample non-overlapping contiguous blocks of BLOCK tokens (Kunsch
1989's block bootstrap, non-overlapping variant of Carlstein 1986), with replacement, and take the percentile
interval of exp(sum d / sum count) - 1 over the resamples (percentile bootstrap: no bias correction, no
acceleration; at these sample sizes the statistic is close to symmetric and the coverage test below holds).

Why 128 tokens. Measured on SmolLM2-135M, fp32, the first 2 windows (4,094 tokens) of each held-out text, by
`benchmarks/intervals.py` from the units files of a real `qharness run` (2026-12-04):

    autocorrelation of d[t]          lag 1   lag 2   lag 4   lag 8   lag 16  lag 32  1 + 2 sum(lags 1..127)
    kjv      int8-w8a8-token         +0.025  +0.020  -0.015  -0.016  -0.005  +0.008  1.42
    wordnet  int8-w8a8-token         +0.028  -0.000  -0.021  +0.002  +0.009  -0.019  1.09
    kjv      int8-w8a8-tensor        +0.021  +0.021  +0.033  +0.027  +0.028  -0.016  2.82
    wordnet  int8-w8a8-tensor        +0.087  +0.027  +0.016  +0.001  +0.004  +0.019  1.96

    half-width of the interval (pts)  block 1  block 8  block 32  block 64  block 128  block 256
    kjv      int8-w8a8-token          0.91     0.91     0.88      0.87      1.00       0.83
    kjv      int8-w8a8-tensor         10.18    11.00    13.86     13.13     15.52      15.88
    wordnet  int8-w8a8-tensor         13.10    14.88    15.41     15.04     15.87      18.93

Each lag alone is small (within the +-0.031 that independent tokens give, but for lag 1 of WordNet under
per-tensor INT8), but under the severe scheme the small positive correlations persist over tens of tokens and add
up: the variance of a mean is 2-3x what independent tokens give, and an interval over single tokens would be a
third too narrow (10.2 against 15.5 points). The half-width grows with the block length up to about 32-128 tokens
and levels off there; the mild scheme shows little (flat at 0.9-1.0). 128 tokens is past where it levels
off, and 2 windows still hold 32 blocks. A text too short for MIN_BLOCKS blocks of 128 uses shorter blocks
(T // MIN_BLOCKS tokens); the row records how many blocks and resamples its interval used. The coverage test
(tests/stats/test_bootstrap.py) checks 95% on simulated autocorrelated differences with a known shift.

Zero-shot. Items are independent draws, so they are resampled one by one (paired across rows on the same items);
beside the interval, lm-eval's standard error of a mean, sqrt(p (1 - p) / (n - 1)), so the two can be read side by
side with lm-eval's own output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 128  # tokens per block (see the module docstring for the measured autocorrelation behind it)
MIN_BLOCKS = 10  # fewer blocks than this and blocks shrink: a bootstrap over a handful of blocks is degenerate
RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    blocks: int  # resampling units: blocks of tokens, or items
    resamples: int
    block: int = 1  # tokens per block (1 for items)

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high


def block_size(n: int, block: int = BLOCK) -> int:
    """`block` tokens, or shorter when `n` tokens hold fewer than MIN_BLOCKS such blocks."""
    return block if n >= block * MIN_BLOCKS else max(1, n // MIN_BLOCKS)


def block_sums(values: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum, count) of each non-overlapping run of `block` values; the last block holds the remainder."""
    starts = np.arange(0, len(values), block)
    return np.add.reduceat(values, starts), np.diff(np.append(starts, len(values))).astype(np.float64)


def _draws(n_units: int, resamples: int, seed: int, chunk: int) -> list[np.ndarray]:
    """Unit indices drawn with replacement, `chunk` resamples at a time (bounded memory for 10,000-item tasks);
    the same seed gives the same draws."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n_units, size=(min(chunk, resamples - start), n_units))
            for start in range(0, resamples, chunk)]


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return float(low), float(high)


def _check_paired(*arrays: np.ndarray) -> int:
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"paired units differ in length: {sorted(lengths)}")  # a caller's bug: check pairing first
    (n,) = lengths
    if n == 0:
        raise ValueError("no units to resample")
    return n


def _block_means(columns: list[np.ndarray], block: int, resamples: int, seed: int) -> tuple[np.ndarray, int]:
    """Each column's mean over every block resample, the same blocks for every column (the pairing):
    (len(columns), resamples) means and the number of blocks."""
    n = _check_paired(*columns)
    size = block_size(n, block)
    sums = [block_sums(np.asarray(c, dtype=np.float64), size) for c in columns]
    counts = sums[0][1]
    chunk = max(1, 4_000_000 // len(counts))
    means = [np.concatenate([s[draws].sum(axis=1) / counts[draws].sum(axis=1)
                             for draws in _draws(len(counts), resamples, seed, chunk)]) for s, _ in sums]
    return np.stack(means), len(counts)


def rel_change_interval(fp_nll: np.ndarray, q_nll: np.ndarray, *, block: int = BLOCK, resamples: int = RESAMPLES,
                        seed: int = 0, level: float = LEVEL) -> Interval:
    """The interval of ppl_q / ppl_fp - 1 from the per-token NLLs of both models on the same tokens."""
    diff = np.asarray(q_nll, dtype=np.float64) - np.asarray(fp_nll, dtype=np.float64)
    (means,), blocks = _block_means([diff], block, resamples, seed)
    low, high = _percentiles(np.expm1(means), level)
    return Interval(low, high, blocks, resamples, block_size(len(diff), block))


def ppl_interval(nll: np.ndarray, *, block: int = BLOCK, resamples: int = RESAMPLES, seed: int = 0,
                 level: float = LEVEL) -> Interval:
    """The interval of one model's perplexity exp(mean nll) (an fp row's own interval)."""
    (means,), blocks = _block_means([np.asarray(nll)], block, resamples, seed)
    low, high = _percentiles(np.exp(means), level)
    return Interval(low, high, blocks, resamples, block_size(len(nll), block))


def rel_difference_interval(fp_a: np.ndarray, q_a: np.ndarray, fp_b: np.ndarray, q_b: np.ndarray, *,
                            block: int = BLOCK, resamples: int = RESAMPLES, seed: int = 0,
                            level: float = LEVEL) -> Interval:
    """The interval of rel_a - rel_b, two rows' perplexity changes (each against its own fp row, which may be the
    same one), all four on the same tokens: one fix against another, a kept-Linears pair, a mitigation against
    its control. The same blocks are drawn for every model, which is what makes the difference tight."""
    fp_a, fp_b = np.asarray(fp_a, dtype=np.float64), np.asarray(fp_b, dtype=np.float64)
    (da, db), blocks = _block_means([np.asarray(q_a) - fp_a, np.asarray(q_b) - fp_b], block, resamples, seed)
    low, high = _percentiles(np.expm1(da) - np.expm1(db), level)
    return Interval(low, high, blocks, resamples, block_size(len(fp_a), block))


def recovered_interval(fp_nll: np.ndarray, q_plain: np.ndarray, q_fixed: np.ndarray, *, block: int = BLOCK,
                       resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval | None:
    """The interval of (rel_plain - rel_fixed) / rel_plain, the share of a scheme's perplexity loss that a fix (keep
    BOS, a transform, kept Linears) takes back, all three on the same tokens and the same blocks; None when some
    resample shows no loss to recover (rel_plain <= 0), where the share means nothing."""
    fp = np.asarray(fp_nll, dtype=np.float64)
    (plain, fixed), blocks = _block_means([np.asarray(q_plain) - fp, np.asarray(q_fixed) - fp], block, resamples,
                                          seed)
    rel_plain, rel_fixed = np.expm1(plain), np.expm1(fixed)
    if np.any(rel_plain <= 0):
        return None
    low, high = _percentiles((rel_plain - rel_fixed) / rel_plain, level)
    return Interval(low, high, blocks, resamples, block_size(len(fp), block))


def mean_interval(scores: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """The item bootstrap of a mean score (an accuracy)."""
    (means,), items = _block_means([np.asarray(scores)], 1, resamples, seed)
    low, high = _percentiles(means, level)
    return Interval(low, high, items, resamples)


def ratio_change_interval(fp_scores: np.ndarray, q_scores: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0,
                          level: float = LEVEL) -> Interval | None:
    """The paired item bootstrap of mean(q) / mean(fp) - 1 (a zero-shot row's rel_delta); None when some resample
    has an fp mean of 0 (an fp accuracy of 0 gives no relative change)."""
    (fp, q), items = _block_means([np.asarray(fp_scores), np.asarray(q_scores)], 1, resamples, seed)
    if np.any(fp == 0):
        return None
    low, high = _percentiles(q / fp - 1, level)
    return Interval(low, high, items, resamples)


def ratio_difference_interval(fp_a: np.ndarray, q_a: np.ndarray, fp_b: np.ndarray, q_b: np.ndarray, *,
                              resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval | None:
    """rel_a - rel_b for two zero-shot rows (each against its own fp row) on the same items."""
    (fa, a, fb, b), items = _block_means([np.asarray(x) for x in (fp_a, q_a, fp_b, q_b)], 1, resamples, seed)
    if np.any(fa == 0) or np.any(fb == 0):
        return None
    low, high = _percentiles(a / fa - b / fb, level)
    return Interval(low, high, items, resamples)


def standard_error(p: float, n: int) -> float | None:
    """lm-eval's standard error of a mean of 0/1 scores: sqrt(p (1 - p) / (n - 1)) (its `mean_stderr`, the sample
    standard deviation over sqrt(n)); None for fewer than 2 items."""
    return float(np.sqrt(p * (1 - p) / (n - 1))) if n >= 2 else None


def autocorrelation(values: np.ndarray, lags: list[int]) -> dict[int, float]:
    """The sample autocorrelation of `values` at each lag (the estimator with the overall mean and variance)."""
    x = np.asarray(values, dtype=np.float64) - np.mean(values)
    variance = float(np.dot(x, x))
    return {lag: float(np.dot(x[:-lag], x[lag:]) / variance) if variance and lag < len(x) else float("nan")
            for lag in lags}
