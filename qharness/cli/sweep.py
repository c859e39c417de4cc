"""`qharness sweep FILE.yaml`: a resumable grid of runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from qharness.cli import values

EXAMPLES = """examples:
  qharness sweep sweeps/default.yaml       # the default grid: smollm2-135m x every scheme x the offline tasks
  qharness sweep my-grid.yaml              # see qharness/experiment/sweep.py for the keys
"""


HELP = "run a resumable grid of models x schemes x tasks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="sweep YAML (models, quants, tasks, keep_positions, limit, ...)")
    parser.add_argument("--quiet", action="store_true")


def main(args: argparse.Namespace) -> int:
    from qharness.experiment.sweep import SweepConfig, sweep

    config = SweepConfig.from_file(args.config)
    report = sweep(config, say=values.messages(args.quiet))
    rows = sum(len(r.rows) for r in report.reports)
    print(f"sweep: {len(report.reports)} runs, computed {report.computed} of {rows} rows -> {config.results}")
    return 0
