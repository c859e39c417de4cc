"""The leaderboard: one CSV row per (model, scheme, backend, task, metric, settings). Append-only, atomic, keyed.

Atomic: every write builds the whole new file beside the old one and `os.replace`s it in, so a kill at any moment
leaves either the old or the new file, never half of one. A lock file serializes concurrent writers (read, merge,
replace) so two processes appending at once lose nothing. Resumable: `key(row)` names the experiment a row
answers; a run skips every key that is already there unless forced, and a forced rerun replaces the row.

Columns are documented in results/README.md. `make_row` is the one place a row is built (run and scan rows alike),
and `BASELINE`, the layer-error files and the scan folders are named here once. A file written before a column
existed still reads: the column comes back empty (`read_rows`), and `compare` fills what the model name can tell.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import glob
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from qharness.core.errors import DataError

COLUMNS = (
    # what was measured (the key)
    "model", "quant", "backend", "keep", "kv", "transform", "task", "task_hash", "metric", "bos", "context_length",
    "limit", "dtype", "device_type",
    # the numbers
    "value", "fp_value", "delta", "rel_delta", "higher_is_better", "metric_kind", "n", "chance", "weight_bytes",
    # how sure the numbers are (bootstrap.py; empty in files written before them, and where no units were kept):
    # the interval of `ci_of` (rel_delta for a quantized row, value for an fp row), its resampling units and draws,
    # lm-eval's standard error of an accuracy, and how many windows the tokens of a perplexity came from
    "ci_of", "ci_low", "ci_high", "ci_blocks", "ci_resamples", "stderr", "windows",
    # what the model is (from its config and source, so that readers never parse model names)
    "arch", "mitigation", "family", "train_seed", "train_recipe",
    # how to reproduce it
    "model_source", "scheme", "seed", "versions", "device", "git_rev", "run_id", "time", "seconds",
)
KEY_COLUMNS = COLUMNS[:14]
BASELINE = "none"  # the quant of full-precision rows (and of scan rows)
SCAN_TASK = "scan"  # the task of the scan's summary rows
BENCH_TASK = "bench:"  # + eager | compile: the task of `qharness bench`'s cost rows

Row = dict[str, str]


def _text(value: object) -> str:
    """How a value is written into the CSV: floats round-trip exactly (repr), configs as sorted JSON."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def make_row(value: float | None = None, fp_value: float | None = None, **fields: object) -> Row:
    """A leaderboard row: every column present, `delta` and `rel_delta` computed from value and fp_value."""
    unknown = sorted(set(fields) - set(COLUMNS) - {"delta", "rel_delta"})
    if unknown:
        raise ValueError(f"not leaderboard columns: {unknown}")  # a bug in the caller, not user input
    row = dict.fromkeys(COLUMNS, "")
    row.update({column: _text(v) for column, v in fields.items()})
    row["value"], row["fp_value"] = _text(value), _text(fp_value)
    if value is not None and fp_value is not None:
        delta = value - fp_value
        row["delta"], row["rel_delta"] = repr(delta), repr(delta / fp_value) if fp_value else ""
    return row


def is_full_precision(quant: str, kv: str = "") -> bool:
    """The one baseline rule: fp weights *and* an fp KV cache (`quant none` with a quantized cache is a quantized
    row like any other). '' is a scan row's or an old file's empty quant."""
    return quant in ("", BASELINE) and not kv


def is_baseline(row: Row) -> bool:
    """Whether a leaderboard row is the fp row every other row of its task is measured against."""
    return is_full_precision(row.get("quant", ""), row.get("kv", ""))


def is_cost(row: Row) -> bool:
    """A speed or memory row of `qharness bench`, not a quality measurement."""
    return row.get("task", "").startswith(BENCH_TASK)


def layer_errors_dir(results: Path) -> Path:
    """Where `run --layer-errors` writes one JSON per (model, scheme, kept) and `compare` reads them."""
    return results.parent / "layers"


def layer_errors_path(results: Path, model: str, quant: str, keep_label: str) -> Path:
    return layer_errors_dir(results) / f"{slug(f'{model}__{quant}__{keep_label or BASELINE}', limit=120)}.json"


def scan_dir(results: Path) -> Path:
    """Where a sweep writes the scan profiles of the models it runs, next to its leaderboard."""
    return results.parent / "scan"


def slug(text: str, limit: int = 80) -> str:
    """A file-name-safe form of a model name or a cell label, for files written under results/."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[-limit:]


def key(row: Row) -> tuple[str, ...]:
    return tuple(str(row.get(column, "")) for column in KEY_COLUMNS)


# Every leaderboard qharness ever wrote has these (kv and transform came later: empty in older files, as in rows
# that quantize no KV cache and transform nothing, so old rows keep their keys).
REQUIRED_COLUMNS = tuple(c for c in KEY_COLUMNS if c not in ("kv", "transform")) + ("value",)
NUMERIC_COLUMNS = ("value", "fp_value", "delta", "rel_delta", "ci_low", "ci_high", "stderr")


def _unreadable(path: Path, what: str) -> DataError:
    return DataError(f"{path}: {what}; qharness never rewrites a leaderboard it cannot read whole, so nothing was "
                     "computed or written: fix or delete that part (the other rows are intact), or pass another "
                     "--results")


def _check_record(header: list[str], record: list[str], line: int, is_last: bool, ends_cleanly: bool) -> str | None:
    """Why a CSV record is not a leaderboard row, or None when it is one."""
    if len(record) != len(header):
        torn = " (cut off: the file ends inside it)" if is_last and not ends_cleanly else ""
        return f"line {line} has {len(record)} fields, the header {len(header)}{torn}"
    for column, value in zip(header, record, strict=True):
        if column in NUMERIC_COLUMNS and value:
            try:
                number = float(value)
            except ValueError:
                return f"line {line}: {column} is {value[:20]!r}, not a number"
            if not math.isfinite(number):  # qharness never stores one (check_finite): a nan read back would pass for
                return f"line {line}: {column} is {value!r}, not a finite number"  # a result, and compare print +nan%
    return None


def read_rows(path: Path) -> list[Row]:
    """Every row, with every current column (empty where an older file lacks it) and any extra ones it has.
    A file that is not wholly a leaderboard (binary, wrong header, a torn or garbled line) raises DataError."""
    if path.is_dir():
        raise DataError(f"leaderboard {path} is a directory; pass a CSV file such as {path / 'leaderboard.csv'}")
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _unreadable(path, "not UTF-8 text (binary data?)") from None
    if "\0" in text:
        raise _unreadable(path, "contains NUL bytes (binary data?)")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        records = [(reader.line_num, record) for record in reader if record]
    except csv.Error as exc:
        raise _unreadable(path, f"not valid CSV ({exc})") from None
    if not records:
        return []
    header = records[0][1]
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        raise _unreadable(path, f"its header lacks the columns {missing[:4]}, so it is not a qharness leaderboard")
    rows = []
    for i, (line, record) in enumerate(records[1:], start=2):
        problem = _check_record(header, record, line, i == len(records), text.endswith("\n"))
        if problem:
            raise _unreadable(path, problem)
        rows.append({**dict.fromkeys(COLUMNS, ""), **dict(zip(header, record, strict=True))})
    return rows


def check_writable(path: Path, flag: str = "--results") -> None:
    """Before any compute: `path` can be created or replaced (its folder is a writable folder) and, if it exists,
    reads as a leaderboard (read_rows also refuses a directory). Raises a one-line DataError."""
    check_writable_dir(path.parent, flag)
    read_rows(path)


def check_writable_dir(folder: Path, flag: str) -> None:
    """`folder` exists as a writable directory or can be created as one."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise DataError(f"{flag}: cannot create {folder}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{flag}: cannot write in {existing} (permission denied); pass a path you can write to")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _file_mode(path: Path) -> int:
    """The mode the new file should have: the old file's, else what open() would give (0666 less the umask)."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write `text` (or bytes) to `path` so that readers and crashes only ever see the old or the new whole file."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp makes it private (0600); a replaced file keeps its own mode
        binary = isinstance(text, bytes)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def to_csv(rows: Iterable[Row]) -> str:
    rows = list(rows)
    extra = sorted({c for row in rows for c in row} - set(COLUMNS))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*COLUMNS, *extra], lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: ("" if row.get(c) is None else str(row.get(c))) for c in (*COLUMNS, *extra)}
                     for row in rows)
    return out.getvalue()


def append_rows(path: Path, new_rows: Iterable[Row]) -> None:
    """Add rows; a row whose key is already there replaces the old one (a forced recompute)."""
    new_rows = [{c: "" if v is None else str(v) for c, v in row.items()} for row in new_rows]
    with locked(path):
        for orphan in path.parent.glob(f"{glob.escape(path.name)}.*.tmp"):  # every writer holds the lock, so a
            orphan.unlink(missing_ok=True)  # temp file seen here was left by one killed mid-write
        replaced = {key(row) for row in new_rows}
        kept = [row for row in read_rows(path) if key(row) not in replaced]
        write_atomic(path, to_csv([*kept, *new_rows]))


def existing_keys(path: Path) -> dict[tuple[str, ...], Row]:
    return {key(row): row for row in read_rows(path)}
