"""The command line: parses arguments into configs and calls the library. `qharness <command> --help`.

Commands live in `COMMANDS` (name -> (cmd_<name>, add_arguments, help)). Heavy libraries are imported inside the
commands that need them, so `--help` and `list` stay fast.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qharness.errors import QHarnessError

if TYPE_CHECKING:
    from qharness.activations.profile import Profile

RUN_EXAMPLES = """examples:
  qharness run                                          # smollm2-135m, int8, the offline held-out texts
  qharness run --model smollm2-135m --quant int8 --limit 2
  qharness run --model path/to/model.gguf --task kjv-heldout --no-bos
  qharness run --quant none,int8 --kv int4-kivi+keep0 --limit 2   # also quantize the KV cache
  qharness run --model HuggingFaceTB/SmolLM2-135M --device cuda --dtype bf16   # online users
  qharness run --quant int4-w4a4-token --transform rotate --limit 2      # QuaRot's Hadamard rotation first
  qharness run --quant int8-w8a8-tensor --transform smoothquant:0.8      # SmoothQuant, alpha 0.8
  qharness run --device-map auto --max-memory 0=20GiB,cpu=64GiB      # spread over GPUs, CPU memory, disk
"""
SCAN_EXAMPLES = """examples:
  qharness scan                                  # smollm2-135m: profile, intervention, plots -> results/scan/
  qharness scan --no-bos --sequences 4
  qharness scan --model path/to/model --layers model.layers --no-intervention
  qharness scan --device-map auto --max-memory cpu=200MB           # layers past 200 MB read from disk
"""
SWEEP_EXAMPLES = """examples:
  qharness sweep sweeps/default.yaml       # the default grid: smollm2-135m x every scheme x the offline tasks
  qharness sweep my-grid.yaml              # see qharness/sweep.py for the keys
"""
COMPARE_EXAMPLES = """examples:
  qharness compare                      # results/leaderboard.csv -> results/report.md, report.html, plots
  qharness compare --results other.csv --out other/
"""
TRAIN_EXAMPLES = """examples:
  qharness train --arch llama --mitigation none --out runs/llama-base       # 4,000 steps, about 7 min on 2 cores
  qharness train --arch gpt2 --mitigation tvr+dyt --budget 10 --out runs/g  # rerun the same line to continue
  qharness train --model zoo:llama-kv_bias                                  # train one zoo model into the cache
  qharness run --model runs/llama-base --quant int8                         # the result is a model folder
  qharness train --from smollm2-135m --data hf:HuggingFaceFW/fineweb-edu:sample-10BT --out runs/s  # online
  qharness train --recipe recipes/gpt2-124m-sun2024.yaml --dry-run          # a published setting's cost (6NT)
  qharness train --recipe recipes/llama-60m-gu2024.yaml --data builtin --steps 200 --out runs/gu
"""
BENCH_EXAMPLES = """examples:
  qharness bench                                         # smollm2-135m on CPU: fp vs int8 weight-only (sim)
  qharness bench --quant int8-weight-channel,int4-weight-g128 --decode-batches 1
  qharness bench --model random:llama-3-8b --layers 4 --device cuda --compile \
      --quant int4-weight-g128-tinygemm,int8-weight-channel,fp8-e4m3-w8a8-token --prefill 4x2048
"""
LIST_EXAMPLES = """examples:
  qharness list            # everything
  qharness list quants
  qharness list kv
  qharness list mitigations
  qharness list tasks
"""


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _name_list(text: str) -> tuple[str, ...]:
    """A non-empty comma-separated list: `--task ,` is a mistake, not a request for the defaults."""
    names = _names(text)
    if not names:
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated names, got '{text}'")
    return names


def _positions(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1, got '{text}'") from None


def _memory(text: str) -> dict[str, str]:
    """--max-memory 0=20GiB,cpu=64GiB -> {"0": "20GiB", "cpu": "64GiB"} (accelerate's max_memory)."""
    pairs = [part.partition("=") for part in _names(text)]
    if not pairs or any(not device or not sep or not amount for device, sep, amount in pairs):
        raise argparse.ArgumentTypeError(f"expected DEVICE=AMOUNT pairs like 0=20GiB,cpu=64GiB, got '{text}'")
    return {device.strip(): amount.strip() for device, _, amount in pairs}


def _minutes(text: str) -> float:
    """A time budget: more than 0 minutes (0 or less could not train a step; leave --budget out for no limit)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected minutes as a number, got '{text}'") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be more than 0 minutes, got '{text}' (leave --budget out to train "
                                         "without a time limit)")
    return value


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from qharness.experiment.settings import RunSettings

    default = RunSettings()  # every default is the settings' own, declared once
    parser.add_argument("--model", default=default.model,
                        help=f"built-in name, local HF folder, .gguf file or hub id (default: {default.model})")
    parser.add_argument("--quant", default=default.quants, type=_name_list,
                        help=f"comma-separated schemes (default: {','.join(default.quants)}); see `qharness list "
                             "quants`")
    parser.add_argument("--task", default=None, type=_name_list,
                        help=f"comma-separated tasks (default: {','.join(default.tasks)}); see `qharness list tasks`")
    parser.add_argument("--backend", default=default.backend,
                        help="auto (real kernels on CUDA, sim on CPU) | sim | bnb | torchao | gptq | quanto "
                             "(`qharness list backends`)")
    parser.add_argument("--keep-positions", default="", type=_positions, metavar="P,Q",
                        help="token positions whose activations stay in full precision, e.g. 0 for BOS")
    parser.add_argument("--keep-channels", default="", type=_positions, metavar="C,D",
                        help="hidden channels kept in full precision in the inputs that read the hidden state, "
                             "e.g. the massive channels `qharness scan` reports")
    parser.add_argument("--keep-linears", default="", type=_names, metavar="NAME,NAME",
                        help="Linears left in full precision, by a part of their name (q_proj,k_proj,v_proj): "
                             "which weights carry a scheme's loss")
    parser.add_argument("--kv", default=default.kv, metavar="SETTING",
                        help="also quantize the KV cache of every scheme, e.g. int4-token or int4-kivi+keep0; with "
                             "--quant none only the cache (`qharness list kv`; default none)")
    parser.add_argument("--dtype", default=default.dtype, help="auto (fp32 on CPU, bf16 on CUDA) | fp32 | bf16 | fp16")
    parser.add_argument("--device", default=default.device, help="auto | cpu | cuda")
    parser.add_argument("--no-bos", dest="bos", action="store_false", help="do not prepend BOS to each window")
    parser.add_argument("--limit", type=int, default=default.limit, help="evaluate only the first N windows of each "
                                                                         "task")
    parser.add_argument("--batch-size", type=int, default=default.batch_size,
                        help="windows per forward pass (results do not change)")
    parser.add_argument("--seed", type=int, default=default.seed)
    parser.add_argument("--results", type=Path, default=default.results,
                        help=f"leaderboard CSV to append to (default: {default.results})")
    parser.add_argument("--force", action="store_true", help="recompute cells already in the leaderboard")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status lines, only the table")
    parser.add_argument("--layer-errors", action="store_true",
                        help="also write each scheme's per-layer output error to results/layers/ (for compare)")
    parser.add_argument("--transform", default=default.transform, metavar="NAME[:ARG]",
                        help="rewrite the fp model before quantizing, keeping its logits: smoothquant[:alpha] "
                             "(alpha in [0, 1], default 0.5) or rotate (`qharness list transforms`)")
    add_placement_arguments(parser)
    parser.add_argument("--no-intervals", dest="intervals", action="store_false",
                        help="no paired interval on each quantized row")


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-map", default=None, metavar="MAP",
                        help="spread a model larger than one device over GPUs, CPU memory and disk with accelerate "
                             "(auto | balanced | balanced_low_0 | sequential); schemes run under sim")
    parser.add_argument("--max-memory", default=None, type=_memory, metavar="DEV=AMOUNT,...",
                        help="memory per device with --device-map, e.g. 0=20GiB,cpu=64GiB (the rest goes to disk)")


def add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="as for `qharness run`")
    parser.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16 (fp16 shows overflow)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_placement_arguments(parser)
    parser.add_argument("--no-bos", dest="bos", action="store_false", help="do not prepend BOS to each sequence")
    parser.add_argument("--sequences", type=int, default=8, help="calibration sequences (default 8)")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--layers", default=None, help="dotted path to the decoder layer list if not detected")
    parser.add_argument("--no-attention", dest="attention", action="store_false",
                        help="skip the attention-sink measurement")
    parser.add_argument("--no-intervention", dest="intervention", action="store_false",
                        help="skip the zero/mean intervention perplexities")
    parser.add_argument("--intervention-task", default="kjv-heldout")
    parser.add_argument("--intervention-limit", type=int, default=1, help="windows per intervention condition")
    parser.add_argument("--out", type=Path, default=Path("results/scan"))
    parser.add_argument("--results", type=Path, default=Path("results/leaderboard.csv"))
    parser.add_argument("--quiet", action="store_true")


def format_scan(profile: Profile, out_dir: Path) -> str:
    s = profile.summary
    lines = [
        f"model: {profile.model}   sequences: {profile.sequences} x {profile.config['length']} tokens   "
        f"BOS: {profile.config['bos']}",
        f"max |h| {s.max:.1f} at layer {s.max_layer}; max/median ratio {s.max_ratio:.0f}; "
        f"massive (>100 and >=1000x median) from layer {s.first_massive_layer}; "
        f"outliers (>=100x median) from layer {s.first_outlier_layer} on channels {s.outlier_channels}",
        f"the largest entry sits on BOS in {s.bos_holds_max:.0%} of (layer, sequence) pairs after that, on a "
        f"delimiter in {s.delimiter_holds_max:.0%}; channel {s.top_channel} holds it "
        f"{s.top_channel_stability:.0%} of the time",
    ]
    if s.overflow_layers:
        lines.append(f"OVERFLOW: non-finite values in layers {s.overflow_layers} (fp16 saturates at 65504)")
    lines.append("layer  max       median  ratio   kurtosis  top entry (position, channel, token)        attn@0")
    for e in profile.layers:
        top = e.top[0]
        where = f"{top.value:+.1f} ({top.position}, {top.channel}, {top.token!r})"
        attention = "" if e.attention_on_first is None else f"{e.attention_on_first:.2f}"
        lines.append(f"{e.layer:<5}  {e.max:<8.1f}  {e.median:<6.3f}  {e.ratio:<6.0f}  "
                     f"{e.kurtosis:<8.0f}  {where:<42}  {attention}")
    for row in profile.intervention_table:
        lines.append(f"intervention at layer {row.layer} channels {row.channels}: {row.condition:8} "
                     f"ppl {row.ppl:.2f} ({row.task}, token-level)")
    lines.append(f"profile, plots -> {out_dir}")
    return "\n".join(lines)


def cmd_scan(args: argparse.Namespace) -> int:
    from qharness.activations.scan import ScanConfig
    from qharness.models.sources import ModelSpec
    from qharness.scanning import ScanSpec, profile_dir, run_scan

    spec = ScanSpec(
        model=ModelSpec(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                        max_memory=args.max_memory),
        config=ScanConfig(sequences=args.sequences, length=args.length, bos=args.bos, top_k=args.top_k,
                          attention=args.attention),
        layers=args.layers, intervention_task=args.intervention_task if args.intervention else None,
        intervention_limit=args.intervention_limit, out_dir=args.out, results=args.results,
        progress=not args.quiet,
    )
    profile = run_scan(spec, say=(lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr)))
    print(format_scan(profile, profile_dir(spec)))
    return 0


def _shape(text: str) -> tuple[int, int]:
    """BATCHxTOKENS, e.g. 4x2048."""
    try:
        batch, tokens = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxTOKENS like 4x2048, got '{text}'") from None
    return batch, tokens


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="as for `qharness run`, or random:llama-3-8b | random:llama-3.2-1b | random:smollm2-135m "
                             "(a published shape with random weights: speed does not depend on the values)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of a random: model")
    parser.add_argument("--quant", default="int8-weight-channel", type=_name_list,
                        help="comma-separated schemes; the unquantized model is always measured first")
    parser.add_argument("--backend", default="auto", help="as for `qharness run`")
    parser.add_argument("--compile", action="store_true", help="torch.compile each forward (CUDA graphs for decode)")
    parser.add_argument("--prefill", type=_shape, default=(1, 512), metavar="BxT",
                        help="prefill batch x tokens (default 1x512)")
    parser.add_argument("--decode-batches", type=_positions, default=(1, 16), metavar="B,B",
                        help="decode batch sizes (default 1,16)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding (default 64)")
    parser.add_argument("--decode-steps", type=int, default=16, help="timed decode steps (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA) | fp32 | bf16 | fp16")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--results", type=Path, default=Path("results/leaderboard.csv"))
    parser.add_argument("--force", action="store_true", help="measure again what the leaderboard has")
    parser.add_argument("--quiet", action="store_true")


def cmd_bench(args: argparse.Namespace) -> int:
    from qharness.bench import BenchSettings, bench, format_table
    from qharness.models.sources import ModelSpec

    settings = BenchSettings(
        model=ModelSpec(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                        max_memory=args.max_memory), quants=args.quant, backend=args.backend,
        compile=args.compile, layers=args.layers, prefill_batch=args.prefill[0], prefill_tokens=args.prefill[1],
        decode_batches=args.decode_batches, prompt_tokens=args.prompt, decode_steps=args.decode_steps,
        repeats=args.repeats, results=args.results, force=args.force)
    report = bench(settings, say=(lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr)))
    print(f"model: {args.model}   measured {report.computed} of {1 + len(args.quant)} models -> {args.results}")
    print(format_table(report.rows))
    return 0


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="sweep YAML (models, quants, tasks, keep_positions, limit, ...)")
    parser.add_argument("--quiet", action="store_true")


def cmd_sweep(args: argparse.Namespace) -> int:
    from qharness.sweep import SweepConfig, sweep

    config = SweepConfig.from_file(args.config)
    report = sweep(config, say=(lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr)))
    rows = sum(len(r.rows) for r in report.reports)
    print(f"sweep: {len(report.reports)} runs, computed {report.computed} of {rows} rows -> {config.results}")
    return 0


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=Path("results/leaderboard.csv"))
    parser.add_argument("--out", type=Path, default=Path("results"))


def cmd_compare(args: argparse.Namespace) -> int:
    from qharness.compare import compare
    from qharness.errors import DataError
    from qharness.results import check_writable_dir

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


def bracket(row: dict[str, str], of: str, spec: str, scale: float = 1.0) -> str:
    """` [low, high]`: the row's 95% interval when it is one of `of` (rel_delta in points of percent), else ''."""
    if row.get("ci_of") != of or not row.get("ci_low"):
        return ""
    return f" [{spec.format(float(row['ci_low']) * scale)}, {spec.format(float(row['ci_high']) * scale)}]"


def format_table(rows: list[dict[str, str]]) -> str:
    from qharness.results import is_baseline

    header = ("task", "quant", "backend", "metric", "value", "fp", "delta", "rel", "chance")
    lines = [header]
    for row in rows:
        is_fp = is_baseline(row)
        rel = f"{float(row['rel_delta']):+.2%}" if row["rel_delta"] and not is_fp else ""
        rel += bracket(row, "rel_delta", "{:+.2f}", 100)
        delta = f"{float(row['delta']):+.4g}" if not is_fp else ""
        metric = f"{row['metric']} ({row['metric_kind']}, n={row['n']})"
        quant = row["quant"] + (f" keep {row['keep']}" if row.get("keep") else "")
        quant += f" kv {row['kv']}" if row.get("kv") else ""
        quant += f" after {row['transform']}" if row.get("transform") else ""
        chance = f"{float(row['chance']):.2f}" if row.get("chance") else ""
        value = f"{float(row['value']):.4f}" + bracket(row, "value", "{:.4f}")
        value += f" se {float(row['stderr']):.4f}" if row.get("stderr") else ""
        lines.append((row["task"], quant, row["backend"], metric, value,
                      f"{float(row['fp_value']):.4f}", delta, rel, chance))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def run_settings(args: argparse.Namespace) -> Any:
    """The `RunSettings` that `qharness run`'s flags describe (one field per flag, experiment/settings.CLI_FLAGS)."""
    from qharness.experiment.settings import DEFAULT_TASKS, RunSettings

    return RunSettings(
        model=args.model, quants=args.quant, backend=args.backend, tasks=args.task or DEFAULT_TASKS,
        keep_positions=args.keep_positions, keep_channels=args.keep_channels, keep_linears=args.keep_linears,
        kv=args.kv, transform=args.transform, bos=args.bos, limit=args.limit, batch_size=args.batch_size,
        seed=args.seed, dtype=args.dtype, device=args.device, device_map=args.device_map, max_memory=args.max_memory,
        intervals=args.intervals, results=args.results, force=args.force, layer_errors=args.layer_errors,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from qharness.runner import run

    settings = run_settings(args)
    report = run(settings, say=(lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr)),
                 progress=not args.quiet)
    print(f"model: {report.model}   computed {report.computed} of {len(report.rows)} rows -> {settings.results}")
    print(format_table(report.rows))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from qharness.models import mitigations
    from qharness.results import check_writable_dir
    from qharness.training.recipe_file import check_trainable, format_estimate
    from qharness.training.run import train_model

    if args.mitigation is not None and not args.mitigation.strip():  # read as 'none', it trained the control
        raise QHarnessError(f"--mitigation {args.mitigation!r} names no mitigation; give none for the control, or "
                            "mitigations joined by '+' (kv_bias, tvr, dyt, ...; `qharness train --help`)")
    if args.model:
        ignored = _unread(args, ("model", "budget", "quiet"))
        if ignored:
            raise QHarnessError(f"train --model {args.model} trains it by its own recipe into the cache and reads only "
                                f"--budget and --quiet; drop {ignored} (to choose settings: train --from MODEL or "
                                "from scratch, with --out FOLDER)")
        return _train_named(args.model, args.budget, progress=not args.quiet)
    if args.from_model:
        ignored = _unread(args, ("from_model", "out", "mitigation", "data", *PENALTY_FLAGS, "budget", "quiet",
                                 *TRAIN_FLAGS))
        if ignored:
            raise QHarnessError(f"train --from does not read {ignored}: settings of training from scratch that "
                                f"continued training would ignore; drop {ignored}")
        return _train_from(args)
    scratch = _scratch_recipe(args)
    mitigations.check_from_scratch(scratch.mitigation)  # a dry run of a model that cannot be trained prices nothing
    if args.dry_run:
        print(format_estimate(scratch))
        return 0
    if args.out is None:
        raise QHarnessError("qharness train needs --out FOLDER (or --model zoo:<arch>-<mitigation>, or --dry-run)")
    check_trainable(scratch)
    check_writable_dir(args.out, "--out")
    recipe = scratch.recipe()
    _note_processes(scratch, args.quiet)
    result = train_model(recipe, args.out, progress=not args.quiet, budget_minutes=args.budget)
    return _report_training(result, args, recipe.train.steps,
                            f"trained {recipe.arch.arch} + {recipe.mitigation}: {result.step} steps")


def _report_training(result: Any, args: argparse.Namespace, steps: int, done: str) -> int:
    """The line a training into --out ends with: where a budget stopped it, or what was trained and where it is."""
    if not result.finished:
        print(f"stopped by the {args.budget}-minute budget at step {result.step} of {steps} "
              f"(checkpoint in {args.out}); run the same command again to continue")
    else:
        print(f"{done}, final loss {result.loss:.3f} -> {args.out / 'model'}  (use it as --model "
              f"{shlex.quote(str(args.out / 'model'))})")
    return 0


ARCH_FLAGS = ("arch", "d_model", "layers", "heads")


def _scratch_recipe(args: argparse.Namespace) -> Any:
    """The from-scratch recipe: --recipe FILE (default: the zoo's settings) with every flag the user gave put in."""
    from qharness.training.recipe_file import RecipeFile, load_recipe_file, with_overrides

    base = load_recipe_file(args.recipe) if args.recipe else RecipeFile(name="command line")
    return with_overrides(base, _given(args, ARCH_FLAGS), _given(args, TRAIN_FLAGS), args.mitigation,
                          " ".join(args.data) if args.data else None)


def _unread(args: argparse.Namespace, reads: tuple[str, ...]) -> str:
    """The flags given that a way of training does not read, as typed ('' for none): each would be dropped in
    silence (--dry-run with --from trained; --steps with --model trained the zoo's 4,000 steps)."""
    given = [name for name, value in vars(args).items()
             if name not in (*reads, "command") and value is not None and value is not False]
    return ", ".join("--from" if name == "from_model" else f"--{name.replace('_', '-')}" for name in given)


def _given(args: argparse.Namespace, flags: tuple[str, ...]) -> dict[str, Any]:
    """The flags among `flags` the user gave (those left at None keep the recipe's value)."""
    return {flag: getattr(args, flag) for flag in flags if getattr(args, flag) is not None}


def _note_processes(scratch: Any, quiet: bool) -> None:
    """Say so when this run's data-parallel processes differ from the recipe's: its steps see other batches."""
    from qharness.training.loop import process_state

    world = process_state().num_processes
    if world != scratch.processes and not quiet:
        t = scratch.train
        print(f"note: recipe {scratch.name} ran on {scratch.processes} processes and this run has {world}, so a step "
              f"sees {t.batch_size * t.grad_accum * world} sequences, not {scratch.sequences_per_step} (--grad-accum "
              "or accelerate launch --num_processes matches it)", file=sys.stderr)


def _train_named(name: str, budget: float | None, progress: bool) -> int:
    """`train --model NAME`: train a model that is trained here on first use (a zoo name) into the cache."""
    from qharness.models.sources import classify
    from qharness.training.ensure import TRAINERS, ensure

    if classify(name) not in TRAINERS:
        raise QHarnessError(f"'{name}' is not a model qharness trains; --model takes a zoo or tune name "
                            "(zoo:llama-base, tune:smollm2-135m-none, ...; `qharness list models`), or continue "
                            f"training it with --from {name} --out FOLDER")
    path = ensure(name, progress=progress, budget_minutes=budget)
    if path is None:
        print(f"{name}: stopped by the {budget}-minute budget with a checkpoint; "
              "run the same command again to continue")
    else:
        print(f"{name}: trained -> {path}")
    return 0


PENALTY_FLAGS = ("penalty_threshold", "penalty_strength", "penalty_power")  # --penalty-NAME -> the setting NAME
TRAIN_FLAGS = ("steps", "batch_size", "context", "lr", "weight_decay", "warmup", "min_lr_ratio", "grad_clip", "seed",
               "precision", "grad_accum")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    from qharness.recipe import TUNE_TRAIN, ArchConfig, TrainConfig

    arch, scratch = ArchConfig(), TrainConfig()
    parser.add_argument("--model", default=None,
                        help="a zoo or tune name (zoo:llama-base, tune:smollm2-135m-none): train it into the cache")
    parser.add_argument("--from", dest="from_model", default=None, metavar="MODEL",
                        help="continue training this model (any --model name) instead of starting from scratch")
    parser.add_argument("--recipe", type=Path, default=None, metavar="FILE",
                        help="from scratch: a recipe file (recipes/*.yaml); the flags below override its values")
    parser.add_argument("--dry-run", action="store_true",
                        help="from scratch: print parameters, tokens, 6NT FLOPs and GPU-hours, and train nothing")
    parser.add_argument("--arch", default=None,
                        help=f"llama (GLU) or gpt2 (non-GLU), from scratch (default {arch.arch})")
    parser.add_argument("--mitigation", default=None,
                        help="none, or mitigations joined by '+': kv_bias, tvr, dyt, gated_attention, "
                             "clipped_softmax, outlier_penalty, lp_penalty (e.g. tvr+kv_bias; `qharness list "
                             "mitigations`); with --from each is added to "
                             "the trained model as README 'Continued training' says")
    parser.add_argument("--data", nargs="+", default=None, metavar="PATH",
                        help="with --from: text files, folders, .jsonl ('text'), .parquet ('text') or a hub dataset "
                             "streamed as far as training needs, hf:DATASET[:CONFIG[:SPLIT[:FIELD]]] (online) "
                             "(default: the built-in training text; text overlapping the evaluation text is dropped); "
                             "from scratch: builtin, to train a recipe of a hub dataset on the built-in text")
    parser.add_argument("--penalty-threshold", type=float, default=None,
                        help="outlier_penalty: |h| above this is penalized; lp_penalty: the |h| that costs 1 "
                             "(default 64 for both)")
    parser.add_argument("--penalty-strength", type=float, default=None,
                        help="the loss penalty's weight against the next-token loss (default 1.0)")
    parser.add_argument("--penalty-power", type=float, default=None,
                        help="lp_penalty: the power p of (|h| / threshold)^p (default 4; try 8)")
    parser.add_argument("--budget", type=_minutes, default=None, metavar="MINUTES",
                        help="stop after this many minutes with a checkpoint; rerun to continue")
    parser.add_argument("--out", type=Path, default=None, help="folder for the checkpoint, log and model")
    for flag in TRAIN_FLAGS:
        kind = type(getattr(scratch, flag))
        parser.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None,
                            help=f"default {getattr(scratch, flag)} from scratch, {getattr(TUNE_TRAIN, flag)} "
                                 "with --from")
    parser.add_argument("--d-model", type=int, default=None, help=f"default {arch.d_model}")
    parser.add_argument("--layers", type=int, default=None, help=f"default {arch.layers}")
    parser.add_argument("--heads", type=int, default=None, help=f"default {arch.heads}")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def train_config(args: argparse.Namespace, defaults: Any) -> Any:
    """`defaults` (a TrainConfig) with every train flag the user gave put in."""
    from dataclasses import replace

    return replace(defaults, **_given(args, TRAIN_FLAGS))


def _train_from(args: argparse.Namespace) -> int:
    """`train --from MODEL --mitigation M --out DIR`: continued training into a folder of your own."""
    from dataclasses import replace

    from qharness.models.sources.tune import recipe_for
    from qharness.results import check_writable_dir
    from qharness.training.ensure import ensure
    from qharness.training.tune import check_recipe, continue_training

    if args.out is None:
        raise QHarnessError(f"qharness train --from needs --out FOLDER (or --model tune:{args.from_model}-"
                            f"{args.mitigation or 'none'} to train into the cache)")
    recipe = recipe_for(f"tune:{args.from_model}-{args.mitigation or 'none'}")  # checks the base and the mitigation
    penalty = {flag.removeprefix("penalty_"): getattr(args, flag) for flag in PENALTY_FLAGS
               if getattr(args, flag) is not None}
    recipe = replace(recipe, train=train_config(args, recipe.train), penalty=tuple(sorted(penalty.items())),
                     data=tuple(args.data or ()))
    check_recipe(recipe)  # before a zoo base trains for minutes, or any model loads
    check_writable_dir(args.out, "--out")
    ensure(recipe.base, progress=not args.quiet)
    result = continue_training(recipe, args.out, progress=not args.quiet, budget_minutes=args.budget)
    return _report_training(result, args, recipe.train.steps,
                            f"trained {recipe.base} + {recipe.mitigation} for {result.step} more steps")


def cmd_list(args: argparse.Namespace) -> int:
    from qharness.models.builtin import BUILTIN_MODELS
    from qharness.quant.backend import backends_for
    from qharness.quant.schemes import SCHEMES
    from qharness.tasks.spec import all_tasks

    if args.what in ("all", "models"):
        print("models (also: a local HF folder, a .gguf file, or a hub id):")
        for entry in BUILTIN_MODELS:
            print(f"  {entry.name:24} {entry.obj.description}")
        from qharness.models.sources import zoo

        print("  zoo (trained here on first use, about 7 min each; `qharness train --model NAME`):")
        for name in zoo.GRID:
            print(f"  {name:24} {'trained' if zoo.is_trained(name) else 'not trained yet'}")
        print("  tune:<model>-<mitigation>  a model trained further here with a mitigation, on first use (about 3 min "
              "for smollm2-135m): tune:smollm2-135m-none (the control), tune:smollm2-135m-outlier_penalty")
        from qharness.models.sources.pairs import PAIRS, PREFIX

        print("  published pairs (hub checkpoints with and without a mitigation, online; family: mitigation):")
        for pair in PAIRS:
            refused = "  [needs remote code: refused]" if pair.needs_remote_code else ""
            print(f"  {PREFIX + pair.alias:38} {pair.hub_id}  {pair.family}: {pair.mitigation}{refused}")
    if args.what in ("all", "quants"):
        print("quants:")
        for entry in SCHEMES:
            aliases = SCHEMES.aliases_of(entry.name)
            also = f" (alias: {', '.join(aliases)})" if aliases else ""
            scheme = entry.obj()
            print(f"  {entry.name:30} {scheme.description}{also} [{', '.join(backends_for(scheme))}]")
    if args.what in ("all", "kv"):
        from qharness.quant.kv import KEEP_FIRST, KV_SETTINGS

        print(f"kv (run --kv NAME; append +{KEEP_FIRST} to keep the first token's keys and values exact):")
        for entry in KV_SETTINGS:
            print(f"  {entry.name:30} {entry.obj().description}")
    if args.what in ("all", "backends"):
        from qharness.quant.backend import load_backends

        print("backends:")
        for entry in load_backends():
            backend = entry.obj
            needs = f" (needs {', '.join(backend.requires)}; {'/'.join(backend.devices)})" if backend.requires else ""
            print(f"  {entry.name:24} {backend.description}{needs}")
    if args.what in ("all", "transforms"):
        from qharness.quant.transforms import load_transforms

        print("transforms (--transform NAME[:ARG], applied before quantizing; the fp logits are kept):")
        for entry in load_transforms():
            transform = entry.obj
            needs = f" (needs {', '.join(transform.requires)})" if transform.requires else ""
            print(f"  {entry.name:24} {transform.description}{needs}")
    if args.what in ("all", "mitigations"):
        _list_mitigations()
    if args.what in ("all", "tasks"):
        print("tasks:")
        for task in all_tasks():
            print(f"  {task.name:24} [{task.kind}] {task.description}")
    return 0


def _list_mitigations() -> None:
    from qharness.models.mitigations import load_mitigations

    print("mitigations (train --mitigation A+B; loss-side ones take --penalty-NAME settings, one per recipe):")
    for entry in load_mitigations():
        mitigation = entry.obj
        settings = f" [--penalty-{', --penalty-'.join(mitigation.settings)}]" if mitigation.settings else ""
        print(f"  {entry.name:24} {mitigation.description}{settings}")
        print(f"  {'':24} {mitigation.reference}")


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", default="all",
                        choices=("all", "models", "quants", "kv", "backends", "transforms", "mitigations", "tasks"))


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str,
                          str]] = {
    "run": (cmd_run, add_run_arguments, "evaluate a model in full precision and quantized", RUN_EXAMPLES),
    "scan": (cmd_scan, add_scan_arguments, "profile a model's massive activations", SCAN_EXAMPLES),
    "sweep": (cmd_sweep, add_sweep_arguments, "run a resumable grid of models x schemes x tasks", SWEEP_EXAMPLES),
    "compare": (cmd_compare, add_compare_arguments, "write the report: degradation, causal check, correlation",
                COMPARE_EXAMPLES),
    "train": (cmd_train, add_train_arguments, "train a small model with or without a mitigation", TRAIN_EXAMPLES),
    "bench": (cmd_bench, add_bench_arguments, "measure each scheme's speed and memory beside the fp model",
              BENCH_EXAMPLES),
    "list": (cmd_list, add_list_arguments, "list built-in models, quantization schemes and tasks", LIST_EXAMPLES),
}


INTERRUPTED = {  # what a Ctrl-C leaves, by command
    "run": "finished cells are saved, rerun to resume",
    "sweep": "finished cells are saved, rerun to resume",
    "train": "the same command resumes from the last checkpoint, if one was saved (every checkpoint_every steps)",
    "scan": "nothing was saved; rerun to scan",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block above a bad argument; every other error here is one line, so these
    are too, pointing at --help for the usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"qharness: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="qharness", description="How much do massive activations hurt INT8, INT4 and FP8 quantization?"
    )
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=OneLineParser)
    for name, (_, add_arguments, help_text, examples) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text, epilog=examples,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][0](args)
    except QHarnessError as exc:
        print(f"qharness: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qharness: interrupted; {INTERRUPTED.get(args.command, 'nothing was saved')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
