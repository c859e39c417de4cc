"""Per-unit results beside the leaderboard: written with the row, keyed by it, read back for intervals."""

import numpy as np
import pytest

from qharness.core.errors import DataError
from qharness.data.results import KEY_COLUMNS, make_row
from qharness.data.units import (
    Units,
    fp_key,
    interval_columns,
    read_units,
    store_units,
    units_dir,
    units_of,
    units_path,
    write_units,
)
from qharness.tasks.metrics import Metric


def row_key(quant: str = "int8-w8a8-token", backend: str = "sim", keep: str = "") -> tuple[str, ...]:
    row = make_row(model="m", quant=quant, backend=backend, keep=keep, task="kjv-heldout", metric="ppl", bos=True,
                   context_length=2048, limit=2)
    return tuple(row[c] for c in KEY_COLUMNS)


def ppl_metric(nll: np.ndarray, units_hash: str = "abc") -> Metric:
    return Metric("ppl", float(np.exp(nll.mean())), False, "token-level", len(nll), units=nll, units_hash=units_hash,
                  windows=2)


def test_units_round_trip_in_a_file_named_by_the_row_key(tmp_path):
    results = tmp_path / "leaderboard.csv"
    units = Units(np.linspace(0.5, 7.0, 300), "nll", "abc")
    path = write_units(results, row_key(), units)
    assert path.parent == units_dir(results) == tmp_path / "leaderboard.units" and path.suffix == ".npz"
    assert units_path(results, row_key()) != units_path(results, row_key(keep="pos:0"))
    back = read_units(results, row_key())
    assert back.kind == "nll" and back.units_hash == "abc"
    np.testing.assert_allclose(back.values, units.values, rtol=1e-7)  # stored as float32
    assert read_units(results, row_key(keep="pos:0")) is None  # never written: no interval, no error
    assert not list(units_dir(results).glob("*.tmp"))


def test_a_rerun_replaces_the_units_and_one_without_units_removes_them(tmp_path):
    results = tmp_path / "leaderboard.csv"
    store_units(results, row_key(), Units(np.zeros(10), "nll", "a"))
    store_units(results, row_key(), Units(np.ones(10), "nll", "a"))
    assert read_units(results, row_key()).values.tolist() == [1.0] * 10
    store_units(results, row_key(), None)
    assert read_units(results, row_key()) is None


def test_a_damaged_or_misplaced_units_file_is_a_one_line_error(tmp_path):
    results = tmp_path / "leaderboard.csv"
    path = write_units(results, row_key(), Units(np.zeros(10), "nll", "a"))
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a qharness units file"):
        read_units(results, row_key())
    other = write_units(results, row_key(keep="pos:0"), Units(np.zeros(10), "nll", "a"))
    path.write_bytes(other.read_bytes())
    with pytest.raises(DataError, match="another row"):
        read_units(results, row_key())


def test_fp_key_is_the_baseline_of_the_same_setting():
    baseline = fp_key(row_key(keep="pos:0"))
    assert baseline == row_key(quant="none", backend="", keep="")


def test_interval_columns_of_an_fp_row_a_quantized_row_and_an_unpaired_one():
    rng = np.random.default_rng(0)
    fp_nll = rng.gamma(2.0, 1.5, size=4094)
    fp = ppl_metric(fp_nll)
    fp_cols = interval_columns(fp, None, True, seed=0)
    assert fp_cols["ci_of"] == "value" and float(fp_cols["ci_low"]) < fp.value < float(fp_cols["ci_high"])
    assert fp_cols["windows"] == "2" and fp_cols["ci_blocks"] == "32" and fp_cols["ci_resamples"] == "2000"
    q = ppl_metric(fp_nll + 0.05 + rng.normal(0, 0.2, size=4094))
    cols = interval_columns(q, units_of(fp), False, seed=0)
    rel = q.value / fp.value - 1
    assert cols["ci_of"] == "rel_delta" and float(cols["ci_low"]) <= rel <= float(cols["ci_high"])
    assert "ci_low" not in interval_columns(q, None, False, seed=0)  # no fp units (an old leaderboard)
    other_tokens = ppl_metric(q.units, units_hash="other")
    assert "ci_low" not in interval_columns(other_tokens, units_of(fp), False, seed=0)  # never paired across texts


def test_accuracy_rows_carry_lm_evals_standard_error():
    scores = np.array([1.0, 0.0, 1.0, 1.0] * 10)
    metric = Metric("acc", float(scores.mean()), True, "zero-shot", 40, units=scores, units_hash="items")
    cols = interval_columns(metric, None, True, seed=0)
    assert float(cols["stderr"]) == pytest.approx(np.sqrt(0.75 * 0.25 / 39))
    assert cols["ci_of"] == "value" and cols["ci_blocks"] == "40" and cols["windows"] == ""


def test_units_files_get_the_mode_the_leaderboard_gets(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        path = write_units(tmp_path / "leaderboard.csv", row_key(), Units(np.zeros(3), "nll", "a"))
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600
