import signal
import subprocess
import sys
import textwrap
import time

import pytest

from qharness.data import results
from qharness.data.results import COLUMNS, KEY_COLUMNS, append_rows, existing_keys, key, read_rows


def row(task: str, value: float, quant: str = "int8-w8a8-token") -> dict[str, str]:
    base = dict.fromkeys(KEY_COLUMNS, "x")
    base.update(model="m", quant=quant, task=task, value=str(value))
    return base


def test_append_then_read_back_with_all_columns(tmp_path):
    path = tmp_path / "leaderboard.csv"
    append_rows(path, [row("a", 1.0), row("b", 2.0)])
    append_rows(path, [row("c", 3.0)])
    rows = read_rows(path)
    assert [r["task"] for r in rows] == ["a", "b", "c"]
    assert list(rows[0]) == list(COLUMNS)


def test_same_key_replaces_and_other_keys_stay(tmp_path):
    path = tmp_path / "leaderboard.csv"
    append_rows(path, [row("a", 1.0), row("b", 2.0)])
    append_rows(path, [row("a", 9.0)])
    values = {r["task"]: r["value"] for r in read_rows(path)}
    assert values == {"a": "9.0", "b": "2.0"}
    assert key(row("a", 1.0)) in existing_keys(path)
    assert key(row("a", 1.0, quant="none")) not in existing_keys(path)


def test_unknown_columns_of_older_files_are_kept(tmp_path):
    path = tmp_path / "leaderboard.csv"
    append_rows(path, [{**row("a", 1.0), "note": "old column"}])
    append_rows(path, [row("b", 2.0)])
    rows = read_rows(path)
    assert rows[0]["note"] == "old column" and rows[1]["note"] == ""


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "leaderboard.csv"
    append_rows(path, [row("a", 1.0)])
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        append_rows(path, [row("b", 2.0)])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leaderboard.csv", "leaderboard.csv.lock"]


WRITER = textwrap.dedent("""
    import sys
    from qharness.data.results import KEY_COLUMNS, append_rows
    path, tag = sys.argv[1], sys.argv[2]
    for i in range(int(sys.argv[3])):
        r = dict.fromkeys(KEY_COLUMNS, "x")
        r.update(task=f"{tag}-{i}", value=str(i), model_source="y" * 2000)  # big rows: writes take a while
        append_rows(__import__("pathlib").Path(path), [r])
""")


def test_killed_writer_never_leaves_a_half_written_file(tmp_path):
    path = tmp_path / "leaderboard.csv"
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"k{attempt}", "100000"])
        time.sleep(1.0 + 0.3 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rows = read_rows(path)
        assert rows, "the writer wrote nothing before the kill"
        assert all(r["model_source"] == "y" * 2000 and r["value"].isdigit() for r in rows)
        tasks = [r["task"] for r in rows if r["task"].startswith(f"k{attempt}-")]
        assert tasks == [f"k{attempt}-{i}" for i in range(len(tasks))]  # a prefix of what it wrote, in order
    assert len({r["task"] for r in read_rows(path)}) == len(read_rows(path))


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "leaderboard.csv"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, "15"]) for tag in ("p", "q")]
    assert [p.wait() for p in procs] == [0, 0]
    tasks = sorted(r["task"] for r in read_rows(path))
    assert tasks == sorted([f"p-{i}" for i in range(15)] + [f"q-{i}" for i in range(15)])


def test_a_real_run_leaderboard_loads_in_pandas(tiny_model_dir, tiny_task_dir, tmp_path):
    pandas = pytest.importorskip("pandas")
    from qharness.experiment.runner import run
    from qharness.experiment.settings import RunSettings

    path = tmp_path / "lb.csv"
    run(RunSettings(model=str(tiny_model_dir), quants=("int8", "int8-w8a8-tensor"),
                    tasks=(str(tiny_task_dir / "short.yaml"),), results=path), say=lambda m: None, progress=False)
    frame = pandas.read_csv(path)
    assert list(frame.columns) == list(COLUMNS) and len(frame) == 3
    assert pandas.api.types.is_float_dtype(frame["value"]) and frame["value"].notna().all()
    quantized = frame[frame["quant"] != "none"]
    assert (quantized["delta"] - (quantized["value"] - quantized["fp_value"])).abs().max() < 1e-3
