"""How far an in-place change to a model moved what it computes: the one measure behind a mitigation's retrofit
(training/tune.py) and a post-hoc transform's check (quant/transforms), so both report the same number."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def logit_drift(model: Any, batches: list[torch.Tensor], change: Callable[[], Any]) -> float:
    """Run `change()` (which edits `model` in place) between two forward passes over `batches`; returns the largest
    max |logits after - logits before| / max |logits before| over the batches, computed in float64."""
    with torch.no_grad():  # the change edits weights in place; nothing here is trained
        before = [model(input_ids=ids).logits.double() for ids in batches]
        change()
        after = [model(input_ids=ids).logits.double() for ids in batches]
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(after, before, strict=True))


def logit_gap(model: Any, reference: Any, batches: list[torch.Tensor]) -> float:
    """`logit_drift`'s measure between two models: the largest max |logits of model - logits of reference| / max
    |logits of reference| over the batches, in float64 (a retrofitted model against the one it was made from)."""
    with torch.no_grad():
        gaps = []
        for ids in batches:
            ours, theirs = model(input_ids=ids).logits.double(), reference(input_ids=ids).logits.double()
            gaps.append(float((ours - theirs).abs().max() / theirs.abs().max()))
    return max(gaps)
