"""Re-derive the training columns of a leaderboard's rows (`train_seed`, `train_recipe`) from each model's training
record, for rows written before that derivation was corrected: a record that predates a setting once got a recipe
digest of its own, so its rows did not group with the same recipe's other seeds (data/recipe.unseeded_digest). Only
those two columns change; a model whose record is not on this machine (or that was not trained here) keeps its
values, and the file is rewritten atomically under the writers' lock. Run it on every leaderboard of trained models
after a change to that digest (leaving `budget_minutes` out of it renamed every recipe, 2026-12-05): rows of the old
digest and the new never group as one recipe's seeds, nor find their control.

    python -m qharness.experiment.refresh_training results/published/tune400-seeds.csv ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qharness.data.results import locked, read_rows, to_csv, write_atomic
from qharness.models.sources import training_seed


def refresh(path: Path) -> int:
    """How many rows of `path` changed."""
    with locked(path):
        rows = read_rows(path)
        derived: dict[str, tuple[int | None, str]] = {}
        changed = 0
        for row in rows:
            if row["model"] not in derived:  # one read of a model's record, not one per row
                derived[row["model"]] = training_seed(row["model"])
            seed, recipe = derived[row["model"]]
            if seed is None:
                continue
            if (row.get("train_seed", ""), row.get("train_recipe", "")) != (str(seed), recipe):
                row.update(train_seed=str(seed), train_recipe=recipe)
                changed += 1
        if changed:
            write_atomic(path, to_csv(rows))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qharness.experiment.refresh_training",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("leaderboards", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.leaderboards:
        if not path.is_file():
            print(f"qharness: error: {path}: no such leaderboard", file=sys.stderr)
            return 2
        print(f"{path}: {refresh(path)} rows re-derived")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
