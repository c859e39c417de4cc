"""Distillation of a retrofitted model to the model it was made from (training/distill.py), on the tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

from qharness.errors import ConfigError
from qharness.models.drift import logit_gap
from qharness.models.norms import DyT
from qharness.models.sources import ModelSpec, load_model
from qharness.quant.calibrate import calibration_batches, calibration_text
from qharness.recipe import TUNE400_TRAIN
from qharness.training.distill import DistillConfig, distill_, kl_to_teacher
from qharness.training.tune import retrofit_


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
