"""`python -m qharness.experiment.curve_sweep sweeps/tune400.yaml`: the training curves' whole table, resumable.

The file is a sweep file (qharness/experiment/sweep.py) whose models are points of training runs, `tune400:...@step<N>`.
Runs are taken one at a time in the file's order: train the run (its snapshot steps kept in bf16; resumed from its
checkpoint if it was interrupted), evaluate each of its steps (the sweep's schemes, tasks and scan; rows already in
the leaderboard are skipped), then delete those steps' weights: every number they give is in the leaderboard, and
four bf16 copies of a 135M-parameter model are 1 GB per run. Models without a step (the pretrained reference) are
evaluated as a plain sweep would. Stop it at any point and run the same command again: it continues where it was.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from qharness.core.errors import QHarnessError
from qharness.experiment.sweep import SweepConfig, SweepReport, sweep
from qharness.models.sources.tune import step_of


def run_groups(models: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    """(run, its models) in the file's order: a run's @step names together under the name without the step; a name
    without a step is a group of its own."""
    groups: dict[str, list[str]] = {}
    for model in models:
        parsed = step_of(model)
        groups.setdefault(parsed[0] if parsed else model, []).append(model)
    return [(run, tuple(names)) for run, names in groups.items()]


def delete_evaluated(names: tuple[str, ...], say: Callable[[str], Any]) -> None:
    """Remove the snapshot folders of `names`: called once their sweep finished, so their rows are all written."""
    from qharness.models.sources.tune import folder_for, parse_name, snapshot_folder

    for name in names:
        step = parse_name(name).step
        folder = snapshot_folder(folder_for(name), step) if step is not None else None
        if folder is not None and folder.is_dir():
            shutil.rmtree(folder)
            say(f"{name}: evaluated; its bf16 weights deleted")


def curve_sweep(config: SweepConfig, say: Callable[[str], Any] = print) -> SweepReport:
    from qharness.experiment.plan import plan_all
    from qharness.training.ensure import ensure

    plan_all(config.cells())  # every name and setting is checked before anything trains
    report = SweepReport()
    for run, names in run_groups(config.models):
        stepped = any(step_of(name) for name in names)
        if stepped:
            say(f"{run}: training (resumes its checkpoint; a finished run trains nothing)")
            ensure(run, progress=False)
        tasks_for = {name: tasks for name, tasks in config.tasks_for.items() if name in names}
        report.reports += sweep(replace(config, models=names, tasks_for=tasks_for), say).reports
        if stepped:
            delete_evaluated(names, say)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qharness.experiment.curve_sweep",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="a sweep file of tune400:...@step<N> models (sweeps/tune400.yaml)")
    args = parser.parse_args(argv)
    try:
        config = SweepConfig.from_file(args.config)
        report = curve_sweep(config, say=lambda message: print(message, file=sys.stderr, flush=True))
    except QHarnessError as exc:
        print(f"qharness: error: {exc}", file=sys.stderr)
        return 2
    rows = sum(len(r.rows) for r in report.reports)
    print(f"curve sweep: {len(report.reports)} model runs, computed {report.computed} of {rows} rows -> "
          f"{config.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
