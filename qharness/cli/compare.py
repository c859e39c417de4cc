"""`qharness compare`: the report from a leaderboard."""

from __future__ import annotations

import argparse
from pathlib import Path

EXAMPLES = """examples:
  qharness compare                      # results/leaderboard.csv -> results/report.md, report.html, plots
  qharness compare --results other.csv --out other/
"""


HELP = "write the report: degradation, causal check, correlation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=Path("results/leaderboard.csv"))
    parser.add_argument("--out", type=Path, default=Path("results"))


def main(args: argparse.Namespace) -> int:
    from qharness.core.errors import DataError
    from qharness.data.results import check_writable_dir
    from qharness.report.compare import compare

    if not args.results.is_file():
        what = (f"leaderboard {args.results} is a directory, not a CSV file" if args.results.is_dir()
                else f"leaderboard not found: {args.results}")
        raise DataError(f"{what}; run `qharness run` first or pass --results FILE.csv")
    check_writable_dir(args.out, "--out")
    summary = compare(args.results, args.out)
    print(f"{summary['degradations']} quantized results compared -> {args.out / 'report.md'}, "
          f"{args.out / 'report.html'}")
    for check in summary["causal_checks"]:
        print(f"causal check {check['model']} {check['quant']} keep {check['keep']} on {check['task']}: "
              + (f"{check['recovered']:.0%} of the {check['metric']} loss recovered" if check["recovered"] is not None
                 else f"the plain scheme lost no {check['metric']}: nothing to recover")
              + (" (within noise: the paired interval of kept - plain covers 0)" if check.get("within_noise") else ""))
    return 0
