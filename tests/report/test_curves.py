"""The training curves: the driver that trains, evaluates and prunes each run's steps (curve_sweep.py), and the
report's curves (curves.py), on the tiny model with a few steps."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from qharness.data.recipe import TUNE400_TRAIN
from qharness.data.results import read_rows
from qharness.experiment.curve_sweep import curve_sweep, main, run_groups
from qharness.experiment.sweep import SweepConfig
from qharness.models.sources import tune as tune_names
from qharness.models.sources.tune import step_of
from qharness.report.compare import compare
from qharness.tasks.spec import tasks_dir

CALIBRATION = str(tasks_dir() / "data" / "calibration.txt")


@pytest.fixture()
def short_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tune_names, "LONG_RECIPE", replace(
        tune_names.LONG_RECIPE, data=(CALIBRATION,), snapshots=(2, 4),
        train=replace(TUNE400_TRAIN, steps=4, warmup=1, context=32, log_every=1, checkpoint_every=2)))


def test_names_group_by_run_in_file_order():
    assert step_of("tune400:m-none@step40") == ("tune400:m-none", 40) and step_of("smollm2-135m") is None
    assert run_groups(("tune400:m-none@step2", "tune400:m-none@step4", "base", "tune400:m-kv_bias@step2")) == [
        ("tune400:m-none", ("tune400:m-none@step2", "tune400:m-none@step4")), ("base", ("base",)),
        ("tune400:m-kv_bias", ("tune400:m-kv_bias@step2",))]


def test_the_curve_sweep_trains_evaluates_prunes_and_resumes(short_recipe, tmp_path, tiny_model_dir, tiny_task_dir):
    runs = [f"tune400:{tiny_model_dir}-none", f"tune400:{tiny_model_dir}-lp_penalty:power=8:threshold=0.5"]
    models = [f"{run}@step{step}" for run in runs for step in (2, 4)] + [str(tiny_model_dir)]
    (tmp_path / "curves.yaml").write_text(
        f"models: [{', '.join(models)}]\nquants: [int8-w8a8-tensor, int8-w8a8-token]\n"
        f"tasks: [{tiny_task_dir / 'short.yaml'}]\nresults: {tmp_path / 'lb.csv'}\nscan: true\n")
    config = SweepConfig.from_file(tmp_path / "curves.yaml")
    report = curve_sweep(config, say=lambda message: None)
    rows = read_rows(tmp_path / "lb.csv")
    assert report.computed == 5 * 3  # each model: fp and two schemes
    assert {r["model"] for r in rows} == set(models)  # each step keyed apart, scans included
    assert {r["family"] for r in rows if r["model"].endswith("@step2")} == {f"tune400:{tiny_model_dir}@step2"}
    for run in runs:  # evaluated steps are deleted, the trained model stays
        folder = tune_names.folder_for(run)
        assert (folder / "model" / "config.json").is_file() and not any((folder / "snapshots").iterdir())
    assert main([str(tmp_path / "curves.yaml")]) == 0  # a rerun loads nothing: every row is there
    assert len(read_rows(tmp_path / "lb.csv")) == len(rows)

    summary = compare(tmp_path / "lb.csv", tmp_path / "report")
    curves = {c["run"]: c for c in summary["curves"]}
    assert set(curves) == set(runs)
    control, penalized = curves[runs[0]]["points"], curves[runs[1]]["points"]
    assert set(control["fp ppl"]) == {0, 2, 4}  # step 0: the model the runs started from
    assert control["fp ppl"][0] == penalized["fp ppl"][0]
    assert set(penalized["fp vs control"]) == {2, 4} and set(control["int8-w8a8-tensor"]) == {0, 2, 4}
    assert penalized["fp vs control"][4] == pytest.approx(penalized["fp ppl"][4] / control["fp ppl"][4] - 1)
    drawn = sorted(Path(p).name for p in summary["plots"] if Path(p).name.startswith("curve_"))
    assert drawn == ["curve_fp_ppl.png", "curve_fp_vs_control.png", "curve_int8-w8a8-tensor.png",
                     "curve_int8-w8a8-token.png", "curve_max_abs.png", "curve_max_median.png"]
    assert all((tmp_path / "report" / name).stat().st_size > 0 for name in drawn)
    report_md = (tmp_path / "report" / "report.md").read_text()
    assert "## Training curves" in report_md and f"| {runs[1]} | 2, 4 |" in report_md
    table = report_md.split("## Training curves")[1].split("\n\n")[2].splitlines()
    assert len(table) == 4 and len({line.count("|") for line in table}) == 1  # no label breaks a column


def test_a_bad_name_in_the_file_stops_before_anything_trains(short_recipe, tmp_path, tiny_model_dir, tiny_task_dir,
                                                              capsys):
    (tmp_path / "curves.yaml").write_text(
        f"models: [tune400:{tiny_model_dir}-none@step2, tune400:{tiny_model_dir}-none@step3]\nquants: [int8]\n"
        f"tasks: [{tiny_task_dir / 'short.yaml'}]\nresults: {tmp_path / 'lb.csv'}\n")
    assert main([str(tmp_path / "curves.yaml")]) == 2
    assert "keeps no weights at step 3; its snapshots: @step2, @step4" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "lb.csv").exists()


def test_each_seed_is_set_against_its_own_control_and_the_last_step_shows_its_interval():
    """Two controls (seeds 0 and 1) and a mitigation with seed 1: its fp cost is against the seed-1 control, not
    whichever control came last; a scheme's last step shows the row's interval (no model is loaded: rows only)."""
    from qharness.data.results import make_row
    from qharness.report.curves import build_curves, curves_table
    from qharness.report.degradation import degradations
    from qharness.report.publish import table_of

    def row(model, quant, value, fp, **ci):
        return {**make_row(value, fp, model=model, quant=quant, backend="" if quant == "none" else "sim",
                           task="kjv-heldout", task_hash="h", metric="ppl", bos=True, context_length=2048, limit="",
                           dtype="fp32", device_type="cpu", higher_is_better=False, metric_kind="token-level",
                           n=7435, mitigation=model.split("-")[-1].split(":")[0].split("@")[0]), **ci}

    rows = []
    for run, fps in (("tune400:smollm2-135m-none", (24.0, 21.0)), ("tune400:smollm2-135m-none:seed=1", (25.0, 22.0)),
                     ("tune400:smollm2-135m-kv_bias:seed=1", (26.0, 24.2))):
        for step, fp in zip((40, 400), fps, strict=True):
            model = f"{run}@step{step}"
            rows += [row(model, "none", fp, fp),
                     row(model, "int8-w8a8-tensor", fp * 1.8, fp, ci_of="rel_delta", ci_low="0.75", ci_high="0.86")]
    curves, task = build_curves(rows, degradations(rows))
    by_run = {c.run: c for c in curves}
    assert by_run["tune400:smollm2-135m-kv_bias:seed=1"].points["fp vs control"][400] == pytest.approx(24.2 / 22 - 1)
    assert by_run["tune400:smollm2-135m-none"].points["fp vs control"][400] == 0
    text = "\n".join(curves_table(curves, task, table_of))
    assert "+80.0% [+75.0, +86.0] (+80.0% at 40)" in text


def test_a_broken_run_does_not_flatten_the_others_curves():
    """A broken model's +2e4% must not turn every other run's +80% into a flat line: change plots go symlog (linear
    within +-100%) past +-1,000%, fp perplexity goes log past a 100x span, and a table-sized spread stays linear."""
    from qharness.report.curves import FP
    from qharness.report.plots import curve_scale

    assert curve_scale("int8-w8a8-tensor", [80.0, 18.0, -0.5]) == ("linear", {})
    assert curve_scale("int8-w8a8-tensor", [80.0, 18.0, 2.4e4]) == ("symlog", {"linthresh": 100.0})
    assert curve_scale("fp vs control", [0.0, 1.2e3]) == ("symlog", {"linthresh": 100.0})
    assert curve_scale(FP, [21.0, 25.1]) == ("linear", {})
    assert curve_scale(FP, [21.0, 2.4e15]) == ("log", {})
    assert curve_scale("max abs", [570.0, 900.0]) == ("log", {})


def test_a_run_far_worse_than_its_control_at_every_step_is_broken_and_left_out_of_the_change_plots(tmp_path):
    from qharness.report.curves import FP, FP_VS_CONTROL, Curve, broken, split_broken
    from qharness.report.plots import plot_curves

    dyt = Curve("tune400:m-dyt", "dyt", points={FP: {40: 6e18, 400: 2e15}, FP_VS_CONTROL: {40: 2.5e17, 400: 1e14}})
    recovering = Curve("tune400:m-lp", "lp", points={FP: {40: 300.0, 400: 22.0}, FP_VS_CONTROL: {40: 12.0, 400: 0.05}})
    control = Curve("tune400:m-none", "none", points={FP: {40: 23.7, 400: 21.0}})
    assert broken(dyt) and not broken(recovering) and not broken(control)
    assert split_broken([control, dyt, recovering]) == ([control, recovering], ["tune400:m-dyt"])
    assert split_broken([dyt]) == ([dyt], []), "only broken runs: drawn rather than nothing"
    pictures = plot_curves([control, recovering, dyt], tmp_path)
    assert [p.name for p in pictures] == ["curve_fp_ppl.png", "curve_fp_vs_control.png"]
