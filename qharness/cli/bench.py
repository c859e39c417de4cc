"""`qharness bench`: each scheme's speed and memory beside the fp model."""

from __future__ import annotations

import argparse
from pathlib import Path

from qharness.cli import values

EXAMPLES = """examples:
  qharness bench                                         # smollm2-135m on CPU: fp vs int8 weight-only (sim)
  qharness bench --quant int8-weight-channel,int4-weight-g128 --decode-batches 1
  qharness bench --model random:llama-3-8b --layers 4 --device cuda --compile \
      --quant int4-weight-g128-tinygemm,int8-weight-channel,fp8-e4m3-w8a8-token --prefill 4x2048
"""


HELP = "measure each scheme's speed and memory beside the fp model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="as for `qharness run`, or random:llama-3-8b | random:llama-3.2-1b | random:smollm2-135m "
                             "(a published shape with random weights: speed does not depend on the values)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of a random: model")
    parser.add_argument("--quant", default="int8-weight-channel", type=values.name_list,
                        help="comma-separated schemes; the unquantized model is always measured first")
    parser.add_argument("--backend", default="auto", help="as for `qharness run`")
    parser.add_argument("--compile", action="store_true", help="torch.compile each forward (CUDA graphs for decode)")
    parser.add_argument("--prefill", type=values.shape, default=(1, 512), metavar="BxT",
                        help="prefill batch x tokens (default 1x512)")
    parser.add_argument("--decode-batches", type=values.positions, default=(1, 16), metavar="B,B",
                        help="decode batch sizes (default 1,16)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens before decoding (default 64)")
    parser.add_argument("--decode-steps", type=int, default=16, help="timed decode steps (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, median reported (default 3)")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on CUDA) | fp32 | bf16 | fp16")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--results", type=Path, default=Path("results/leaderboard.csv"))
    parser.add_argument("--force", action="store_true", help="measure again what the leaderboard has")
    parser.add_argument("--quiet", action="store_true")


def main(args: argparse.Namespace) -> int:
    from qharness.experiment.bench import BenchSettings, bench, format_table
    from qharness.models.sources import ModelSpec

    settings = BenchSettings(
        model=ModelSpec(args.model, dtype=args.dtype, device=args.device), quants=args.quant, backend=args.backend,
        compile=args.compile, layers=args.layers, prefill_batch=args.prefill[0], prefill_tokens=args.prefill[1],
        decode_batches=args.decode_batches, prompt_tokens=args.prompt, decode_steps=args.decode_steps,
        repeats=args.repeats, results=args.results, force=args.force)
    report = bench(settings, say=values.messages(args.quiet))
    print(f"model: {args.model}   measured {report.computed} of {1 + len(args.quant)} models -> {args.results}")
    print(format_table(report.rows))
    return 0
