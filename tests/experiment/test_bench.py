"""`qharness bench`: cost rows of their own kind, keyed by device and shapes, resumable, refusing bad settings."""

import pytest

from qharness.core.errors import ConfigError
from qharness.data.results import read_rows
from qharness.experiment.bench import BenchSettings, bench, format_table
from qharness.models.sources import ModelSpec


def settings(model, results, **extra):
    fields = dict(model=ModelSpec(str(model), dtype="fp32", device="cpu"),
                  quants=("int8-weight-channel", "int4-weight-g128"), prefill_tokens=32, decode_batches=(1, 2),
                  prompt_tokens=8, decode_steps=4, repeats=1, results=results)
    return BenchSettings(**{**fields, **extra})


def test_bench_writes_cost_rows_for_fp_and_each_scheme_and_a_rerun_measures_nothing(tiny_model_dir, tmp_path):
    results = tmp_path / "lb.csv"
    report = bench(settings(tiny_model_dir, results), say=lambda msg: None)
    assert report.computed == 3
    rows = read_rows(results)
    metrics = {"prefill_tok_s", "decode_b1_tok_s", "decode_b2_tok_s", "weight_bytes"}  # no CUDA peak on a CPU
    assert {(r["quant"], r["metric"]) for r in rows} == {(q, m) for q in ("none", "int8-weight-channel",
                                                                          "int4-weight-g128") for m in metrics}
    assert {r["task"] for r in rows} == {"bench:eager"}
    for row in rows:
        assert float(row["value"]) > 0
        assert row["metric_kind"] == ("cost" if row["quant"] == "none" else "cost-simulated")  # sim's times
        assert float(row["fp_value"]) == next(float(r["value"]) for r in rows
                                              if r["quant"] == "none" and r["metric"] == row["metric"])
    weights = {r["quant"]: float(r["value"]) for r in rows if r["metric"] == "weight_bytes"}
    assert weights["int4-weight-g128"] < weights["int8-weight-channel"] < weights["none"]
    table = format_table(report.rows)
    assert "simulation's, not a kernel's cost" in table and "int4-weight-g128" in table
    again = bench(settings(tiny_model_dir, results), say=lambda msg: None)
    assert again.computed == 0 and len(read_rows(results)) == len(rows)


def test_bench_rows_of_another_shape_or_mode_are_other_rows(tiny_model_dir, tmp_path):
    results = tmp_path / "lb.csv"
    bench(settings(tiny_model_dir, results), say=lambda msg: None)
    wider = settings(tiny_model_dir, results, prefill_tokens=48)
    assert bench(wider, say=lambda msg: None).computed == 3  # the device and shapes are in the key (task_hash)
    assert len({r["task_hash"] for r in read_rows(results)}) == 2


@pytest.mark.parametrize(("extra", "message"), [
    ({"prefill_tokens": 0}, "prefill-tokens must be >= 1"),
    ({"decode_batches": (0,)}, "decode batch sizes must be >= 1"),
    ({"layers": 2}, "--layers sets a random: model's depth"),
])
def test_bad_bench_settings_are_refused_before_anything_loads(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        settings(tmp_path / "no-model", tmp_path / "lb.csv", **extra)


def test_unknown_random_shape_names_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown random model shape 'llama-9'; known: random:llama-3-8b"):
        BenchSettings(model=ModelSpec("random:llama-9"), results=tmp_path / "lb.csv")


def test_compare_sets_quality_beside_cost_and_never_puts_a_simulated_cost_on_the_front(tmp_path):
    from qharness.data.results import append_rows, make_row
    from qharness.report.compare import compare

    def row(quant, backend, task, metric, value, fp, **extra):
        return make_row(value, fp, model="m", quant=quant, backend=backend, task=task, metric=metric, bos=True,
                        dtype="bf16", device_type="cuda", higher_is_better=metric != "ppl", **extra)

    rows = [row("none", "", "kjv", "ppl", 10.0, 10.0)]
    for quant, backend, ppl, speed in (("a", "torchao", 10.5, 1.6), ("b", "torchao", 11.0, 1.2),
                                       ("c", "torchao", 10.2, 1.1), ("d", "sim", 10.1, 3.0)):
        rows += [row(quant, backend, "kjv", "ppl", ppl, 10.0),
                 row(quant, backend, "bench:compile", "decode_b1_tok_s", 100 * speed, 100.0),
                 row(quant, backend, "bench:compile", "weight_bytes", 5.0, 10.0)]
    results = tmp_path / "lb.csv"
    append_rows(results, rows)
    summary = compare(results, tmp_path / "report")
    front = {p["quant"]: p["pareto"] for p in summary["costs"]}
    assert front == {"a": True, "b": False, "c": True, "d": False}  # b: a is faster and better; d: simulated
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Quality against cost" in report and "d | sim (simulated cost)" in report
    assert (tmp_path / "report" / "quality_vs_cost.png").is_file()
    assert "decode_b1_tok_s" not in report.split("## Quality against cost")[0]  # cost rows are no degradation


def test_backends_are_chosen_once_from_the_widths_known_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    """bench reads the model's Linears from its config (a random shape: a meta skeleton) and chooses each scheme's
    backend once, with those widths, before any weight loads."""
    from qharness.experiment import bench as bench_module

    seen = []
    choose = bench_module.select_backend

    def counted(scheme, device, requested="auto", dtype=None, targets=None):
        seen.append((scheme.name, sorted(targets) if targets is not None else None))
        return choose(scheme, device, requested, dtype=dtype, targets=targets)

    monkeypatch.setattr(bench_module, "select_backend", counted)
    bench(settings(tiny_model_dir, tmp_path / "lb.csv"), say=lambda msg: None)
    assert [name for name, _ in seen] == ["int8-weight-channel", "int4-weight-g128"]
    assert all(targets and all(name.startswith("model.layers.") for name in targets) for _, targets in seen)
    assert len(bench_module.planned_targets(settings("random:llama-3-8b", tmp_path / "x.csv", layers=1))) == 7
