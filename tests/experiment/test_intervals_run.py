"""Intervals through a whole run on the tiny model: units written with the rows, paired intervals on the rows,
the CLI prints them, --force rewrites them, and a leaderboard without units still runs (no interval)."""

import json
import re

import numpy as np
import pytest
from tiny_runs import run, spec_for

from qharness.cli import main
from qharness.data.results import key, read_rows
from qharness.data.units import fp_key, read_units, units_dir, units_path
from qharness.experiment.settings import RunSettings


def test_quantized_rows_carry_a_paired_interval_around_their_change(tiny_model_dir, tiny_task_dir, tmp_path):
    results = tmp_path / "leaderboard.csv"
    report = run(spec_for(tiny_model_dir, tiny_task_dir, results, quants=("int8-w8a8-token", "int8-w8a8-tensor")),
                 say=lambda m: None)
    fp, *quantized = report.rows
    assert fp["ci_of"] == "value" and float(fp["ci_low"]) < float(fp["value"]) < float(fp["ci_high"])
    for row in quantized:
        assert row["ci_of"] == "rel_delta"
        assert float(row["ci_low"]) <= float(row["rel_delta"]) <= float(row["ci_high"])
        assert float(row["ci_low"]) < float(row["ci_high"])
        assert int(row["ci_blocks"]) >= 10 and row["ci_resamples"] == "2000" and row["windows"]
    assert read_rows(results) == report.rows  # what is printed is what is stored
    # the units are the per-token NLLs: their mean gives the row's perplexity back, nothing recomputed
    for row in report.rows:
        units = read_units(results, key(row))
        assert len(units.values) == int(row["n"])
        assert np.exp(units.values.mean()) == pytest.approx(float(row["value"]), rel=1e-5)
    assert len(list(units_dir(results).glob("*.npz"))) == 3
    assert fp_key(key(quantized[0])) == key(fp)


def test_force_rewrites_the_units_and_old_rows_without_units_still_run(tiny_model_dir, tiny_task_dir, tmp_path):
    results = tmp_path / "leaderboard.csv"
    spec = spec_for(tiny_model_dir, tiny_task_dir, results)
    fp, q = run(spec, say=lambda m: None).rows
    path = units_path(results, key(q))
    path.write_bytes(b"stale")
    forced = run(spec_for(tiny_model_dir, tiny_task_dir, results, force=True), say=lambda m: None)
    assert read_units(results, key(q)) is not None and forced.rows[1]["ci_low"] == q["ci_low"]  # same seed
    # an older leaderboard: its fp row has no units file; a new scheme on it runs and gets no interval
    units_path(results, key(fp)).unlink()
    more = run(spec_for(tiny_model_dir, tiny_task_dir, results, quants=("int8-w8a8-tensor",)), say=lambda m: None)
    assert more.computed == 1 and more.rows[1]["ci_low"] == "" and more.rows[1]["rel_delta"]


def test_cli_prints_the_interval_beside_the_change(capsys, tiny_model_dir, tiny_task_dir, tmp_path):
    results = tmp_path / "lb.csv"
    assert main(["run", "--model", str(tiny_model_dir), "--task", str(tiny_task_dir / "short.yaml"),
                 "--results", str(results), "--quiet"]) == 0
    out = capsys.readouterr().out
    q = next(line for line in out.splitlines() if "int8-w8a8-token" in line)
    match = re.search(r"([+-]\d+\.\d\d)% \[([+-]\d+\.\d\d), ([+-]\d+\.\d\d)\]", q)
    assert match, q
    rel, low, high = map(float, match.groups())
    assert low <= rel <= high
    row = read_rows(results)[1]
    assert float(row["ci_low"]) * 100 == pytest.approx(low, abs=0.006)


def test_zero_shot_rows_carry_item_intervals_and_the_standard_error(tiny_model_dir, tiny_task_dir, tmp_path):
    items = [{"query": "And it came to", "choices": [" pass", " rest", " light", " be"], "gold": i % 4}
             for i in range(12)]
    (tiny_task_dir / "data" / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tiny_task_dir / "mc.yaml").write_text("name: mc\nkind: zero-shot\ndata: data/mc.jsonl\nchance: 0.25\n")
    results = tmp_path / "leaderboard.csv"
    report = run(RunSettings(model=str(tiny_model_dir), tasks=(str(tiny_task_dir / "mc.yaml"),), results=results),
                 say=lambda m: None)
    for row in report.rows:
        units = read_units(results, key(row))
        assert len(units.values) == 12 and units.values.mean() == pytest.approx(float(row["value"]))
        p = float(row["value"])
        assert float(row["stderr"]) == pytest.approx(np.sqrt(p * (1 - p) / 11))
    fp_acc = report.rows[0]
    assert fp_acc["ci_of"] == "value" and fp_acc["ci_blocks"] == "12"


@pytest.mark.slow
def test_the_real_model_prints_an_interval_per_quantized_row(capsys, tmp_path):
    """The issue's done-when: `qharness run --quant int8-w8a8-token,int8-w8a8-tensor --limit 4` (here on held-out
    KJV alone, whose 4 windows are the whole text, to halve the time: about 3 minutes on 2 cores)."""
    results = tmp_path / "leaderboard.csv"
    assert main(["run", "--quant", "int8-w8a8-token,int8-w8a8-tensor", "--limit", "4", "--task", "kjv-heldout",
                 "--results", str(results), "--quiet"]) == 0
    out = capsys.readouterr().out
    for scheme in ("int8-w8a8-token", "int8-w8a8-tensor"):
        line = next(line for line in out.splitlines() if f" {scheme} " in line)
        assert re.search(r"%\s\[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", line), line
    fp, *quantized = read_rows(results)
    for row in quantized:
        low, rel, high = float(row["ci_low"]), float(row["rel_delta"]), float(row["ci_high"])
        assert low <= rel <= high and low < high
        assert row["ci_of"] == "rel_delta" and row["windows"] == "4" and row["limit"] == "4"
    assert float(quantized[0]["ci_high"]) < float(quantized[1]["ci_low"])  # per token is clearly the milder


def test_compare_pairs_the_rows_a_run_wrote_and_a_damaged_units_file_is_one_line(capsys, tiny_model_dir,
                                                                                   tiny_task_dir, tmp_path):
    results = tmp_path / "leaderboard.csv"
    for positions in ((), (0,)):
        run(spec_for(tiny_model_dir, tiny_task_dir, results, quants=("int8-w8a8-tensor",), keep_positions=positions),
            say=lambda m: None)
    assert main(["compare", "--results", str(results), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "report.json").read_text())
    (check,) = summary["causal_checks"]
    low, high = check["difference"]
    assert low < high and check["within_noise"] == (low <= 0 <= high)
    assert [p["changed"] for p in summary["paired_differences"]] == ["keep"]
    capsys.readouterr()
    kept = next(r for r in read_rows(results) if r["keep"])
    units_path(results, key(kept)).write_bytes(b"not an npz")
    assert main(["compare", "--results", str(results), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qharness: error: ") and "not a qharness units file" in err and "\n" not in err
    assert not (tmp_path / "out2" / "report.md").exists()


def test_no_intervals_keeps_the_units_but_leaves_the_interval_columns_empty(tiny_model_dir, tiny_task_dir, tmp_path):
    results = tmp_path / "leaderboard.csv"
    rows = run(spec_for(tiny_model_dir, tiny_task_dir, results, intervals=False), say=lambda m: None).rows
    assert all(r["ci_low"] == r["ci_of"] == "" and r["windows"] for r in rows)
    assert all(read_units(results, key(r)) is not None for r in rows)  # compare can still pair them
