"""`qharness scan`: a model's massive-activation profile, printed and saved."""

from __future__ import annotations

import argparse
from pathlib import Path

from qharness.cli import values

EXAMPLES = """examples:
  qharness scan                                  # smollm2-135m: profile, intervention, plots -> results/scan/
  qharness scan --no-bos --sequences 4
  qharness scan --model path/to/model --layers model.layers --no-intervention
  qharness scan --device-map auto --max-memory cpu=200MB           # layers past 200 MB read from disk
"""


HELP = "profile a model's massive activations"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="as for `qharness run`")
    parser.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16 (fp16 shows overflow)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    values.add_placement_arguments(parser)
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


def main(args: argparse.Namespace) -> int:
    from qharness.activations.scan import ScanConfig
    from qharness.experiment.scanning import ScanSpec, profile_dir, run_scan
    from qharness.models.sources import ModelSpec
    from qharness.report.profile_text import format_scan

    spec = ScanSpec(
        model=ModelSpec(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                        max_memory=args.max_memory),
        config=ScanConfig(sequences=args.sequences, length=args.length, bos=args.bos, top_k=args.top_k,
                          attention=args.attention),
        layers=args.layers, intervention_task=args.intervention_task if args.intervention else None,
        intervention_limit=args.intervention_limit, out_dir=args.out, results=args.results,
        progress=not args.quiet,
    )
    profile = run_scan(spec, say=values.messages(args.quiet))
    print(format_scan(profile, profile_dir(spec)))
    return 0
