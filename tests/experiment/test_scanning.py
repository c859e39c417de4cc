import dataclasses
import json
import math

import numpy as np
import pytest

from qharness.activations.profile import InterventionPlan, Profile
from qharness.activations.scan import ScanConfig
from qharness.cli import main
from qharness.core.errors import ConfigError, ModelLoadError
from qharness.data.results import read_rows
from qharness.experiment.scanning import ScanSpec, intervention_results, run_scan
from qharness.models.sources import ModelSpec, load_model
from qharness.tasks import get_task, load_task_text
from qharness.tasks.perplexity import perplexity


def test_scan_writes_profile_plots_and_leaderboard_rows(capsys, tiny_model_dir, tiny_task_dir, tmp_path):
    out, results = tmp_path / "scan", tmp_path / "lb.csv"
    code = main(["scan", "--model", str(tiny_model_dir), "--sequences", "2", "--length", "32", "--quiet",
                 "--intervention-task", str(tiny_task_dir / "short.yaml"), "--out", str(out),
                 "--results", str(results)])
    printed = capsys.readouterr().out
    assert code == 0
    folder = next(out.iterdir())
    profile = json.loads((folder / "profile.json").read_text())
    assert profile["schema"] == "qharness.profile/1" and len(profile["layers"]) == 2
    assert Profile.read(folder / "profile.json").model == str(tiny_model_dir)
    assert (folder / "magnitudes.png").read_bytes()[:4] == b"\x89PNG"
    assert (folder / "attention_sink.png").is_file()
    assert {r["metric"] for r in read_rows(results)} == {"massive_max", "massive_ratio", "first_massive_layer",
                                                         "bos_holds_max"}
    assert all(r["task"] == "scan" and r["quant"] == "none" for r in read_rows(results))
    assert "layer  max" in printed and "profile, plots ->" in printed


def test_intervention_rows_when_an_outlier_exists(tiny_model_dir, tiny_task_dir, tmp_path, monkeypatch):
    from qharness.activations import scan as scan_module

    monkeypatch.setattr(scan_module, "summarize", _with_plan(scan_module.summarize))
    profile = run_scan(ScanSpec(model=ModelSpec(str(tiny_model_dir)), config=ScanConfig(sequences=2, length=32),
                                intervention_task=str(tiny_task_dir / "short.yaml"), out_dir=tmp_path / "scan",
                                results=tmp_path / "lb.csv", progress=False), say=lambda m: None)
    table = {row.condition: row.ppl for row in profile.intervention_table}
    assert set(table) == {"original", "zero", "mean"}
    assert table["zero"] != table["original"]
    rows = {row.condition: row for row in profile.intervention_table}
    loaded = load_model(ModelSpec(str(tiny_model_dir)), progress=False)
    task = get_task(str(tiny_task_dir / "short.yaml"))
    direct = perplexity(loaded.model, loaded.tokenizer, load_task_text(task), task.context_length, limit=1,
                        progress=False)
    assert rows["original"].ppl == pytest.approx(direct.value) and rows["original"].tokens == direct.n
    assert rows["original"].ci_low <= rows["original"].ppl <= rows["original"].ci_high
    assert rows["zero"].ci_low <= rows["zero"].change <= rows["zero"].ci_high
    assert all(row.ci_low < row.ci_high for row in rows.values())
    # the intervals go into profile.json and read back
    written = Profile.read(tmp_path / "scan" / next((tmp_path / "scan").iterdir()).name / "profile.json")
    assert written.intervention_table == profile.intervention_table


def test_the_interventions_intervals_in_closed_form():
    original = np.random.default_rng(0).exponential(3.0, 1000)
    found = {r.condition: r for r in intervention_results(
        {"original": original, "zero": original + 0.05, "mean": original.copy()}, 11, [507], "kjv-heldout")}
    first = found["original"]
    assert first.change is None and first.ci_low < first.ppl < first.ci_high and first.tokens == 1000
    assert first.ppl == pytest.approx(math.exp(original.mean()))
    # a constant shift of every token's NLL is that shift in every resample: the interval is the point
    shifted = found["zero"]
    assert shifted.change == pytest.approx(math.expm1(0.05))
    assert (shifted.ci_low, shifted.ci_high) == (pytest.approx(math.expm1(0.05)),) * 2
    # identical NLLs: no change and an interval of [0, 0]
    assert (found["mean"].change, found["mean"].ci_low, found["mean"].ci_high) == (0.0, 0.0, 0.0)


def _with_plan(summarize):
    def patched(layers, records):
        summary = summarize(layers, records)
        plan = InterventionPlan(layer=0, criterion="outlier", channels=[3], mean_first=[0.5], mean_rest=[0.1])
        return dataclasses.replace(summary, intervention=plan)

    return patched


def test_bad_scan_input_is_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="scan sequences must be >= 1, got 0"):
        ScanConfig(sequences=0)
    with pytest.raises(ModelLoadError, match="--layers 'model.nope' is not a submodule"):
        run_scan(ScanSpec(model=ModelSpec(str(tiny_model_dir)), layers="model.nope", out_dir=tmp_path,
                          results=tmp_path / "lb.csv", progress=False), say=lambda m: None)
    assert not (tmp_path / "lb.csv").exists()
