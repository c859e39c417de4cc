"""Per-unit results beside the leaderboard, and the interval columns of a row computed from them.

Layout: `results/leaderboard.csv` keeps its per-unit results in `results/leaderboard.units/<digest>.npz`, one file
per row, named by the digest of the row's key (`units_path`). Why one file per row and not one archive: a run
appends rows one cell at a time, and Ray sweeps write from several processes; a file per row is written once with
an atomic `os.replace` and never rewritten by another row's write, where a single archive would be read and
rewritten whole on every cell (quadratic I/O, and a second lock). Why npz: numpy alone reads it, float32 NLLs
are 4 bytes a token (held-out KJV: 30 kB a row; a 96-cell sweep on two texts: about 8 MB).

Each file holds `units` (the NLL of every predicted token in text order, or each item's score), `kind` ("nll" or
"score"), `units_hash` (the digest of the predicted token ids or the items: rows pair only when it agrees) and
`key` (the row's key, checked on read). The file is written before its row, so a row never exists without its
units; a file without a row (a kill between the two) is overwritten by the rerun. A row without a file (a
leaderboard written before units were kept) reads fine and has no interval. Nothing recomputes a model for one.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qharness.core.errors import DataError
from qharness.data.results import BASELINE, KEY_COLUMNS, Row, key, write_atomic
from qharness.stats import bootstrap

FP_FIELDS = {"quant": BASELINE, "backend": "", "keep": "", "kv": "", "transform": ""}  # what makes a row its fp row


@dataclass(frozen=True)
class Units:
    values: np.ndarray  # per-token NLL (kind "nll") or per-item score (kind "score"), in order
    kind: str
    units_hash: str

    def pairs_with(self, other: Units | None) -> bool:
        return (other is not None and other.kind == self.kind and len(other.values) == len(self.values)
                and other.units_hash == self.units_hash)


def units_of(metric: object) -> Units | None:
    """A task's metric as Units (None when its task kept none)."""
    values = getattr(metric, "units", None)
    if values is None or len(values) == 0:
        return None
    kind = "nll" if getattr(metric, "kind", "") == "token-level" else "score"
    # rounded as the file stores them, so an interval recomputed from the file is the one the row carries
    return Units(np.asarray(values, dtype=np.float32).astype(np.float64), kind, getattr(metric, "units_hash", ""))


def units_dir(results: Path) -> Path:
    return results.with_name(results.name.removesuffix(".csv") + ".units")


def units_path(results: Path, row_key: tuple[str, ...]) -> Path:
    digest = hashlib.sha1(json.dumps(list(row_key)).encode()).hexdigest()[:20]
    return units_dir(results) / f"{digest}.npz"


def fp_key(row_key: tuple[str, ...]) -> tuple[str, ...]:
    """The key of the fp row a row is measured against (same model, task and settings, nothing quantized)."""
    return tuple(FP_FIELDS.get(column, value) for column, value in zip(KEY_COLUMNS, row_key, strict=True))


def write_units(results: Path, row_key: tuple[str, ...], units: Units) -> Path:
    """Atomically (temp file + os.replace, results.write_atomic) write one row's units; a rerun replaces them."""
    path = units_path(results, row_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    # NLLs in float32: 1e-7 relative on values of a few nats, far below any difference an interval resolves
    np.savez(buffer, units=units.values.astype(np.float32), kind=np.array(units.kind),
             units_hash=np.array(units.units_hash), key=np.array(json.dumps(list(row_key))))
    write_atomic(path, buffer.getvalue())
    return path


def store_units(results: Path, row_key: tuple[str, ...], units: Units | None) -> None:
    """Write a row's units, or remove a stale file when the recomputed row kept none."""
    if units is not None:
        write_units(results, row_key, units)
    else:
        units_path(results, row_key).unlink(missing_ok=True)


def read_units(results: Path, row_key: tuple[str, ...]) -> Units | None:
    """A row's units, or None when none were kept (an older leaderboard). A damaged file raises DataError."""
    path = units_path(results, row_key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored_key = tuple(json.loads(str(data["key"])))
            units = Units(data["units"].astype(np.float64), str(data["kind"]), str(data["units_hash"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a qharness units file ({exc}); delete it (its row then has no interval) or "
                        "rerun the row with --force") from None
    if stored_key != tuple(row_key):
        raise DataError(f"{path}: holds the units of another row {stored_key[:3]}; delete it or rerun with --force")
    return units


def read_row_units(results: Path, row: Row) -> Units | None:
    return read_units(results, key(row))


def interval_columns(metric: object, fp_units: Units | None, is_baseline: bool, seed: int,
                     interval: bool = True) -> dict[str, str]:
    """A row's uncertainty columns: an fp row's interval on its value, a quantized row's paired interval on
    rel_delta (against fp units on the same tokens or items; none without them), the standard error of an
    accuracy, and the windows of a perplexity. `interval=False` (`--no-intervals`) leaves the ci columns empty."""
    units = units_of(metric)
    out = {"windows": "" if getattr(metric, "windows", None) is None else str(metric.windows)}  # type: ignore[attr-defined]
    if units is None:
        return out
    if units.kind == "score":
        stderr = bootstrap.standard_error(float(np.mean(units.values)), len(units.values))
        out["stderr"] = "" if stderr is None else repr(stderr)
    found = _interval(units, fp_units, is_baseline, seed) if interval else None
    if found is not None:
        out.update(ci_of="value" if is_baseline else "rel_delta", ci_low=repr(found.low), ci_high=repr(found.high),
                   ci_blocks=str(found.blocks), ci_resamples=str(found.resamples))
    return out


def _interval(units: Units, fp_units: Units | None, is_baseline: bool, seed: int) -> bootstrap.Interval | None:
    if is_baseline:
        if units.kind == "nll":
            return bootstrap.ppl_interval(units.values, seed=seed)
        return bootstrap.mean_interval(units.values, seed=seed)
    if fp_units is None or not units.pairs_with(fp_units):
        return None
    if units.kind == "nll":
        return bootstrap.rel_change_interval(fp_units.values, units.values, seed=seed)
    return bootstrap.ratio_change_interval(fp_units.values, units.values, seed=seed)
