"""Distillation of a retrofitted model to the model it was made from (training/distill.py), on the tiny model."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from qharness.core.errors import ConfigError
from qharness.data.recipe import TUNE400_TRAIN
from qharness.models.drift import logit_gap
from qharness.models.norms import DyT
from qharness.models.sources import ModelSpec, load_model
from qharness.quant.calibrate import calibration_batches, calibration_text
from qharness.training.continued import retrofit_
from qharness.training.distill import DistillConfig, distill_, kl_to_teacher


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert kl_to_teacher(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_to_teacher(logits, logits + torch.randn(2, 5, 11)).item() > 0


def test_distilling_the_dyt_parameters_brings_the_logits_back_and_moves_nothing_else(tiny_model_dir, training_tokens):
    loaded = load_model(ModelSpec(str(tiny_model_dir), dtype="fp32", device="cpu"), progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    teacher = copy.deepcopy(model)
    retrofit_(model, "dyt", tokenizer)
    batches = calibration_batches(tokenizer, calibration_text(), n=2, length=64)
    before = logit_gap(model, teacher, batches)
    trainable = [p for m in model.modules() if isinstance(m, DyT) for p in m.parameters()]
    others = {name: p.detach().clone() for name, p in model.named_parameters()
              if not any(p is q for q in trainable)}
    assert len(trainable) == 5 * 3 and others
    train = TUNE400_TRAIN.__class__(**{**TUNE400_TRAIN.__dict__, "context": 64})
    log = distill_(model, teacher, trainable, training_tokens, train, tokenizer.bos_token_id,
                   DistillConfig(steps=30, lr=1e-2, log_every=10), drift=lambda: logit_gap(model, teacher, batches))
    assert [e["step"] for e in log] == [10, 20, 30]
    assert log[-1]["kl"] < log[0]["kl"] and log[-1]["logit_drift"] < before
    for name, p in model.named_parameters():
        if name in others:
            assert torch.equal(p, others[name]), name
        assert p.requires_grad, name  # frozen only while distilling


def test_bad_distillation_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="distillation steps"):
        DistillConfig(steps=0)
    with pytest.raises(ConfigError, match="distillation lr"):
        DistillConfig(lr=float("nan"))


def test_continued_training_distils_before_step_one_and_a_resume_reads_it_back(tmp_path, tiny_model_dir, monkeypatch):
    """A mitigation that declares what to distil is distilled once, before the first step; the recorded logit change
    is the distilled one, and a resumed run neither distils again nor loses the record."""
    from dataclasses import replace

    from qharness.data.recipe import TUNE_TRAIN
    from qharness.models.mitigations import MITIGATIONS, load_mitigations
    from qharness.models.sources import tune as tune_names
    from qharness.tasks.spec import tasks_dir
    from qharness.training import continued as tune_training
    from qharness.training import distill as distill_module

    load_mitigations()
    entry = MITIGATIONS.entry("dyt")
    monkeypatch.setitem(MITIGATIONS._entries, "dyt", replace(entry, obj=replace(
        entry.obj, distill=lambda model: [p for m in model.modules() if isinstance(m, DyT) for p in m.parameters()])))
    monkeypatch.setattr(distill_module.DistillConfig.__init__, "__defaults__", (5, 1e-2, 5))
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    recipe = replace(tune_names.RECIPE, base=str(tiny_model_dir), mitigation="dyt",
                     data=(str(tasks_dir() / "data" / "calibration.txt"),),
                     train=replace(TUNE_TRAIN, steps=4, context=32, log_every=2, checkpoint_every=2))
    calls = []
    real = tune_training.distill_to_
    monkeypatch.setattr(tune_training, "distill_to_", lambda *args: calls.append(1) or real(*args))
    train = tune_training.train
    monkeypatch.setattr(tune_training, "train", lambda *a, **k: train(*a[:5], [*a[5], _stop_at(3)], *a[6:], **k))
    with pytest.raises(KeyboardInterrupt):
        tune_training.continue_training(recipe, tmp_path / "run", progress=False)
    record = json.loads((tmp_path / "run" / "distill.json").read_text())
    assert calls == [1] and record["steps"] == 5 and [e["step"] for e in record["log"]] == [5]
    assert record["logit_change_after"] == record["log"][-1]["logit_drift"]
    monkeypatch.setattr(tune_training, "train", train)
    assert tune_training.continue_training(recipe, tmp_path / "run", progress=False).finished
    assert calls == [1]  # the resumed run took the checkpoint's weights and did not distil again
    info = json.loads((tmp_path / "run" / "model" / "training.json").read_text())
    assert info["distillation"] == record and info["retrofit_logit_change"] == record["logit_change_after"]


def _stop_at(stop: int):
    def hook(model, step):
        if step == stop:
            raise KeyboardInterrupt

    return hook
