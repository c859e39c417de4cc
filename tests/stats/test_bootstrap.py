"""The block bootstrap against closed-form cases and against simulated text with a known shift."""

import math

import numpy as np
import pytest

from qharness.stats import bootstrap


def ar1(rng: np.random.Generator, n: int, phi: float, sd: float) -> np.ndarray:
    """Autocorrelated noise like per-token NLL differences: e[t] = phi e[t-1] + innovation."""
    out = np.empty(n)
    out[0] = rng.normal(0, sd / math.sqrt(1 - phi**2))
    for t in range(1, n):
        out[t] = phi * out[t - 1] + rng.normal(0, sd)
    return out


def test_identical_models_give_exactly_zero():
    nll = np.random.default_rng(1).gamma(2.0, 1.5, size=3000)
    interval = bootstrap.rel_change_interval(nll, nll.copy())
    assert (interval.low, interval.high) == (0.0, 0.0)
    assert interval.blocks == math.ceil(3000 / 128) and interval.resamples == bootstrap.RESAMPLES


@pytest.mark.parametrize("shift", [0.03, -0.2, 0.85])
def test_a_constant_per_token_shift_gives_exactly_that_change(shift):
    fp = np.random.default_rng(2).gamma(2.0, 1.5, size=4094)
    interval = bootstrap.rel_change_interval(fp, fp + shift)
    assert interval.low == pytest.approx(math.expm1(shift), rel=1e-12)
    assert interval.high == pytest.approx(math.expm1(shift), rel=1e-12)


def test_ppl_interval_brackets_the_perplexity_and_a_constant_text_is_exact():
    nll = np.random.default_rng(3).gamma(2.0, 1.5, size=4094)
    interval = bootstrap.ppl_interval(nll)
    assert interval.low < math.exp(nll.mean()) < interval.high
    flat = bootstrap.ppl_interval(np.full(1000, 2.5))
    assert flat.low == pytest.approx(math.exp(2.5), rel=1e-12) and flat.high == pytest.approx(math.exp(2.5), rel=1e-12)


def coverage(block: int, replicates: int = 200, n: int = 4096, phi: float = 0.6, mu: float = 0.04) -> float:
    rng = np.random.default_rng(7)
    truth = math.expm1(mu)
    hits = 0
    for i in range(replicates):
        fp = rng.gamma(2.0, 1.5, size=n)
        q = fp + mu + ar1(rng, n, phi, 0.3)
        hits += bootstrap.rel_change_interval(fp, q, block=block, resamples=1000, seed=i).covers(truth)
    return hits / replicates


def test_block_intervals_cover_a_known_shift_95_percent_of_the_time():
    assert 0.90 <= coverage(bootstrap.BLOCK) <= 0.99


def test_resampling_single_tokens_undercovers_autocorrelated_text():
    """Why blocks: with phi 0.6 the variance of a mean is 4x what independent tokens would give, so an interval
    over single tokens is half as wide as it should be."""
    assert coverage(1, replicates=100) < 0.85


def test_same_seed_same_interval_other_seed_another():
    rng = np.random.default_rng(4)
    fp = rng.gamma(2.0, 1.5, size=2048)
    q = fp + 0.05 + ar1(rng, 2048, 0.3, 0.2)
    a, b = bootstrap.rel_change_interval(fp, q, seed=5), bootstrap.rel_change_interval(fp, q, seed=5)
    assert a == b
    assert bootstrap.rel_change_interval(fp, q, seed=6) != a


def test_short_texts_use_shorter_blocks_and_say_how_many():
    assert bootstrap.block_size(4094) == 128
    assert bootstrap.block_size(640) == 64  # fewer than 10 blocks of 128: 10 blocks of 64
    interval = bootstrap.rel_change_interval(np.zeros(640), np.full(640, 0.1))
    assert (interval.blocks, interval.block) == (10, 64)


def test_paired_difference_of_two_rows():
    rng = np.random.default_rng(8)
    fp = rng.gamma(2.0, 1.5, size=4094)
    a = fp + 0.05 + ar1(rng, 4094, 0.3, 0.2)
    same = bootstrap.rel_difference_interval(fp, a, fp, a.copy())
    assert (same.low, same.high) == (0.0, 0.0)
    shifted = bootstrap.rel_difference_interval(fp, fp + 0.1, fp, fp + 0.02)
    assert shifted.low == pytest.approx(math.expm1(0.1) - math.expm1(0.02), rel=1e-10)
    apart = bootstrap.rel_difference_interval(fp, a + 0.05, fp, a)
    assert apart.low > 0  # a real gap of 5 points is not noise
    # two models (a mitigation and its control), each against its own fp, on the same tokens
    other_fp = fp + ar1(rng, 4094, 0.3, 0.3)
    cross = bootstrap.rel_difference_interval(fp, fp + 0.1, other_fp, other_fp + 0.1)
    assert cross.low == pytest.approx(0.0, abs=1e-12) and cross.high == pytest.approx(0.0, abs=1e-12)


def test_recovered_share_of_a_loss():
    rng = np.random.default_rng(9)
    fp = rng.gamma(2.0, 1.5, size=4094)
    plain, fixed = fp + 0.4, fp + 0.1  # constant shifts: every resample gives the same share
    exact = bootstrap.recovered_interval(fp, plain, fixed)
    share = (math.expm1(0.4) - math.expm1(0.1)) / math.expm1(0.4)
    assert exact.low == pytest.approx(share, rel=1e-10) and exact.high == pytest.approx(share, rel=1e-10)
    noisy = bootstrap.recovered_interval(fp, fp + 0.3 + ar1(rng, 4094, 0.3, 0.3), fp + 0.15 + ar1(rng, 4094, 0.3, 0.3))
    truth = (math.expm1(0.3) - math.expm1(0.15)) / math.expm1(0.3)  # half the log-loss: 54% of the perplexity loss
    assert noisy.low < truth < noisy.high and noisy.high - noisy.low < 0.15
    assert bootstrap.recovered_interval(fp, fp + ar1(rng, 4094, 0.3, 0.3), fp) is None  # no loss in some resample


def test_item_bootstrap_and_lm_evals_standard_error():
    from lm_eval.api.metrics import mean_stderr

    scores = np.array([1, 0, 1, 1, 0, 1, 0, 1, 1, 1] * 20, dtype=float)
    p = scores.mean()
    assert bootstrap.standard_error(p, len(scores)) == pytest.approx(math.sqrt(p * (1 - p) / (len(scores) - 1)))
    assert bootstrap.standard_error(p, len(scores)) == pytest.approx(mean_stderr(list(scores)))
    interval = bootstrap.mean_interval(scores)
    assert interval.low < p < interval.high and interval.blocks == 200
    # the percentile interval of a mean is about +-1.96 standard errors
    assert interval.half_width == pytest.approx(1.96 * bootstrap.standard_error(p, len(scores)), rel=0.15)


def test_paired_item_change():
    fp = np.array([1, 0, 1, 1, 0, 1, 0, 1] * 25, dtype=float)
    same = bootstrap.ratio_change_interval(fp, fp.copy())
    assert (same.low, same.high) == (0.0, 0.0)
    worse = fp.copy()
    worse[::4] = 0
    interval = bootstrap.ratio_change_interval(fp, worse)
    assert interval.high < 0 and interval.covers(worse.mean() / fp.mean() - 1)
    assert bootstrap.ratio_change_interval(np.zeros(10), np.ones(10)) is None  # no relative change from 0
    tie = bootstrap.ratio_difference_interval(fp, worse, fp, worse.copy())
    assert (tie.low, tie.high) == (0.0, 0.0)
    assert bootstrap.ratio_difference_interval(fp, fp, fp, worse).low > 0


def test_autocorrelation_of_ar1_noise():
    values = ar1(np.random.default_rng(9), 20000, 0.5, 1.0)
    acf = bootstrap.autocorrelation(values, [1, 2, 8])
    assert acf[1] == pytest.approx(0.5, abs=0.03) and acf[2] == pytest.approx(0.25, abs=0.03)
    assert abs(acf[8]) < 0.03
