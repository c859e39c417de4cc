"""`ensure(name)`: make a model that is trained here on first use exist before anything loads it.

Loading (qharness.models.sources) only reads; the commands call this first, so training is an explicit step with
its own progress and budget. A source whose models are trained here maps to its trainer in `TRAINERS`; every other
name needs nothing and passes through.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qharness.models.sources import source_for
from qharness.training.cached import train_zoo_model
from qharness.training.continued import train_tune_model

Trainer = Callable[..., Path | None]  # (name, progress=, budget_minutes=) -> model folder, or None if stopped early
TRAINERS: dict[str, Trainer] = {"zoo": train_zoo_model, "tune": train_tune_model}


def ensure(name: str, progress: bool = True, budget_minutes: float | None = None) -> Path | None:
    """Train `name` if its source trains models and it is missing; returns the trained folder (None when the budget
    stopped training first, or for a name that needs no training)."""
    source = source_for(name)
    for base in source.requires(name):  # a tuned model's base first (a zoo model can be tuned too)
        ensure(base, progress=progress)
    trainer = TRAINERS.get(source.name)
    return None if trainer is None else trainer(name, progress=progress, budget_minutes=budget_minutes)

