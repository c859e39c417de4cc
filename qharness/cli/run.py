"""`qharness run`: flags -> RunSettings -> run, and the table it prints."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qharness.cli import values

EXAMPLES = """examples:
  qharness run                                          # smollm2-135m, int8, the offline held-out texts
  qharness run --model smollm2-135m --quant int8 --limit 2
  qharness run --model path/to/model.gguf --task kjv-heldout --no-bos
  qharness run --quant none,int8 --kv int4-kivi+keep0 --limit 2   # also quantize the KV cache
  qharness run --model HuggingFaceTB/SmolLM2-135M --device cuda --dtype bf16   # online users
  qharness run --quant int4-w4a4-token --transform rotate --limit 2      # QuaRot's Hadamard rotation first
  qharness run --quant int8-w8a8-tensor --transform smoothquant:0.8      # SmoothQuant, alpha 0.8
  qharness run --device-map auto --max-memory 0=20GiB,cpu=64GiB      # spread over GPUs, CPU memory, disk
"""


HELP = "evaluate a model in full precision and quantized"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from qharness.experiment.settings import RunSettings

    default = RunSettings()  # every default is the settings' own, declared once
    parser.add_argument("--model", default=default.model,
                        help=f"built-in name, local HF folder, .gguf file or hub id (default: {default.model})")
    parser.add_argument("--quant", default=default.quants, type=values.name_list,
                        help=f"comma-separated schemes (default: {','.join(default.quants)}); see `qharness list "
                             "quants`")
    parser.add_argument("--task", default=None, type=values.name_list,
                        help=f"comma-separated tasks (default: {','.join(default.tasks)}); see `qharness list tasks`")
    parser.add_argument("--backend", default=default.backend,
                        help="auto (real kernels on CUDA, sim on CPU) | sim | bnb | torchao | gptq | quanto "
                             "(`qharness list backends`)")
    parser.add_argument("--keep-positions", default="", type=values.positions, metavar="P,Q",
                        help="token positions whose activations stay in full precision, e.g. 0 for BOS")
    parser.add_argument("--keep-channels", default="", type=values.positions, metavar="C,D",
                        help="hidden channels kept in full precision in the inputs that read the hidden state, "
                             "e.g. the massive channels `qharness scan` reports")
    parser.add_argument("--keep-linears", default="", type=values.names, metavar="NAME,NAME",
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
    values.add_placement_arguments(parser)
    parser.add_argument("--no-intervals", dest="intervals", action="store_false",
                        help="no paired interval on each quantized row")


def bracket(row: dict[str, str], of: str, spec: str, scale: float = 1.0) -> str:
    """` [low, high]`: the row's 95% interval when it is one of `of` (rel_delta in points of percent), else ''."""
    if row.get("ci_of") != of or not row.get("ci_low"):
        return ""
    return f" [{spec.format(float(row['ci_low']) * scale)}, {spec.format(float(row['ci_high']) * scale)}]"


def format_table(rows: list[dict[str, str]]) -> str:
    from qharness.data.results import is_baseline

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


def main(args: argparse.Namespace) -> int:
    from qharness.experiment.runner import run

    settings = run_settings(args)
    report = run(settings, say=values.messages(args.quiet),
                 progress=not args.quiet)
    print(f"model: {report.model}   computed {report.computed} of {len(report.rows)} rows -> {settings.results}")
    print(format_table(report.rows))
    return 0
