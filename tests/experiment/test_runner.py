import dataclasses

import pytest
from tiny_runs import run, spec_for

from qharness.core.errors import ModelLoadError, UnknownName
from qharness.data.results import read_rows
from qharness.experiment import execute as executor
from qharness.experiment import plan as planner
from qharness.experiment.settings import RunSettings


def test_run_writes_fp_and_quant_rows_with_provenance(tiny_model_dir, tiny_task_dir, tmp_path):
    results = tmp_path / "leaderboard.csv"
    report = run(spec_for(tiny_model_dir, tiny_task_dir, results), say=lambda m: None)
    assert report.computed == 2
    fp, q = read_rows(results)
    assert (fp["quant"], q["quant"]) == ("none", "int8-w8a8-token")
    assert q["fp_value"] == fp["value"] and float(fp["delta"]) == 0
    assert float(q["delta"]) == pytest.approx(float(q["value"]) - float(fp["value"]), rel=1e-4)
    assert float(q["value"]) != float(fp["value"])  # the quantized model really ran
    for column in ("seed", "versions", "device", "git_rev", "time", "task_hash", "model_source", "n"):
        assert q[column], column
    assert q["metric_kind"] == "token-level" and q["backend"] == "sim" and '"int8"' in q["scheme"]


def test_rerun_skips_present_cells_and_force_recomputes(tiny_model_dir, tiny_task_dir, tmp_path):
    results = tmp_path / "leaderboard.csv"
    spec = spec_for(tiny_model_dir, tiny_task_dir, results)
    first = run(spec, say=lambda m: None)
    said = []
    again = run(spec, say=said.append)
    assert again.computed == 0 and "already in" in said[0]
    assert again.rows == first.rows
    forced = run(spec_for(tiny_model_dir, tiny_task_dir, results, force=True), say=lambda m: None)
    assert forced.computed == 2 and len(read_rows(results)) == 2
    assert forced.rows[0]["run_id"] != first.rows[0]["run_id"]


def test_interrupted_run_resumes_without_recomputing_the_baseline(tiny_model_dir, tiny_task_dir, tmp_path,
                                                                  monkeypatch):
    results = tmp_path / "leaderboard.csv"
    real = executor.evaluate
    calls = []

    def interrupt_on_quantized(loaded, task, settings, progress):
        calls.append(loaded.model.__class__.__name__)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(loaded, task, settings, progress)

    monkeypatch.setattr(executor, "evaluate", interrupt_on_quantized)
    with pytest.raises(KeyboardInterrupt):
        run(spec_for(tiny_model_dir, tiny_task_dir, results), say=lambda m: None)
    assert [r["quant"] for r in read_rows(results)] == ["none"]  # the finished cell survived

    calls.clear()
    monkeypatch.setattr(executor, "evaluate", lambda *a: (calls.append(1), real(*a))[1])
    report = run(spec_for(tiny_model_dir, tiny_task_dir, results), say=lambda m: None)
    assert report.computed == 1 and len(calls) == 1  # only the quantized cell
    assert report.rows[1]["fp_value"] == report.rows[0]["value"]


def test_settings_are_part_of_the_key(tiny_model_dir, tiny_task_dir, tmp_path):
    results = tmp_path / "leaderboard.csv"
    run(spec_for(tiny_model_dir, tiny_task_dir, results), say=lambda m: None)
    no_bos = run(spec_for(tiny_model_dir, tiny_task_dir, results, bos=False), say=lambda m: None)
    assert no_bos.computed == 2 and len(read_rows(results)) == 4
    assert {r["bos"] for r in read_rows(results)} == {"True", "False"}


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (dict(quants=("int9",)), UnknownName),
        (dict(tasks=("nope",)), UnknownName),
        (dict(model="no-such-model"), ModelLoadError),
    ],
)
def test_bad_input_fails_before_loading_and_leaves_results_untouched(tiny_model_dir, tiny_task_dir, tmp_path,
                                                                     monkeypatch, change, error):
    results = tmp_path / "leaderboard.csv"
    run(spec_for(tiny_model_dir, tiny_task_dir, results), say=lambda m: None)
    before = results.read_bytes()
    monkeypatch.setattr(executor, "load_model", lambda *a, **k: pytest.fail("loaded a model for a bad run"))
    spec = spec_for(tiny_model_dir, tiny_task_dir, results)
    with pytest.raises(error):
        run(dataclasses.replace(spec, **change), say=lambda m: None)
    assert results.read_bytes() == before


def test_kept_positions_and_backend_are_recorded_and_keyed(tiny_model_dir, tiny_task_dir, tmp_path):
    results = tmp_path / "leaderboard.csv"
    run(spec_for(tiny_model_dir, tiny_task_dir, results, quants=("int8-w8a8-tensor",)), say=lambda m: None)
    kept = run(spec_for(tiny_model_dir, tiny_task_dir, results, quants=("int8-w8a8-tensor",), keep_positions=(0,)),
               say=lambda m: None)
    assert kept.computed == 1  # the baseline is shared; only the kept variant is new
    rows = read_rows(results)
    assert [(r["quant"], r["keep"], r["backend"]) for r in rows] == [
        ("none", "", ""), ("int8-w8a8-tensor", "", "sim"), ("int8-w8a8-tensor", "pos:0", "sim")]
    assert rows[1]["value"] != rows[2]["value"]


def test_static_scheme_calibrates_on_the_shipped_calibration_text(tiny_model_dir, tiny_task_dir, tmp_path):
    results = tmp_path / "leaderboard.csv"
    report = run(spec_for(tiny_model_dir, tiny_task_dir, results, quants=("int8-w8a8-tensor-static",)),
                 say=lambda m: None)
    fp, static = report.rows
    assert float(static["value"]) > 0 and static["value"] != fp["value"]


def test_zero_shot_task_gives_one_row_per_metric_with_chance(tiny_model_dir, tiny_task_dir, tmp_path):
    import json

    items = [{"query": "And it came to", "choices": [" pass", " rest", " light", " be"], "gold": 0}] * 3
    (tiny_task_dir / "data" / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (tiny_task_dir / "mc.yaml").write_text("name: mc\nkind: zero-shot\ndata: data/mc.jsonl\nchance: 0.25\n")
    results = tmp_path / "leaderboard.csv"
    spec = RunSettings(model=str(tiny_model_dir), tasks=(str(tiny_task_dir / "mc.yaml"),), results=results)
    report = run(spec, say=lambda m: None)
    assert [(r["quant"], r["metric"]) for r in report.rows] == [
        ("none", "acc"), ("none", "acc_norm"), ("int8-w8a8-token", "acc"), ("int8-w8a8-token", "acc_norm")]
    assert all(r["chance"] == "0.25" and r["metric_kind"] == "zero-shot" for r in report.rows)
    assert all(r["context_length"] == "" for r in report.rows)
    assert run(spec, say=lambda m: None).computed == 0


def test_auto_chooses_the_backend_for_the_model_widths_read_before_loading(tiny_model_dir, tiny_task_dir, tmp_path,
                                                                           monkeypatch):
    """The plan reads the model's Linear widths from its config (a meta skeleton), so `auto` chooses once, for
    those widths, and the rows are keyed by the backend that really ran."""
    def select(scheme, device, requested="auto", dtype=None, targets=None):
        # auto on a GPU: torchao while widths are unknown; with the 64-wide Linears known, it declines -> sim
        assert targets is None or {tuple(t.weight.shape) for t in targets.values()} == {(64, 64), (32, 64),
                                                                                        (128, 64), (64, 128)}
        return "torchao" if targets is None else "sim"

    monkeypatch.setattr(planner, "select_backend", select)
    results = tmp_path / "leaderboard.csv"
    report = run(spec_for(tiny_model_dir, tiny_task_dir, results), say=lambda m: None)
    assert report.computed == 2
    assert [r["backend"] for r in read_rows(results)] == ["", "sim"]
    again = run(spec_for(tiny_model_dir, tiny_task_dir, results), say=lambda m: None)
    assert again.computed == 0  # the second run finds the sim-keyed rows after its own re-selection


@pytest.mark.needs("torchao")
def test_a_named_backend_that_cannot_take_the_model_stops_before_compute(tiny_model_dir, tiny_task_dir, tmp_path):
    from qharness.core.errors import BackendUnavailable

    results = tmp_path / "leaderboard.csv"
    with pytest.raises(BackendUnavailable, match="divisible by 128"):
        run(spec_for(tiny_model_dir, tiny_task_dir, results, quants=("int4-weight-g128",), backend="torchao"),
            say=lambda m: None)
    assert not results.exists()


def test_kv_cache_runs_are_keyed_by_kv_measured_against_true_fp_and_resume(tiny_model_dir, tiny_task_dir, tmp_path):
    """`--quant none,int8 --kv X`: fp weights with a quantized cache, and int8 with it; both against the fp row
    (fp weights *and* fp cache), which the run without --kv shares."""
    results = tmp_path / "leaderboard.csv"
    run(spec_for(tiny_model_dir, tiny_task_dir, results), say=lambda m: None)
    spec = spec_for(tiny_model_dir, tiny_task_dir, results, quants=("none", "int8"), kv="int4-kivi+keep0")
    report = run(spec, say=lambda m: None)
    assert report.computed == 2  # the baseline is read back, not recomputed
    fp, plain, kv_only, both = read_rows(results)
    assert [(r["quant"], r["kv"]) for r in (fp, plain, kv_only, both)] == [
        ("none", ""), ("int8-w8a8-token", ""), ("none", "int4-kivi+keep0"), ("int8-w8a8-token", "int4-kivi+keep0")]
    assert kv_only["fp_value"] == both["fp_value"] == fp["value"]
    assert float(kv_only["value"]) != float(fp["value"]) and float(kv_only["rel_delta"]) != 0
    assert float(both["value"]) not in (float(plain["value"]), float(kv_only["value"]))
    assert kv_only["keep"] == "" and kv_only["scheme"] == "" and kv_only["backend"] == ""
    again = run(spec, say=lambda m: None)
    assert again.computed == 0 and [r["value"] for r in again.rows] == [r["value"] for r in (fp, kv_only, both)]


def test_a_kv_run_leaves_the_model_as_it_was(tiny_model_dir, tiny_task_dir, tmp_path, monkeypatch):
    """The fp baseline computed in the same run as a KV-only cell must not see the quantized cache: the value is
    the same as a run that never heard of --kv."""
    alone = run(spec_for(tiny_model_dir, tiny_task_dir, tmp_path / "a.csv"), say=lambda m: None).rows[0]
    mixed = run(spec_for(tiny_model_dir, tiny_task_dir, tmp_path / "b.csv", quants=("none",), kv="int4-token"),
                say=lambda m: None).rows
    assert mixed[0]["value"] == alone["value"] and mixed[0]["kv"] == ""
    assert mixed[1]["value"] != alone["value"]


def test_a_model_whose_attention_cannot_take_the_kv_setting_is_refused_before_compute(tiny_model_dir, tiny_task_dir,
                                                                                     tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from qharness.core.errors import ConfigError

    monkeypatch.setattr(LlamaForCausalLM, "_supports_attention_backend", False)
    monkeypatch.setattr(executor, "evaluate", lambda *a: pytest.fail("evaluated a run that should be refused"))
    results = tmp_path / "leaderboard.csv"
    with pytest.raises(ConfigError, match="--kv int8-token: LlamaForCausalLM does not take transformers' attention"):
        run(spec_for(tiny_model_dir, tiny_task_dir, results, kv="int8-token"), say=lambda m: None)
    assert not results.exists()


def test_transformed_run_writes_the_transform_column_keeps_the_fp_baseline_and_resumes(tiny_model_dir,
                                                                                       tiny_task_dir, tmp_path):
    results = tmp_path / "leaderboard.csv"
    plain = run(spec_for(tiny_model_dir, tiny_task_dir, results), say=lambda m: None)
    said = []
    smooth = run(spec_for(tiny_model_dir, tiny_task_dir, results, transform="smoothquant"), say=said.append)
    assert smooth.computed == 1  # the fp baseline is the untransformed model's, read back
    fp, quant = smooth.rows
    assert (fp["transform"], quant["transform"]) == ("", "smoothquant:0.5")
    assert quant["fp_value"] == plain.rows[0]["value"] == fp["value"]
    assert quant["value"] != plain.rows[1]["value"]  # the smoothed model quantizes differently
    assert any("fp logits moved by" in line for line in said)
    again = run(spec_for(tiny_model_dir, tiny_task_dir, results, transform="smoothquant:0.5"), say=lambda m: None)
    assert again.computed == 0 and again.rows == smooth.rows  # the default alpha is the same experiment
    assert [r["transform"] for r in read_rows(results)] == ["", "", "smoothquant:0.5"]


def test_a_transform_keeps_the_fp_logits_of_the_run_model(tiny_model_dir, tiny_task_dir, tmp_path, monkeypatch):
    """The baseline a transformed row is compared with is the untransformed fp model's: the transformed fp model
    scores the same perplexity."""
    evaluated = []
    real = executor.evaluate
    monkeypatch.setattr(executor, "apply_backend_", lambda model, *a, **k: None)  # leave the transformed model fp
    monkeypatch.setattr(executor, "evaluate", lambda *a: (lambda m: (evaluated.append(m[0].value), m)[1])(real(*a)))
    results = tmp_path / "leaderboard.csv"
    run(spec_for(tiny_model_dir, tiny_task_dir, results, transform="smoothquant"), say=lambda m: None)
    fp, transformed_fp = evaluated
    assert transformed_fp == pytest.approx(fp, rel=1e-5)


@pytest.mark.parametrize(("change", "message"), [
    (dict(transform="spin"), "unknown transform 'spin'; known: rotate, smoothquant"),
    (dict(transform="smoothquant:2"), "transform 'smoothquant' takes alpha in [0, 1], got '2'"),
])
def test_bad_transform_fails_before_loading(tiny_model_dir, tiny_task_dir, tmp_path, monkeypatch, change, message):
    from qharness.core.errors import QHarnessError

    results = tmp_path / "leaderboard.csv"
    monkeypatch.setattr(executor, "load_model", lambda *a, **k: pytest.fail("loaded a model for a bad run"))
    with pytest.raises(QHarnessError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        run(spec_for(tiny_model_dir, tiny_task_dir, results, **change), say=lambda m: None)
    assert not results.exists()


def test_a_model_the_transform_cannot_take_is_refused_before_anything_is_written(tiny_tokenizer, tiny_task_dir,
                                                                                   tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from qharness.core.errors import ConfigError

    folder = tmp_path / "gpt2"
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    results = tmp_path / "leaderboard.csv"
    with pytest.raises(ConfigError, match="^transform 'smoothquant' supports Llama-style decoders"):
        run(spec_for(folder, tiny_task_dir, results, transform="smoothquant"), say=lambda m: None)
    assert not results.exists()


@pytest.mark.parametrize("backends", [("sim",), ("sim", "torchao", "bnb")])
def test_schemes_applied_in_place_and_undone_give_the_numbers_each_gives_alone(tiny_model_dir, tiny_task_dir,
                                                                             tmp_path, backends):
    """One model in memory: each scheme quantizes the fp model itself and is undone from its Linears' fp weights on
    disk. A scheme run after others must give exactly what it gives alone, and the fp row after them what it was."""
    from qharness.quant.backends import load_backends

    chosen = [b for b in backends if b == "sim" or load_backends().get(b).requires[0] in _installed()]
    schemes = {"sim": ("int8-w8a8-tensor", "int4-weight-g128", "int8-w8a8-tensor-static"),
               "torchao": ("int8-weight-channel-halfspan",), "bnb": ("nf4",)}
    together = tmp_path / "together.csv"
    for backend in chosen:
        run(spec_for(tiny_model_dir, tiny_task_dir, together, quants=schemes[backend], backend=backend),
            say=lambda m: None)
    values = {(r["quant"], r["backend"]): r["value"] for r in read_rows(together)}
    for backend in chosen:
        for quant in schemes[backend]:
            alone = tmp_path / f"{quant}.csv"
            run(spec_for(tiny_model_dir, tiny_task_dir, alone, quants=(quant,), backend=backend), say=lambda m: None)
            by_key = {(r["quant"], r["backend"]): r["value"] for r in read_rows(alone)}
            assert by_key[(quant, backend)] == values[(quant, backend)], (quant, backend)
            assert by_key[("none", "")] == values[("none", "")]


def _installed() -> set[str]:
    import importlib.util

    return {name for name in ("torchao", "bitsandbytes") if importlib.util.find_spec(name) is not None}


def test_a_run_holds_one_model_the_fp_weights_wait_on_disk(tiny_model_dir, tiny_task_dir, tmp_path, monkeypatch):
    """No deep copy of the model per scheme (layer errors aside, which compare the two)."""
    import copy as copy_module

    from qharness.models.sources import LoadedModel

    copies = []
    real = copy_module.deepcopy
    monkeypatch.setattr(copy_module, "deepcopy", lambda obj, *a: copies.append(type(obj).__name__) or real(obj, *a))
    run(spec_for(tiny_model_dir, tiny_task_dir, tmp_path / "lb.csv", quants=("int8-w8a8-tensor", "int4")),
        say=lambda m: None)
    assert not [name for name in copies if name.endswith("ForCausalLM")], copies
    assert LoadedModel  # the loaded model is the one that was quantized and restored
