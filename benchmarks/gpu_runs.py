"""The real-model pass of gpu_check.sh: short CUDA runs of every path, through qharness's own command line.

    python benchmarks/gpu_runs.py --out DIR [--model NAME_OR_FOLDER] [--budget SECONDS] [--dry-run]
    python benchmarks/gpu_runs.py --out /tmp/x --model none --device cpu   # the driver itself, on a CPU

Every run goes through `qharness.cli.main`, so a refusal is the CLI's own one line (exit 2), but all of them run in
this one process: starting Python, importing torch/transformers/torchao and creating a CUDA context cost about 10 s
per process, which over ~35 runs would be most of gpu_check.sh's 8 minutes. The price is isolation: a CUDA error
that poisons the context fails the runs after it too (the summary says which came first).

Each run's row is read back from the leaderboard it appended to: what ran it (backend, device type), its value and
the fp baseline of the same dtype. Nothing here computes a number itself. When `--model` cannot be loaded (device
machines have no network and the working tree carries no weights), a tiny random Llama is built from the shipped
calibration text instead: every path still runs on CUDA, but its perplexities mean nothing, and the summary says so.
Training reads the shipped calibration text (--data), since the default training text is fetched from package
registries that a device machine cannot reach.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import io
import json
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

RUN_SECONDS = 90  # one run; a first-use kernel build (quanto's Marlin under nvcc) is the slow case
REPO = Path(__file__).resolve().parents[1]
TRAIN_DATA = REPO / "tasks" / "data" / "calibration.txt"  # training-split text, shipped: no registry needed


@dataclass(frozen=True)
class Run:
    backend: str  # "train" for continued training
    scheme: str  # the mitigation for "train"
    extra: tuple[str, ...] = ()
    expect: str = ""  # what an H200 (compute capability 9.0) should show, for the reader of the summary
    trained: str = ""  # evaluate the model the "train" run of this mitigation wrote

    @property
    def label(self) -> str:
        return " ".join((self.backend, self.scheme, *self.extra))


# every retrofit, split in two: DyT's fit moves SmolLM2's logits by ~700% (README), which would leave nothing
# meaningful for the second model's evaluation with a quantized cache
TRAIN_ARGS = ("--steps", "4", "--batch-size", "2", "--grad-accum", "2", "--context", "128", "--precision", "bf16")
ATTENTION_FIXES = "gated_attention+kv_bias+clipped_softmax+tvr"
# In order of what is new first; the budget skips from the end. `expect` is what the capability tables predict.
RUNS = (
    Run("sim", "int8-w8a8-token", (), "ok (also computes the fp baseline)"),
    # microscaling: torchao's block-scaled kernels need compute capability >= 10.0
    Run("torchao", "mxfp8-w8a8", (), "refused below 10.0, ok on Blackwell"),
    Run("torchao", "mxfp4-w4a4", (), "refused below 10.0, ok on Blackwell"),
    Run("torchao", "nvfp4-w4a4", (), "refused below 10.0, ok on Blackwell"),
    Run("torchao", "nvfp4-weight", (), "ok (dequantize + matmul, any CUDA GPU)"),
    Run("auto", "mxfp4-w4a4", (), "sim below 10.0, torchao on Blackwell"),
    Run("auto", "nvfp4-w4a4", (), "sim below 10.0, torchao on Blackwell"),
    Run("sim", "int4-w4a8-token-g128", (), "ok"),
    Run("sim", "int4-w4a4-token-g128", (), "ok"),
    # KV cache: through qharness_sdpa, alone and inside each library backend's model
    Run("auto", "none", ("--kv", "int4-kivi+keep0"), "ok (fp weights, quantized cache)"),
    Run("sim", "int8-w8a8-token", ("--kv", "int4-token"), "ok"),
    Run("bnb", "nf4", ("--kv", "int4-kivi"), "ok"),
    Run("torchao", "int8-weight-channel-halfspan", ("--kv", "fp8-e4m3-kivi+keep0"), "ok"),
    # transforms: the layout checked on an fp32 copy, then the bf16 model transformed and quantized on the GPU
    Run("sim", "int4-w4a4-token", ("--transform", "rotate"), "ok"),
    Run("torchao", "int8-w8a8-token-halfspan", ("--transform", "smoothquant"), "ok"),
    Run("bnb", "llm-int8-bnb", ("--transform", "rotate", "--kv", "int4-kivi+keep0"), "ok"),
    # fp16 (its own fp baseline)
    Run("sim", "int8-w8a8-token", ("--dtype", "fp16", "--kv", "int4-kivi"), "ok"),
    Run("sim", "int4-w4a4-token", ("--dtype", "fp16", "--transform", "rotate"), "ok"),
    # continued training: every retrofit, bf16 autocast, gradient accumulation; then the trained model evaluated
    Run("train", "dyt", TRAIN_ARGS, "ok (DyT fitted on the GPU)"),
    Run("train", ATTENTION_FIXES, TRAIN_ARGS, "ok"),
    Run("sim", "int8-w8a8-token", ("--kv", "int4-kivi"), "ok (the model trained just before: its attention "
        "mitigations with a quantized cache)", trained=ATTENTION_FIXES),
    # the library backends (read before, never run on a GPU)
    Run("bnb", "llm-int8-bnb", (), "ok"),
    Run("bnb", "nf4", (), "ok"),
    Run("torchao", "int8-weight-channel-halfspan", (), "ok"),
    Run("torchao", "int8-w8a8-token-halfspan", (), "ok"),
    Run("torchao", "int4-weight-g128", (), "refused on SmolLM2 (576 is not whole groups of 128), ok on tiny"),
    Run("torchao", "int4-weight-g128-tinygemm", (), "the tinygemm kernel: refused on SmolLM2 (576), ok on tiny"),
    Run("auto", "int4-weight-g128-tinygemm", (), "sim on SmolLM2, torchao on tiny"),
    Run("torchao", "fp8-e4m3-weight", (), "ok"),
    Run("torchao", "fp8-e4m3-w8a8-tensor", (), "ok (>= 8.9)"),
    Run("torchao", "fp8-e4m3-w8a8-token", (), "ok (>= 8.9)"),
    Run("quanto", "int8-weight-channel", (), "ok"),
    Run("quanto", "int8-w8a8-tensor-static", (), "ok"),
    Run("quanto", "fp8-e4m3-weight", (), "ok with nvcc (builds Marlin at first use), else refused"),
    Run("gptq", "gptq-int4-g128", (), "refused unless gptqmodel is installed"),
)


class RunTimeout(BaseException):  # not an Exception: nothing inside a library may swallow it
    pass


@dataclass
class Outcome:
    run: Run
    state: str  # ok, refused, failed, skipped
    note: str = ""
    seconds: float = 0.0
    rows: list[dict[str, str]] = field(default_factory=list)


def tiny_model_folder(folder: Path) -> Path:
    """A random Llama whose widths every kernel takes (multiples of 128 and of MX's 32), with a BPE tokenizer of the
    calibration text. Its numbers mean nothing; it exists so that every path runs when no real model is here."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qharness.quant.calibrate import calibration_text
    from qharness.training.text import train_tokenizer

    tokenizer = train_tokenizer([calibration_text()], vocab_size=1024)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def pick_model(name: str, out: Path, device: str) -> tuple[str, bool]:
    """(the model to run, whether it is the tiny stand-in)."""
    from qharness.models.sources import ModelSpec, load_model

    try:
        load_model(ModelSpec(name, device=device), progress=False)
        return name, False
    except Exception as exc:  # a missing download, a folder that is not there: say so and use the stand-in
        print(f"gpu_runs: cannot load {name} here ({type(exc).__name__}: {first_line(exc)}); using a tiny random "
              "Llama instead: every path runs, the values mean nothing", file=sys.stderr)
        return str(tiny_model_folder(out / "tiny-model")), True


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def trained_folder(out: Path, mitigation: str) -> Path:
    return out / f"train-{mitigation}"


def argv_for(run: Run, model: str, out: Path, board: Path, device: str) -> list[str]:
    if run.backend == "train":  # continued training takes the GPU whenever there is one
        return ["train", "--from", model, "--mitigation", run.scheme, *run.extra, "--data", str(TRAIN_DATA),
                "--out", str(trained_folder(out, run.scheme)), "--quiet"]
    evaluated = str(trained_folder(out, run.trained) / "model") if run.trained else model
    return ["run", "--model", evaluated, "--device", device,
            "--quant", run.scheme, "--backend", run.backend, "--limit", "2", "--task", "kjv-heldout",
            "--results", str(board), "--quiet", *run.extra]


def read_board(board: Path) -> list[dict[str, str]]:
    if not board.is_file():
        return []
    with board.open(newline="") as handle:
        return list(csv.DictReader(handle))


def execute(run: Run, argv: list[str], log: Path, board: Path) -> Outcome:
    from qharness.cli import main

    before = len(read_board(board))
    stdout, stderr = io.StringIO(), io.StringIO()
    began = time.monotonic()

    def alarm(signum: int, frame: object) -> None:
        raise RunTimeout

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(RUN_SECONDS)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(argv)
        error = ""
    except RunTimeout:
        code, error = None, f"timed out after {RUN_SECONDS} s"
    except SystemExit as exc:  # argparse's one-line usage error
        code, error = exc.code, ""
    except Exception as exc:  # a crash is the finding: recorded, and the next run goes on
        code, error = None, f"{type(exc).__name__}: {first_line(exc)}"
        stderr.write(traceback.format_exc())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.monotonic() - began
    log.write_text(f"$ qharness {' '.join(argv)}\n{stdout.getvalue()}\n{stderr.getvalue()}")
    if code == 0:
        return Outcome(run, "ok", "", seconds, read_board(board)[before:])
    if code == 2:
        lines = [line for line in stderr.getvalue().splitlines() if line.startswith("qharness: error:")]
        note = lines[-1].removeprefix("qharness: error: ") if lines else "exit 2 without a one-line error"
        return Outcome(run, "refused", note, seconds)
    return Outcome(run, "failed", error or f"exit {code}", seconds)


def free_gpu() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe(outcome: Outcome, out: Path) -> dict[str, str]:
    """What the summary prints for one run, from the rows it wrote (or training.json for training)."""
    run = outcome.run
    fields = {"run": run.label, "state": outcome.state, "ran_on": "-", "value": "-", "change": "-",
              "seconds": f"{outcome.seconds:.0f}", "note": outcome.note, "expect": run.expect}
    if outcome.state != "ok":
        return fields
    if run.backend == "train":
        info = json.loads((trained_folder(out, run.scheme) / "model" / "training.json").read_text())
        final = info.get("final", {})
        fields.update(ran_on=info.get("device", "?"), value=f"loss {final.get('loss', float('nan')):.3f}",
                      change=f"retrofit {info.get('retrofit_logit_change', float('nan')):.1e}")
        return fields
    kv = next((run.extra[i + 1] for i, a in enumerate(run.extra) if a == "--kv"), "")
    mine = [r for r in outcome.rows if r["quant"] == run.scheme and r["kv"] == kv] or outcome.rows[-1:]
    if mine:
        row = mine[-1]
        change = f"{float(row['rel_delta']):+.2%}" if row.get("rel_delta") else "-"
        fields.update(ran_on=f"{row['backend'] or 'fp'}/{row['device_type']}/{row['dtype']}",
                      value=f"{float(row['value']):.4g}", change=change)
    return fields


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds; later runs are skipped past it")
    parser.add_argument("--device", default="cuda", help="cpu: try this driver itself on a machine without a GPU")
    parser.add_argument("--only", default="", help="run only the runs whose label contains this text, e.g. --kv")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    runs = [run for run in RUNS if args.only in run.label or (run.trained and args.only in "train")]
    board = args.out / "leaderboard.csv"
    if args.dry_run:
        for run in runs:
            print("would run: qharness " + " ".join(argv_for(run, args.model, args.out, board, args.device)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    model, tiny = pick_model(args.model, args.out, args.device)
    outcomes: list[Outcome] = []
    for index, run in enumerate(runs):
        if time.monotonic() - started > args.budget:
            outcomes.append(Outcome(run, "skipped", f"past the {args.budget:.0f} s budget"))
            continue
        if run.trained and not (trained_folder(args.out, run.trained) / "model").is_dir():
            outcomes.append(Outcome(run, "skipped", f"the {run.trained} training run wrote no model"))
            continue
        argv = argv_for(run, model, args.out, board, args.device)
        outcome = execute(run, argv, args.out / f"run-{index:02d}.txt", board)
        outcomes.append(outcome)
        print(f"{run.label}: {outcome.state} {outcome.note}", file=sys.stderr, flush=True)
        free_gpu()
    rows = [describe(o, args.out) for o in outcomes]
    with (args.out / "runs.json").open("w") as handle:
        json.dump({"model": model, "tiny_stand_in": tiny, "runs": rows}, handle, indent=1)
    fp = {("/".join(Path(r["model"]).parts[-2:]), r["dtype"]): r["value"] for r in read_board(board)
          if r["quant"] == "none" and not r["kv"]}
    print(f"model: {model}" + ("  (tiny random stand-in: the values mean nothing)" if tiny else ""))
    print("fp baselines: " + (", ".join(f"{m} {d} {float(v):.4g}" for (m, d), v in fp.items()) or "none"))
    print(f"{'run':58} {'state':8} {'ran on':18} {'value':>12} {'change':>14} {'s':>4}  note / expected")
    for r in rows:
        note = r["note"] if r["state"] in ("refused", "failed", "skipped") else ""
        print(f"{r['run'][:58]:58} {r['state']:8} {r['ran_on'][:18]:18} {r['value']:>12} {r['change']:>14} "
              f"{r['seconds']:>4}  {note or 'expected: ' + r['expect']}")
    failed = [o for o in outcomes if o.state == "failed"]
    if failed:
        print(f"first failure: {failed[0].run.label}: {failed[0].note} (a CUDA error there can fail the runs after "
              "it: this is one process)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
