"""The zoo: names, train-on-first-use with a tiny recipe, and every variant through run and scan."""

import json

import pytest
import torch

from qharness.activations.scan import ScanConfig
from qharness.cli import main
from qharness.core.errors import ConfigError, ModelLoadError, UnknownName
from qharness.data.recipe import ArchConfig, Recipe, TrainConfig
from qharness.data.results import read_rows
from qharness.experiment.scanning import ScanSpec, run_scan
from qharness.models.sources import ModelSpec, classify, load_model, zoo
from qharness.training.ensure import ensure


@pytest.fixture()
def tiny_zoo(monkeypatch, tmp_path, tiny_tokenizer, training_tokens):
    """The zoo with a recipe of a few steps on shipped training-split text, cached under tmp_path."""
    from qharness.training import run

    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo, "RECIPE", Recipe(
        arch=ArchConfig(d_model=32, layers=2, heads=2, context=32, vocab_size=len(tiny_tokenizer)),
        train=TrainConfig(steps=4, batch_size=2, context=32, warmup=1, log_every=2, checkpoint_every=2)))
    monkeypatch.setattr(run, "training_corpus", lambda progress=True: (tiny_tokenizer, training_tokens, {"test": True}))
    return tmp_path


def test_grid_names_parse_into_recipes():
    assert {zoo.recipe_for(name).arch.arch for name in zoo.GRID} == {"llama", "gpt2"}
    assert zoo.recipe_for("zoo:llama-base").mitigation == "none"
    assert zoo.recipe_for("zoo:llama-tvr+dyt").mitigation == "tvr+dyt"
    assert zoo.recipe_for("zoo:llama-kv_bias").digest() != zoo.recipe_for("zoo:llama-base").digest()
    assert classify("zoo:gpt2-base") == "zoo"


@pytest.mark.parametrize(("name", "error", "message"), [
    ("zoo:bert-base", UnknownName, "arch one of llama, gpt2"),
    ("zoo:llama", UnknownName, "zoo:<arch>-<mitigation>"),
    ("zoo:llama-kvbias", UnknownName, "unknown mitigation 'kvbias'"),
    ("zoo:llama-tvr+tvr", ConfigError, "twice"),
    ("zoo:lama-base", UnknownName, "did you mean 'zoo:llama-base'"),
    ("zoo:llama-kvbias", UnknownName, "did you mean 'kv_bias'"),
    ("zoo:llama-base:seed=one", UnknownName, ":seed= takes an integer in 0..4294967295, got 'one'"),
    ("zoo:llama-base:seed=0", UnknownName, "is the model 'zoo:llama-base'; write it so"),
    ("zoo:llama-base:seed=01", UnknownName, "is the model 'zoo:llama-base:seed=1'; write it so"),
])
def test_bad_zoo_names_say_what_is_valid(name, error, message):
    with pytest.raises(error, match=message):
        classify(name)


def test_loading_never_trains_ensure_does_then_reuses(tiny_zoo):
    with pytest.raises(ModelLoadError, match="zoo:llama-kv_bias is not trained yet; `qharness train --model"):
        load_model(ModelSpec("zoo:llama-kv_bias", device="cpu"), progress=False)
    assert not zoo.is_trained("zoo:llama-kv_bias")
    path = ensure("zoo:llama-kv_bias", progress=False)
    weights = (path / "model.safetensors").stat().st_mtime_ns
    info = json.loads((path / "training.json").read_text())
    assert info["recipe"]["mitigation"] == "kv_bias" and info["final"]["step"] == 4
    assert {"versions", "device", "git_rev"} <= set(info)
    assert ensure("zoo:llama-kv_bias", progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == weights
    loaded = load_model(ModelSpec("zoo:llama-kv_bias", device="cpu"), progress=False)
    assert loaded.model.config.qharness_mitigation == "kv_bias"
    assert "trained here" in loaded.source
    assert (loaded.arch, loaded.mitigation, loaded.family) == ("llama", "kv_bias", "zoo:llama")


def test_a_second_seed_trains_apart_and_groups_with_the_first(tiny_zoo):
    """`zoo:llama-base:seed=1`: the recipe with seed 1, its own folder, weights and family; rows of the two share
    train_recipe (the recipe without its seed), which is how report/seeds.py finds seeds of one recipe."""
    names = ["zoo:llama-base", "zoo:llama-base:seed=1"]
    assert zoo.recipe_for(names[1]).train.seed == 1 and zoo.folder_for(names[0]) != zoo.folder_for(names[1])
    assert "seed1" in zoo.folder_for(names[1]).name
    for name in names:
        ensure(name, progress=False)
    loaded = [load_model(ModelSpec(name, device="cpu"), progress=False) for name in names]
    assert [m.train_seed for m in loaded] == [0, 1] and loaded[0].train_recipe == loaded[1].train_recipe != ""
    assert [(m.mitigation, m.family) for m in loaded] == [("none", "zoo:llama"), ("none", "zoo:llama:seed=1")]
    assert not torch.equal(*(m.model.get_input_embeddings().weight for m in loaded))


def test_a_finished_run_keeps_no_checkpoint_and_a_rerun_trains_nothing(tiny_zoo, monkeypatch):
    from qharness.training import run
    from qharness.training.loop import CHECKPOINT

    out = tiny_zoo / "out"
    first = run.train_model(zoo.RECIPE, out, progress=False)
    assert first.finished and (out / "model" / "model.safetensors").exists()
    assert not (out / CHECKPOINT).exists()  # optimizer moments and a second copy of the weights: resuming only
    monkeypatch.setattr(run, "train", lambda *a, **k: pytest.fail("a finished run must not train again"))
    again = run.train_model(zoo.RECIPE, out, progress=False)
    assert (again.step, again.finished, again.loss) == (first.step, True, pytest.approx(first.loss))
    other = Recipe(arch=zoo.RECIPE.arch, train=zoo.RECIPE.train, mitigation="kv_bias")
    with pytest.raises(ConfigError, match="already holds a model trained by another recipe"):
        run.train_model(other, out, progress=False)


@pytest.mark.parametrize("name", zoo.GRID)
def test_every_variant_trains_scans_and_runs(name, tiny_zoo, tiny_task_dir):
    from qharness.experiment.runner import run
    from qharness.experiment.settings import RunSettings

    results = tiny_zoo / "lb.csv"
    profile = run_scan(ScanSpec(model=ModelSpec(name, device="cpu"), config=ScanConfig(sequences=1, length=24),
                                intervention_task=None, out_dir=tiny_zoo / "scan", results=results,
                                progress=False), say=lambda m: None)
    assert len(profile.layers) == 2
    assert all(layer.max > 0 for layer in profile.layers)
    report = run(RunSettings(model=name, device="cpu", quants=("int8-w8a8-tensor-static",),
                             tasks=(str(tiny_task_dir / "short.yaml"),), results=results),
                 say=lambda m: None, progress=False)
    rows = [r for r in read_rows(results) if r["task"] != "scan"]
    assert {r["quant"] for r in rows} == {"none", "int8-w8a8-tensor-static"} and report.computed == 2
    assert all(r["model"] == name for r in read_rows(results))
    arch, mitigation = name.removeprefix("zoo:").split("-", 1)
    assert {(r["arch"], r["mitigation"], r["family"]) for r in read_rows(results)} == {
        (arch, "none" if mitigation == "base" else mitigation, f"zoo:{arch}")}


def test_cli_trains_a_zoo_model_within_a_budget_then_finishes(capsys, tiny_zoo, monkeypatch):
    from types import SimpleNamespace

    from qharness.training import loop

    readings = iter(range(1, 1000))  # one second per clock reading: a 1.5-second budget takes exactly one step
    with monkeypatch.context() as patch:
        patch.setattr(loop, "time", SimpleNamespace(monotonic=lambda: float(next(readings)), sleep=lambda s: None))
        assert main(["train", "--model", "zoo:gpt2-base", "--budget", "0.025", "--quiet"]) == 0
    assert "stopped by the 0.025-minute budget with a checkpoint" in capsys.readouterr().out
    assert main(["list", "models"]) == 0
    assert "zoo:gpt2-base" in capsys.readouterr().out
    assert main(["train", "--model", "zoo:gpt2-base", "--quiet"]) == 0
    assert "zoo:gpt2-base: trained ->" in capsys.readouterr().out
    main(["list", "models"])
    listing = capsys.readouterr().out
    assert any(line.split()[:2] == ["zoo:gpt2-base", "trained"] for line in listing.splitlines())


def test_cli_train_to_a_folder_and_bad_input(capsys, tiny_zoo):
    code = main(["train", "--arch", "llama", "--mitigation", "nope", "--out", str(tiny_zoo / "r"), "--quiet"])
    assert code == 2 and "unknown mitigation 'nope'" in capsys.readouterr().err
    code = main(["train", "--arch", "rnn", "--out", str(tiny_zoo / "r"), "--quiet"])
    assert code == 2 and "unknown architecture 'rnn'; valid: llama, gpt2" in capsys.readouterr().err
    code = main(["train", "--quiet"])
    assert code == 2 and "needs --out" in capsys.readouterr().err


def test_unknown_model_message_mentions_the_zoo():
    with pytest.raises(ModelLoadError, match="zoo model"):
        classify("no-such-model")
