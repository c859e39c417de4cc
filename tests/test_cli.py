import pytest

from qharness.cli import main
from qharness.data.results import read_rows


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_shows_every_registry(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for expected in ("smollm2-135m", "int8-w8a8-token", "(alias: int8)", "kjv-heldout", "wordnet-heldout",
                     "llm-int8", "fp8-e4m3-unscaled", "int4-weight-g128", "torchao", "bnb", "int4-kivi",
                     "fp8-e4m3-token", "+keep0", "smoothquant", "rotate"):
        assert expected in out


def test_run_prints_table_and_appends_rows(capsys, tiny_model_dir, tiny_task_dir, tmp_path):
    results = tmp_path / "lb.csv"
    argv = ("run", "--model", str(tiny_model_dir), "--task", str(tiny_task_dir / "short.yaml"),
            "--results", str(results), "--quiet")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and err == ""
    assert "computed 2 of 2 rows" in out
    assert "int8-w8a8-token" in out and "ppl (token-level" in out
    assert len(read_rows(results)) == 2
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0 and "computed 0 of 2 rows" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--quant", "int9"], "unknown scheme 'int9'; did you mean 'int8'"),
        (["run", "--task", "nope"], "unknown task 'nope'; known: arc-challenge, arc-easy, c4,"),
        (["run", "--model", "no-such-model"], "unknown model 'no-such-model'; give a built-in name (smollm2-135m)"),
        (["run", "--model", "missing/file.gguf"], "model file not found: missing/file.gguf"),
        (["run", "--dtype", "fp64"], "unknown dtype 'fp64'; valid: auto, fp32, bf16, fp16"),
        (["run", "--device", "tpu"], "unknown device 'tpu'; valid: auto, cpu, cuda"),
        (["run", "--limit", "0"], "limit must be >= 1 window, got 0"),
        (["run", "--backend", "gptqq"], "unknown backend 'gptqq'"),
        (["run", "--quant", "int8-w8a8-tensor", "--backend", "bnb"],
         "backend 'bnb' does not implement scheme 'int8-w8a8-tensor'; its backends: sim"),
        (["run", "--transform", "spin"], "unknown transform 'spin'; known: rotate, smoothquant"),
        (["run", "--transform", "smoothquant:1.5"], "transform 'smoothquant' takes alpha in [0, 1], got '1.5'"),
        pytest.param(["run", "--transform", "rotate", "--keep-channels", "3"],
                     "transform 'rotate' mixes the hidden channels", marks=pytest.mark.needs("torchao")),
        (["run", "--transform", "rotate", "--layer-errors"], "--layer-errors compares each layer with the"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_results(capsys, tmp_path, argv, message):
    results = tmp_path / "lb.csv"
    code, out, err = run_cli(capsys, *argv, "--results", str(results), "--quiet")
    assert code == 2
    assert err.startswith("qharness: error: ") and message in err and err.count("\n") == 1
    assert not results.exists()


def test_corrupt_gguf_is_one_line_error(capsys, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    code, _, err = run_cli(capsys, "run", "--model", str(bad), "--results", str(tmp_path / "lb.csv"), "--quiet")
    assert code == 2 and err.startswith(f"qharness: error: cannot read GGUF file {bad}")
    assert "is it a complete GGUF model file?" in err and err.count("\n") == 1


def test_cuda_on_a_machine_without_one(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(capsys, "run", "--device", "cuda", "--results", str(tmp_path / "lb.csv"))
    assert code == 2
    assert err == "qharness: error: device 'cuda' requested but no CUDA GPU is visible here; use --device cpu or auto\n"


def test_no_command_prints_help(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 2 and "run" in out and "list" in out


def test_bad_keep_positions_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--keep-positions", "bos"])
    assert info.value.code == 2
    assert "expected comma-separated integers like 0,1, got 'bos'" in capsys.readouterr().err


def test_run_with_kv_only_prints_the_kv_row_against_fp(capsys, tiny_model_dir, tiny_task_dir, tmp_path):
    code, out, _ = run_cli(capsys, "run", "--model", str(tiny_model_dir), "--task", str(tiny_task_dir / "short.yaml"),
                           "--results", str(tmp_path / "lb.csv"), "--quiet", "--quant", "none", "--kv", "int4-token")
    assert code == 0 and "computed 2 of 2 rows" in out
    kv_line = next(line for line in out.splitlines() if "kv int4-token" in line)
    assert kv_line.split()[:4] == ["short", "none", "kv", "int4-token"] and "%" in kv_line  # rel_delta shown
