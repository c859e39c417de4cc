"""Calibration data for static activation scales (and GPTQ): a few sequences of the calibration text. The layers
that observe them are sim's (`qharness.quant.sim.calibrate_`).

The calibration text (tasks/data/calibration.txt) is drawn from the training split, never from the held-out sets
the tasks evaluate on (qharness/tasks/corpus.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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
