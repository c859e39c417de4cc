"""Bad input, driven through the command line as a user would: exit code 2, one line `qharness: error: ...` that
names the problem, no traceback, and the leaderboard (when there is one) byte for byte as it was."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from qharness.cli import main
from qharness.data.results import COLUMNS, KEY_COLUMNS, append_rows, read_rows
from qharness.tasks.spec import tasks_dir

Setup = Callable[[Path, Path, Path], list[str]]  # (tmp, tiny model folder, tiny task yaml) -> argv


def _leaderboard(tmp: Path) -> Path:
    path = tmp / "lb.csv"
    append_rows(path, [{**dict.fromkeys(KEY_COLUMNS, "x"), "task": "a", "value": "1.5"},
                       {**dict.fromkeys(KEY_COLUMNS, "x"), "task": "b", "value": "2.5"}])
    return path


def _damaged(change: Callable[[str], str] | bytes) -> Setup:
    """A run against a leaderboard that was damaged after qharness wrote it."""

    def setup(tmp: Path, model: Path, task: Path) -> list[str]:
        path = _leaderboard(tmp)
        if isinstance(change, bytes):
            path.write_bytes(path.read_bytes() + change)
        else:
            path.write_text(change(path.read_text()))
        return ["run", "--model", str(model), "--task", str(task), "--results", str(path), "--quiet"]

    return setup


def _sweep(body: str) -> Setup:
    def setup(tmp: Path, model: Path, task: Path) -> list[str]:
        (tmp / "grid.yaml").write_text(body.format(model=model, task=task, tmp=tmp))
        return ["sweep", str(tmp / "grid.yaml"), "--quiet"]

    return setup


def _run(*extra: str) -> Setup:
    return lambda tmp, model, task: ["run", "--model", str(model), "--task", str(task), "--results",
                                     str(tmp / "lb.csv"), "--quiet", *extra]


def _bad_task(tmp: Path, model: Path, task: Path) -> list[str]:
    (tmp / "bad.yaml").write_text("name: bad\nkind: perplexity\ndata: data/short.txt\ncontext_length: lots\n")
    return ["run", "--model", str(model), "--task", str(tmp / "bad.yaml"), "--results", str(tmp / "lb.csv")]


def _results_is_a_folder(tmp: Path, model: Path, task: Path) -> list[str]:
    (tmp / "folder").mkdir()
    return ["run", "--model", str(model), "--task", str(task), "--results", str(tmp / "folder"), "--quiet"]


def _results_under_a_file(tmp: Path, model: Path, task: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return ["scan", "--model", str(model), "--results", str(tmp / "afile" / "lb.csv"), "--out", str(tmp / "s"),
            "--quiet"]


def _scan_out_under_a_file(tmp: Path, model: Path, task: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return ["scan", "--model", str(model), "--results", str(tmp / "lb.csv"), "--out", str(tmp / "afile" / "s"),
            "--quiet"]


def _compare_out_is_a_file(tmp: Path, model: Path, task: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return ["compare", "--results", str(_leaderboard(tmp)), "--out", str(tmp / "afile")]


def _compare_damaged(tmp: Path, model: Path, task: Path) -> list[str]:
    path = _leaderboard(tmp)
    path.write_text(path.read_text() + "garbage,line\n")
    return ["compare", "--results", str(path), "--out", str(tmp / "out")]


def _out_is_a_file(tmp: Path, model: Path, task: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return ["train", "--arch", "gpt2", "--steps", "1", "--out", str(tmp / "afile"), "--quiet", "--budget", "0.0000001"]


def _train(*extra: str) -> Setup:
    return lambda tmp, model, task: ["train", "--out", str(tmp / "run"), "--quiet", *extra]


# Settings that make a refusal that regressed fail in a second instead of training: the shipped training-split text
# (no corpus fetch) and a budget that ends before the first step.
FAST = ("--data", str(tasks_dir() / "data" / "calibration.txt"), "--budget", "0.0000001")


def _tune(mitigation: str, *extra: str) -> Setup:
    return lambda tmp, model, task: ["train", "--from", str(model), "--mitigation", mitigation, "--out",
                                     str(tmp / "run"), "--quiet", *extra]


def _data(name: str, content: bytes | None = None, folder: bool = False) -> Setup:
    """train --from with --data naming `name` in tmp: a file of `content`, an empty folder, or nothing there."""

    def setup(tmp: Path, model: Path, task: Path) -> list[str]:
        if folder:
            (tmp / name).mkdir()
        elif content is not None:
            (tmp / name).write_bytes(content)
        return ["train", "--from", str(model), "--data", str(tmp / name), "--out", str(tmp / "run"), "--quiet"]

    return setup


def _compare_infinite(tmp: Path, model: Path, task: Path) -> list[str]:
    path = _leaderboard(tmp)
    path.write_text(path.read_text().replace("2.5", "inf"))
    return ["compare", "--results", str(path), "--out", str(tmp / "out")]


def _empty_files(tmp: Path, model: Path, task: Path) -> list[str]:
    """A --data folder whose every file was emptied: it trained on the old text's cached tokens."""
    (tmp / "texts").mkdir()
    (tmp / "texts" / "a.txt").write_text("")
    (tmp / "texts" / "b.txt").write_text("\n\n")
    return ["train", "--from", str(model), "--data", str(tmp / "texts"), "--out", str(tmp / "run"), "--quiet"]


CASES: dict[str, tuple[Setup, str]] = {
    # wrong science, refused before any compute
    "keep position past every window": (_run("--quant", "int8-w8a8-tensor", "--keep-positions", "999999"),
                                        "--keep-positions 999999 is past the end of every window (the longest is 64"),
    "keep channel past the hidden size": (_run("--quant", "int8-w8a8-tensor", "--keep-channels", "99999"),
                                          "--keep-channels 99999 is past the model's hidden size 64"),
    "unknown KV setting": (_run("--kv", "int3-token"), "unknown KV setting 'int3-token'; did you mean"),
    "unknown KV option": (_run("--kv", "int4-token+keep1"), "unknown option '+keep1'; the one option is +keep0"),
    "--quant none without --kv": (_run("--quant", "none"), "--quant none alone is the full-precision baseline"),
    "--keep-positions with only --quant none": (_run("--quant", "none", "--kv", "int8-token", "--keep-positions", "0"),
                                                "--quant none quantizes no Linear; drop them"),
    "--kv none+keep0": (_run("--kv", "none+keep0"), "none keeps the whole cache in full precision and takes no "
                                                   "options"),
    "--transform with only --quant none": (_run("--quant", "none", "--kv", "int8-token", "--transform", "smoothquant"),
                                           "--quant none quantizes none, so no row would be transformed"),
    "sweep transforms with only quant none": (
        _sweep("models: [{model}]\nquants: [none]\nkv: [int8-token]\ntransforms: [smoothquant]\n"),
        "so no row would be transformed"),
    "sweep transforms: []": (_sweep("models: [{model}]\nquants: [int8]\ntransforms: []\n"),
                             "sweep transforms is an empty list"),
    "sweep keep_positions: []": (_sweep("models: [{model}]\nquants: [int8]\nkeep_positions: []\n"),
                                 "sweep keep_positions is an empty list"),
    "sweep transforms: a string": (_sweep("models: [{model}]\nquants: [int8]\ntransforms: rotate\n"),
                                   "transforms is 'rotate' (str); expected a list of a string"),
    "sweep kv: a string": (_sweep("models: [{model}]\nquants: [int8]\nkv: int4-token\n"),
                           "kv is 'int4-token' (str); expected a list of a string"),
    "sweep unknown kv": (_sweep("models: [{model}]\nquants: [int8]\nkv: [none, int4-tokn]\n"),
                         "unknown KV setting 'int4-tokn'"),
    # a leaderboard damaged by something else: refused, never rewritten
    "torn last line": (_damaged(lambda text: text + "m,int8,sim,,t,h,ppl,Tr"), "(cut off: the file ends inside it)"),
    "garbage line": (_damaged(lambda text: text + "this is not,a row\n"),
                     f"line 4 has 2 fields, the header {len(COLUMNS)}"),
    "unterminated quote": (_damaged(lambda text: text + '"m,int8\n'), "line 4 has 1 fields"),
    "binary junk": (_damaged(b"\x00\xff\xfe junk"), "not UTF-8 text (binary data?)"),
    "wrong header": (_damaged(lambda text: "a,b,c\n1,2,3\n"), "its header lacks the columns ['model', 'quant'"),
    "value not a number": (_damaged(lambda text: text.replace("1.5", "one and a half")),
                           "value is 'one and a half', not a number"),
    # paths that cannot be written, checked before loading a model
    "--results is a folder": (_results_is_a_folder, "is a directory; pass a CSV file such as"),
    "--results under a file": (_results_under_a_file, "afile is a file, not a folder"),
    "scan --out under a file": (_scan_out_under_a_file, "--out: cannot create"),
    "compare --out is a file": (_compare_out_is_a_file, "--out: cannot create"),
    "compare a damaged leaderboard": (_compare_damaged, "line 4 has 2 fields"),
    "compare a folder": (lambda tmp, m, t: ["compare", "--results", str(tmp)], "is a directory, not a CSV file"),
    # sweep files, checked whole before anything loads
    "sweep YAML syntax": (_sweep("models: [a\nquants: [int8]\n"), "not valid YAML at line"),
    "sweep limit: two": (_sweep("models: [{model}]\nquants: [int8]\nlimit: two\n"),
                         "limit is 'two' (str); expected an integer or null"),
    "sweep limit: 1.5": (_sweep("models: [{model}]\nquants: [int8]\nlimit: 1.5\n"), "limit is 1.5 (float)"),
    "sweep results: 42": (_sweep("models: [{model}]\nquants: [int8]\nresults: 42\n"),
                          "results is 42 (int); expected a string"),
    "sweep keep_positions: 0": (_sweep("models: [{model}]\nquants: [int8]\nkeep_positions: 0\n"),
                                "keep_positions is 0 (int); expected a list of a list of an integer"),
    "sweep models: a string": (_sweep("models: {model}\nquants: [int8]\n"), "models is '"),
    "sweep scan: no as a string": (_sweep("models: [{model}]\nquants: [int8]\nscan: 'no'\n"),
                                   "scan is 'no' (str); expected true or false"),
    "sweep unknown key": (_sweep("models: [{model}]\nquants: [int8]\nmodel: x\n"), "unknown keys ['model']"),
    # tasks, models, numbers
    "task context_length: lots": (_bad_task, "context_length is 'lots' (str); expected an integer"),
    "model name too long": (lambda tmp, m, t: ["run", "--model", "x" * 300, "--results", str(tmp / "lb.csv")],
                            "cannot be looked up as a path (File name too long)"),
    "unknown zoo model": (lambda tmp, m, t: ["run", "--model", "zoo:lama-base", "--results", str(tmp / "lb.csv")],
                          "did you mean 'zoo:llama-base'"),
    "--batch-size 0": (_run("--batch-size", "0"), "batch size must be >= 1"),
    "--task ,": (_run("--task", ","), "expected one or more comma-separated names, got ','"),
    "--quant ,": (_run("--quant", ","), "expected one or more comma-separated names, got ','"),
    "--intervention-limit 0": (lambda tmp, m, t: ["scan", "--model", str(m), "--intervention-limit", "0",
                                                  "--results", str(tmp / "lb.csv")],
                               "intervention limit must be >= 1 window per condition"),
    "train --lr -1": (_train("--lr", "-1"), "train lr must be > 0, got -1.0"),
    "train --lr inf": (_train("--lr", "inf", "--dry-run"), "train lr must be a finite number, got inf"),
    "train --from --weight-decay nan": (_tune("none", "--weight-decay", "nan", *FAST),
                                        "train weight_decay must be a finite number, got nan"),
    "train --from --grad-clip nan": (_tune("none", "--grad-clip", "nan", *FAST),
                                     "train grad_clip must be a finite number"),
    "train --from --seed 2**70": (_tune("none", "--seed", str(2**70), *FAST),
                                  "train seed must be in 0..4294967295, got"),
    "run --seed 2**70": (_run("--seed", str(2**70)), "run seed must be in 0..4294967295, got"),
    "train --heads 0": (_train("--heads", "0", "--dry-run"), "arch heads must be >= 1, got 0"),
    "train --d-model -64 --heads -4": (_train("--d-model", "-64", "--heads", "-4", "--dry-run"),
                                       "arch d_model must be >= 1, got -64"),
    "train --layers 0": (_train("--layers", "0", "--dry-run"), "arch layers must be >= 1, got 0"),
    "train --budget inf": (_train("--budget", "inf", "--dry-run"), "must be more than 0 minutes, got 'inf'"),
    "train --min-lr-ratio 2": (_train("--min-lr-ratio", "2"), "min_lr_ratio must be in [0, 1]"),
    "train --budget 0": (_train("--budget", "0"), "argument --budget: must be more than 0 minutes, got '0'"),
    "train --from --budget -1": (lambda tmp, m, t: ["train", "--from", str(m), "--budget", "-1", "--out",
                                                    str(tmp / "run")], "must be more than 0 minutes, got '-1'"),
    "train --budget nan": (_train("--budget", "nan"), "must be more than 0 minutes, got 'nan'"),
    "train --data an evaluation split": (
        lambda tmp, m, t: ["train", "--from", str(m), "--data", "hf:Salesforce/wikitext:wikitext-2-raw-v1:test",
                           "--out", str(tmp / "run"), "--quiet"],
        "split 'test' of Salesforce/wikitext holds evaluation"),
    "train --data hf: malformed": (lambda tmp, m, t: ["train", "--from", str(m), "--data", "hf:", "--out",
                                                      str(tmp / "run")], "write hf:DATASET[:CONFIG[:SPLIT[:FIELD]]]"),
    "train --data a missing file": (_data("nope.txt"), "nope.txt: no such file or folder"),
    "train --data an empty folder": (_data("empty", folder=True), "no .txt, .md, .rst, .jsonl or .parquet files"),
    "train --data a .json file": (_data("docs.json", b'[{"text": "a b c"}]'), "give JSON lines (.jsonl)"),
    "train --data .jsonl without text": (_data("docs.jsonl", b'{"txt": "a"}\n'), "line 1 is not a JSON object with"),
    "train --data a parquet file that is not one": (_data("docs.parquet", b"not parquet"),
                                                    "docs.parquet: not a readable parquet file"),
    "train --from --data builtin": (lambda tmp, m, t: ["train", "--from", str(m), "--data", "builtin", "--out",
                                                       str(tmp / "run")], "--data builtin: with --from the built-in"),
    # flags a way of training does not read, and mitigations it cannot train
    "train --from --dry-run": (lambda tmp, m, t: ["train", "--from", str(m), "--dry-run", "--out", str(tmp / "run"),
                                                  *FAST], "train --from does not read --dry-run: settings of"),
    "train --from --recipe --layers": (
        lambda tmp, m, t: ["train", "--from", str(m), "--recipe", "recipes/llama-60m-gu2024.yaml", "--layers", "2",
                           "--out", str(tmp / "run"), *FAST], "train --from does not read --recipe, --layers:"),
    "train --model --steps": (lambda tmp, m, t: ["train", "--model", "zoo:llama-base", "--steps", "10", "--budget",
                                                 "0.0000001"], "reads only --budget and --quiet; drop --steps"),
    "train --model --from --out": (lambda tmp, m, t: ["train", "--model", "zoo:llama-base", "--from", str(m),
                                                      "--out", str(tmp / "run"), "--budget", "0.0000001"],
                                   "drop --from, --out"),
    "train --model --dry-run": (lambda tmp, m, t: ["train", "--model", "zoo:llama-base", "--dry-run", "--budget",
                                                   "0.0000001"], "drop --dry-run"),
    "train --mitigation outlier_penalty from scratch": (
        _train("--mitigation", "outlier_penalty", "--dry-run"),
        "mitigation 'outlier_penalty' is a loss term that training from scratch does not add yet"),
    "train --model zoo:llama-outlier_penalty": (
        lambda tmp, m, t: ["train", "--model", "zoo:llama-outlier_penalty", "--budget", "0.0000001"],
        "train --from MODEL --mitigation outlier_penalty"),
    "train --dry-run --mitigation typo": (_train("--mitigation", "kv_biass", "--dry-run"),
                                          "unknown mitigation 'kv_biass'; did you mean 'kv_bias'?"),
    "train from scratch --out is a file": (_out_is_a_file, "--out: cannot create"),
    "zoo:llama-none": (lambda tmp, m, t: ["train", "--model", "zoo:llama-none", "--budget", "0.0000001"],
                       "the zoo's baseline is named base; did you mean 'zoo:llama-base'?"),
    "train --from --context past the model's positions": (_tune("none", "--context", "512", *FAST),
                                                          "takes at most 256 positions, but this training reads 512"),
    "tune: name without its mitigation": (lambda tmp, m, t: ["run", "--model", "tune:smollm2-135m", "--results",
                                                             str(tmp / "lb.csv")], "names no mitigation"),
    "unknown argument": (lambda tmp, m, t: ["run", "--bogus"], "unrecognized arguments: --bogus"),
    "--keep-linears naming no Linear": (_run("--keep-linears", "q_proj,qproj"),
                                        "--keep-linears qproj names no Linear that a scheme quantizes; this model's "
                                        "are e.g."),
    "--keep-linears not a name": (_run("--keep-linears", "q-proj"), "kept Linears are parts of module names like"),
    "train --from --penalty-strength -1": (_tune("outlier_penalty", "--penalty-strength", "-1"),
                                           "outlier_penalty strength must be a number > 0"),
    "train --from --penalty-threshold 0": (_tune("outlier_penalty", "--penalty-threshold", "0"),
                                           "outlier_penalty threshold must be a number > 0"),
    "train --from --penalty-strength without the penalty": (
        _tune("kv_bias", "--penalty-strength", "10"),
        "--penalty-strength set a loss penalty but mitigation 'kv_bias' has none; add one of lp_input_penalty, "
        "lp_penalty, outlier_penalty (e.g. --mitigation lp_input_penalty+kv_bias)"),
    "train --from --penalty-threshold with none": (_tune("none", "--penalty-threshold", "8"),
                                                   "mitigation 'none' has none; add one of "
                                                   "lp_input_penalty, lp_penalty, outlier_penalty"),
    "train --from --penalty-power for outlier_penalty": (
        _tune("outlier_penalty", "--penalty-power", "4"),
        "outlier_penalty takes --penalty-threshold, --penalty-strength, not --penalty-power"),
    "train --from two loss penalties": (_tune("outlier_penalty+lp_penalty"),
                                        "joins 2 loss penalties (outlier_penalty, lp_penalty); use one per recipe"),
    "train --from --penalty-power 0": (_tune("lp_penalty", "--penalty-power", "0"),
                                       "lp_penalty power must be a number > 0"),
    "train --from lp_input_penalty --penalty-threshold -8": (_tune("lp_input_penalty", "--penalty-threshold", "-8"),
                                                             "lp_input_penalty threshold must be a number > 0"),
    # found trying it as a new user would (issue 21): silently wrong before, refused now
    "train --from the built-in model past its 8,192 positions": (
        lambda tmp, m, t: ["train", "--from", "smollm2-135m", "--context", "100000", "--out", str(tmp / "run"),
                           "--quiet"], "smollm2-135m takes at most 8192 positions, but this training reads 100000"),
    "nan in a leaderboard": (_damaged(lambda text: text.replace("1.5", "nan")), "value is 'nan', not a finite number"),
    "compare a leaderboard with inf": (_compare_infinite, "value is 'inf', not a finite number"),
    "train --data .jsonl with a null text": (_data("docs.jsonl", b'{"text": "a b c"}\n{"text": null}\n'),
                                             "line 2 has 'text': null, not a string"),
    "train --data a folder of empty files": (_empty_files, "holds no text; give text files"),
    "train --mitigation ''": (_tune("", *FAST), "--mitigation '' names no mitigation; give none for the control"),
    "--keep-linears matching every Linear": (_run("--keep-linears", "proj"),
                                             "--keep-linears proj keeps all 14 Linears a scheme quantizes"),
    "--max-memory without --device-map": (_run("--max-memory", "cpu=1GiB"),
                                           "max memory limits each device of a model spread over several"),
    "--max-memory with an amount that is none": (_run("--device-map", "auto", "--max-memory", "cpu=lots"),
                                                 "max memory cpu=lots is not an amount"),
    "--max-memory naming a GPU on the CPU": (_run("--device", "cpu", "--device-map", "auto", "--max-memory", "0=1GiB"),
                                             "--max-memory names GPU 0, but there is no GPU in use"),
    "--max-memory holding no module": (_run("--device", "cpu", "--device-map", "auto", "--max-memory", "cpu=1KB"),
                                       "the device map puts the whole model on disk: cpu=1KB holds none of its"),
    "--device-map with --transform": (_run("--device-map", "auto", "--transform", "rotate"),
                                      "--transform rewrites a second copy of the model"),
    "--device-map with a kernel backend": (_run("--device-map", "auto", "--backend", "bnb"),
                                           "--backend bnb packs weights in GPU memory"),
    "sweep keep_linears typo in its second list": (
        _sweep("models: [{model}]\nquants: [int8]\ntasks: [{task}]\nkeep_linears: [[], [q_projj]]\n"
               "results: {tmp}/lb.csv\n"), "keep_linears q_projj names no Linear that a scheme quantizes"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_changes_nothing(case, capsys, tmp_path, tiny_model_dir, tiny_task_dir):
    setup, message = CASES[case]
    argv = setup(tmp_path, tiny_model_dir, tiny_task_dir / "short.yaml")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's errors exit from inside main
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("qharness: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")}
    assert after == {p: b for p, b in before.items() if not p.name.endswith(".lock")}  # nothing written or changed
    assert not (tmp_path / "run").exists()  # train refused before making its folder


def test_a_non_finite_metric_is_an_error_and_not_stored(capsys, tmp_path, tiny_model_dir, tiny_task_dir):
    """fp16 overflow: logits past 65504 make the loss inf; the run says so and stores nothing, so a rerun with
    another dtype computes the cell instead of skipping it."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "loud"
    shutil.copytree(tiny_model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 1e6  # logits far beyond fp16's range
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    results = tmp_path / "lb.csv"
    code = main(["run", "--model", str(folder), "--task", str(tiny_task_dir / "short.yaml"), "--dtype", "fp16",
                 "--results", str(results), "--quiet", "--limit", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "in fp16, not stored; fp16 overflows past 65504" in err, err
    assert read_rows(results) == []
    assert torch.isfinite(weights["lm_head.weight"]).all()  # the model itself is finite: the overflow is fp16's


def test_a_rewritten_leaderboard_keeps_its_mode_and_orphans_are_cleaned(tmp_path):
    path = _leaderboard(tmp_path)
    os.chmod(path, 0o644)
    orphan = tmp_path / "lb.csv.abc123.tmp"  # what a writer killed mid-write leaves behind
    orphan.write_text("half a file")
    append_rows(path, [{**dict.fromkeys(KEY_COLUMNS, "y"), "value": "3.0"}])
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not orphan.exists() and len(read_rows(path)) == 3
    fresh = tmp_path / "new.csv"
    append_rows(fresh, [{**dict.fromkeys(KEY_COLUMNS, "y"), "value": "3.0"}])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask



def test_a_budget_that_ends_before_the_first_step_is_one_line_and_leaves_nothing(capsys, tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    """Setting up (loading the model, tokenizing) took the whole budget: nothing trained, so nothing is saved and no
    half-made run folder is left behind (tests/training/test_loop.py checks a resumed folder is left as it was)."""
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    code = main(["train", "--from", str(tiny_model_dir), "--data", str(tasks_dir() / "data" / "calibration.txt"),
                 "--steps", "4", "--context", "32", "--batch-size", "2", "--budget", "0.0000001",
                 "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qharness: error: the 1e-07-minute budget ran out before the first training "
                                        "step") and err.count("\n") == 1, err
    assert "give a larger --budget" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [("--keep-linears", "q_projj"), ("--keep-linears", "proj"), ("--keep-channels", "64"),
                                   ("--keep-positions", "99999")])
def test_kept_values_are_refused_before_any_model_loads(flags, capsys, tmp_path, tiny_model_dir, tiny_task_dir,
                                                        monkeypatch):
    """Checked against the model's config (its meta skeleton), not the loaded model: they were refused only after
    the weights loaded."""
    from qharness.experiment import execute

    monkeypatch.setattr(execute, "load_model", lambda *a, **k: pytest.fail("loaded a model for a refused run"))
    code = main(_run(*flags)(tmp_path, tiny_model_dir, tiny_task_dir / "short.yaml"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qharness: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "lb.csv").exists()


@pytest.mark.parametrize(("repeated", "once"), [("--keep-positions=0,0", "--keep-positions=0"),
                                                ("--keep-channels=5,3,5", "--keep-channels=5,3"),
                                                ("--keep-linears=q_proj,q_proj", "--keep-linears=q_proj")])
def test_a_value_given_twice_is_the_same_row_key_as_given_once(repeated, once, tmp_path, tiny_model_dir, tiny_task_dir):
    from qharness.cli import build_parser
    from qharness.cli.run import run_settings
    from qharness.experiment.plan import plan

    def keys(flag: str) -> list[tuple[str, ...]]:
        argv = _run(flag)(tmp_path, tiny_model_dir, tiny_task_dir / "short.yaml")
        return plan(run_settings(build_parser().parse_args(argv))).keys

    assert keys(repeated) == keys(once)


def test_the_data_token_cache_follows_the_content_and_training_json_records_it(tmp_path, tiny_model_dir,
                                                                                  tiny_tokenizer, monkeypatch, capsys):
    """A --data file rewritten in place is new text: its tokens are not the cached ones of the old text, and the
    trained model's training.json names each file by size, mtime and sha256. The --model hint at the end is quoted
    for a folder with a space in its name."""
    import hashlib
    import json

    from qharness.training.continued import tuning_tokens

    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text("In the beginning was the word.\n\nAnd the word was with the text.\n")
    first = tuning_tokens(tiny_tokenizer, (str(text),), progress=False)
    text.write_text("Something else entirely, about rivers and stones.\n")
    second = tuning_tokens(tiny_tokenizer, (str(text),), progress=False)
    assert first.tolist() != second.tolist()  # keyed by the path alone, the second read the first's tokens
    code = main(["train", "--from", str(tiny_model_dir), "--data", str(text), "--steps", "1", "--context", "16",
                 "--batch-size", "1", "--out", str(tmp_path / "my run"), "--quiet"])
    assert code == 0 and f"(use it as --model '{tmp_path / 'my run' / 'model'}')" in capsys.readouterr().out
    (recorded,) = json.loads((tmp_path / "my run" / "model" / "training.json").read_text())["data_files"]
    assert recorded["path"] == str(text.resolve()) and recorded["size"] == text.stat().st_size
    assert recorded["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert recorded["mtime_ns"] == text.stat().st_mtime_ns


@pytest.mark.parametrize(("offline", "message"), [
    (True, "is on the Hugging Face hub and not in the local hub cache, but HF_HUB_OFFLINE is set"),
    (False, "huggingface.co cannot be reached within 3 s (Network is unreachable); connect to the internet"),
])
@pytest.mark.parametrize("model", ["org/not-cached-anywhere", "pair:osp-1.4b-muon"])
def test_a_hub_model_out_of_reach_is_refused_at_once(offline, message, model, capsys, tmp_path, monkeypatch):
    """Offline or with the hub out of reach, a hub id not in the local cache printed 30-50 s of retries before its
    one line; the plan says so first (one connection attempt of at most 3 s, no retries)."""
    import socket
    import time

    from huggingface_hub import constants

    from qharness.experiment import execute

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)

    def unreachable(address, timeout=None):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(execute, "load_model", lambda *a, **k: pytest.fail("tried to load a model out of reach"))
    start = time.perf_counter()
    code = main(["run", "--model", model, "--results", str(tmp_path / "lb.csv"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qharness: error: ") and err.count("\n") == 1, err
    assert message in err and time.perf_counter() - start < 5


def test_a_training_run_folder_or_a_folder_without_a_model_says_what_it_is(capsys, tmp_path, tiny_model_dir):
    import shutil

    run_folder = tmp_path / "my run"
    shutil.copytree(tiny_model_dir, run_folder / "model")
    assert main(["run", "--model", str(run_folder), "--results", str(tmp_path / "lb.csv"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"is a training run folder; its model is in {run_folder / 'model'}: pass --model '{run_folder / 'model'}'" \
        in err, err
    assert main(["scan", "--model", str(tmp_path / "my run"), "--results", str(tmp_path / "lb.csv"), "--quiet"]) == 2
    assert "is a training run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["run", "--model", str(tmp_path / "empty"), "--results", str(tmp_path / "lb.csv"), "--quiet"]) == 2
    assert "has no config.json, so it is not a Hugging Face model folder" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--model", "tune:smollm2-135m-kv-bias"], "unknown mitigation 'kv-bias'; did you mean 'kv_bias'?"),
    (["train", "--from", "smollm2-135m", "--mitigation", "none+kv_bias", "--out", "{tmp}/run"],
     "mitigation 'none+kv_bias' joins none (no mitigation) with others; write 'kv_bias'"),
])
def test_a_typo_is_named_where_it_is(argv, message, capsys, tmp_path):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qharness: error: ") and message in err, err


def test_a_recipe_file_unknown_key_lists_arch_and_train_among_the_valid_ones(capsys, tmp_path):
    (tmp_path / "r.yaml").write_text("arch: {d_model: 64}\ntrian: {steps: 2}\n")
    assert main(["train", "--recipe", str(tmp_path / "r.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown keys ['trian']; valid keys: ['arch', " in err and "'train'" in err, err


@pytest.mark.parametrize(("command", "said"), [("train", "the same command resumes from the last checkpoint"),
                                               ("run", "finished cells are saved, rerun to resume")])
def test_ctrl_c_says_what_the_interrupted_command_kept(command, said, capsys, monkeypatch):
    from qharness import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, command, (interrupted, *cli.COMMANDS[command][1:]))
    assert main([command]) == 130
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(("files", "message"), [
    ({"a.txt": b"", "b.txt": b"\n\n"}, "holds no text; give text files"),
    ({"a.txt": b"\xff\xfe binary"}, "not UTF-8 text (binary?)"),
    ({"docs.jsonl": b'{"txt": "a"}\n'}, "line 1 is not a JSON object with a 'text' field"),
    ({"docs.jsonl": b'{"text": "a b"}\n{"text": null}\n'}, "line 2 has 'text': null, not a string"),
])
def test_data_content_is_checked_before_the_model_loads(files, message, capsys, tmp_path, tiny_model_dir, monkeypatch):
    """Empty, binary or record-less --data was refused only once the model had loaded (and a null text trained)."""
    from qharness.training import continued as tune

    monkeypatch.setattr(tune, "load_model", lambda *a, **k: pytest.fail("loaded a model for refused --data"))
    (tmp_path / "texts").mkdir()
    for name, content in files.items():
        (tmp_path / "texts" / name).write_bytes(content)
    code = main(["train", "--from", str(tiny_model_dir), "--data", str(tmp_path / "texts"), "--out",
                 str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()
