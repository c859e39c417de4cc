"""Continued training (`train --from`, `tune:` names) and the outlier penalty, on the tiny model and shipped text."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from qharness.cli import main
from qharness.errors import DataError, UnknownName
from qharness.models.mitigations import build_
from qharness.models.mitigations.outlier_penalty import OutlierPenalty
from qharness.models.sources import ModelSpec, classify, load_model
from qharness.models.sources import tune as tune_names
from qharness.recipe import TUNE_TRAIN
from qharness.tasks.spec import tasks_dir
from qharness.training.ensure import ensure
from qharness.training.tune import read_documents

CALIBRATION = str(tasks_dir() / "data" / "calibration.txt")  # training-split text, shipped


def test_the_penalty_is_the_formula_and_only_while_training():
    layer = torch.nn.Linear(4, 4)
    penalty = OutlierPenalty(threshold=2.0, strength=0.5)
    hidden = torch.tensor([[1.0, -3.0, 6.0, 0.5]])
    penalty._record(layer, (), hidden)
    expected = 0.5 * torch.tensor([0.0, 0.5**2, 2.0**2, 0.0]).mean()
    assert penalty.take().item() == pytest.approx(expected.item())
    assert penalty.take() is None  # taken once
    with torch.no_grad():  # the activation probe's forward passes are not penalized
        penalty._record(layer, (), hidden)
    assert penalty.take() is None


def test_adding_the_penalty_keeps_the_function(tiny_model_dir):
    """A mitigation added to a trained model must leave its logits as they were before any step."""
    model = load_model(ModelSpec(str(tiny_model_dir), device="cpu")).model
    ids = torch.arange(2, 30).unsqueeze(0)
    with torch.no_grad():
        before = model(ids).logits
        build_(model, "outlier_penalty")
        with OutlierPenalty().attached(model):
            after = model(ids).logits
    assert torch.equal(before, after)


def test_names_parse_and_say_what_is_supported():
    assert classify("tune:smollm2-135m-none") == "tune"
    assert tune_names.parse("tune:smollm2-135m-outlier_penalty") == ("smollm2-135m", "outlier_penalty")
    assert tune_names.family("tune:smollm2-135m-none") == "tune:smollm2-135m"
    with pytest.raises(UnknownName, match="cannot yet be added to a trained model .* none or kv_bias, outlier_pen"):
        classify("tune:smollm2-135m-dyt")
    assert classify("tune:smollm2-135m-outlier_penalty+kv_bias") == "tune"
    with pytest.raises(Exception, match="unknown model 'nope'"):
        classify("tune:nope-none")
    with pytest.raises(UnknownName, match="write tune:<model>-<mitigation>"):
        classify("tune:smollm2")


def test_data_files_folders_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth"}\n')
    assert read_documents((str(tmp_path),)) == ["first doc", "second doc", "third", "fourth"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="line 1 is not a JSON object with a 'text' field"):
        read_documents((str(tmp_path / "bad.jsonl"),))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_documents((str(tmp_path / "bin.txt"),))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        read_documents((str(tmp_path / "empty.txt"),))
    with pytest.raises(DataError, match="no such file or folder"):
        read_documents((str(tmp_path / "missing.txt"),))


def _train_from(tmp_path, model_dir, mitigation: str, out: str, *extra: str) -> list[dict]:
    code = main(["train", "--from", str(model_dir), "--mitigation", mitigation, "--steps", "12", "--context", "32",
                 "--batch-size", "4", "--lr", "3e-3", "--data", CALIBRATION, "--out", str(tmp_path / out), "--quiet",
                 *extra])
    assert code == 0
    return [json.loads(line) for line in (tmp_path / out / "train_log.jsonl").read_text().splitlines()]


def test_the_penalty_shrinks_activations_that_plain_continued_training_keeps(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    plain = _train_from(tmp_path, tiny_model_dir, "none", "plain")
    penalized = _train_from(tmp_path, tiny_model_dir, "outlier_penalty", "pen", "--penalty-threshold", "0.02",
                            "--penalty-strength", "50")
    assert "penalty" not in plain[-1] and penalized[0]["penalty"] > 0
    assert penalized[-1]["max_abs"] < 0.8 * plain[-1]["max_abs"]
    reloaded = load_model(ModelSpec(str(tmp_path / "pen" / "model"), device="cpu"))
    assert reloaded.mitigation == "outlier_penalty"
    info = json.loads((tmp_path / "pen" / "model" / "training.json").read_text())
    assert info["recipe"]["penalty"] == [["strength", 50.0], ["threshold", 0.02]] and info["final"]["step"] == 12


def test_a_tune_name_is_trained_on_first_use_then_read(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tune_names, "RECIPE", replace(
        tune_names.RECIPE, data=(CALIBRATION,), train=replace(TUNE_TRAIN, steps=2, context=32, log_every=1)))
    name = f"tune:{tiny_model_dir}-none"
    with pytest.raises(Exception, match="is not trained yet"):
        load_model(ModelSpec(name, device="cpu"))
    path = ensure(name, progress=False)
    assert ensure(name, progress=False) == path  # the second call finds it
    loaded = load_model(ModelSpec(name, device="cpu"))
    assert (loaded.mitigation, loaded.family) == ("none", f"tune:{tiny_model_dir}")


def test_train_from_refuses_what_it_cannot_do(capsys, tmp_path, tiny_model_dir):
    assert main(["train", "--from", str(tiny_model_dir), "--mitigation", "dyt", "--out", str(tmp_path / "x")]) == 2
    assert "'dyt' cannot yet be added to a trained model" in capsys.readouterr().err
    assert main(["train", "--from", str(tiny_model_dir)]) == 2
    assert "needs --out FOLDER" in capsys.readouterr().err
    assert main(["train", "--from", "no-such-model", "--out", str(tmp_path / "y")]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_kv_bias_is_retrofitted_with_a_silent_sink_and_its_cost_recorded(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    _train_from(tmp_path, tiny_model_dir, "kv_bias", "kv")
    info = json.loads((tmp_path / "kv" / "model" / "training.json").read_text())
    assert 0 < info["retrofit_logit_change"] < 1  # the sink takes some softmax share, and it is measured
    reloaded = load_model(ModelSpec(str(tmp_path / "kv" / "model"), device="cpu")).model
    assert reloaded.config.qharness_mitigation == "kv_bias"
    biases = [m.kv_bias for m in reloaded.modules() if hasattr(m, "kv_bias")]
    assert biases and all(b.k.abs().max() > 0 for b in biases)  # they started at zero and trained


def test_retrofit_zeroes_the_sink(tiny_model_dir):
    from qharness.models.mitigations.kv_bias import zero_kv_bias_

    model = load_model(ModelSpec(str(tiny_model_dir), device="cpu")).model
    build_(model, "kv_bias")
    zero_kv_bias_(model)
    biases = [m.kv_bias for m in model.modules() if hasattr(m, "kv_bias")]
    assert len(biases) == 2 and all(not b.k.any() and not b.v.any() for b in biases)
