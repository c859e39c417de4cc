"""One run: a model, its fp baseline and each quantized variant, evaluated on each task, appended to the results.

`run(settings)` is `qharness.experiment` end to end: `plan` resolves and checks every name before anything loads,
`execute` skips cells already in the leaderboard (unless `force`), computes the fp baseline once per task, and writes
each cell's rows as soon as they exist. Kept for callers of the library that knew it by this name.
"""

from __future__ import annotations

from collections.abc import Callable

from qharness.experiment.execute import RunReport, execute
from qharness.experiment.plan import plan
from qharness.experiment.settings import DEFAULT_TASKS, RunSettings

__all__ = ["DEFAULT_TASKS", "RunReport", "RunSettings", "run"]


def run(settings: RunSettings, say: Callable[[str], None] = print, progress: bool = True) -> RunReport:
    return execute(plan(settings), say=say, progress=progress)
