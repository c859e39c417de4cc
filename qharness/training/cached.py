"""A model trained once into the cache: `train_once` trains a missing one, one trainer per folder at a time,
resuming its checkpoint if a run was interrupted (zoo and tune models alike), and `train_zoo_model` is the zoo's
trainer. The zoo's names, recipe and cache folders live in its model source (qharness.models.sources.zoo), which
reads a trained one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from qharness.models.sources import is_trained_run
from qharness.models.sources.zoo import folder_for, recipe_for

if TYPE_CHECKING:
    from qharness.training.loop import TrainResult


@contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """One trainer per model: a sweep's workers asking for the same zoo model wait for the first to finish. Under
    `accelerate launch` the main process holds it for all ranks (taken by each, it deadlocked; see
    loop.main_process_lock)."""
    from qharness.training.loop import main_process_lock

    with main_process_lock(folder / ".lock"):
        yield


def train_once(name: str, folder: Path, announce: str, run: Callable[[Path], TrainResult],
               progress: bool = True) -> Path | None:
    """The cached model folder of `name` (folder/model), trained by `run(folder)` unless it is there; None when a
    budget stopped the training first. One trainer per folder at a time (zoo and tune models alike)."""
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder):
        if not is_trained_run(folder):
            if progress:
                print(f"{name}: not trained yet; training it now ({announce}, resumable)")
            if not run(folder).finished:
                return None
    return folder / "model"


def train_zoo_model(name: str, progress: bool = True, budget_minutes: float | None = None) -> Path | None:
    """Train `name` unless it is trained; returns its model folder, or None when the budget stopped it first."""
    from qharness.training.run import train_model

    recipe = recipe_for(name)
    return train_once(name, folder_for(name), f"{recipe.train.steps} steps",
                      lambda folder: train_model(recipe, folder, progress=progress, budget_minutes=budget_minutes),
                      progress)
