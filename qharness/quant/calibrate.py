"""Calibration for static activation scales: run a few sequences of the calibration text through the model while
every static `SimQuantLinear` observes its input range, then freeze the ranges.

The calibration text (tasks/data/calibration.txt) is drawn from the training split, never from the held-out sets
the tasks evaluate on (qharness/tasks/corpus.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from qharness.quant.sim import SimQuantLinear
from qharness.tasks.perplexity import bos_token_id, token_windows
from qharness.tasks.spec import tasks_dir

CALIBRATION_FILE = "calibration.txt"


def calibration_text() -> str:
    return (tasks_dir() / "data" / CALIBRATION_FILE).read_text(encoding="utf-8")


CALIBRATION_LENGTH = 256  # tokens per calibration sequence, or the model's context when that is shorter


def calibration_batches(tokenizer: Any, text: str, n: int = 8, length: int = CALIBRATION_LENGTH, bos: bool = True,
                        device: torch.device | str = "cpu") -> list[Tensor]:
    """`n` sequences of `length` tokens (BOS first when `bos`), one per batch."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    windows = [w for w in token_windows(ids, length, bos_token_id(tokenizer) if bos else None) if len(w) == length]
    return [torch.tensor([w], device=device) for w in windows[:n]]


def static_layers(model: nn.Module) -> list[SimQuantLinear]:
    return [m for m in model.modules()
            if isinstance(m, SimQuantLinear) and m.activations is not None and not m.activations.dynamic]


def calibrate_(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Observe and freeze the activation range of every static layer; returns how many layers were calibrated."""
    layers = static_layers(model)
    if not layers:
        return 0
    for layer in layers:
        layer.observing = True
    try:
        with torch.inference_mode():
            for input_ids in batches:
                model(input_ids=input_ids)
        for layer in layers:
            layer.finish_observing()
    finally:  # an interrupted calibration must not leave layers passing inputs through unquantized
        for layer in layers:
            layer.observing, layer._observed = False, []
    return len(layers)
