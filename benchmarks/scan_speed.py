"""The scan's cost against a bare forward pass over the same tokens (target: at most 1.3x), and peak memory.

    python benchmarks/scan_speed.py                 # smollm2-135m, 8 sequences of 256 tokens
    python benchmarks/scan_speed.py --sequences 4 --length 1024

"scan" reduces every layer's output in its hook (sdpa attention); "scan + attention" also switches to eager
attention to read the attention weights, which costs what eager attention costs.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from qharness.activations.scan import ScanConfig, scan
from qharness.models.sources import ModelSpec, load_model
from qharness.quant.calibrate import calibration_batches, calibration_text


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    loaded = load_model(ModelSpec(args.model), progress=False)
    batches = calibration_batches(loaded.tokenizer, calibration_text(), args.sequences, args.length)

    def bare() -> None:
        with torch.inference_mode():
            for ids in batches:
                loaded.model(input_ids=ids)

    bare()  # warm-up
    rows = [("bare forward", timed(bare), peak_rss_mib())]
    for label, attention in (("scan", False), ("scan + attention", True)):
        config = ScanConfig(sequences=args.sequences, length=args.length, attention=attention)
        rows.append((label, timed(lambda c=config: scan(loaded.model, loaded.tokenizer, batches, c)), peak_rss_mib()))
    print(f"{args.model}: {len(batches)} sequences x {args.length} tokens, {torch.get_num_threads()} threads")
    print(f"{'pass':18} {'seconds':>8} {'x bare':>7} {'peak RSS MiB':>13}")
    for label, seconds, rss in rows:
        print(f"{label:18} {seconds:8.2f} {seconds / rows[0][1]:7.2f} {rss:13.0f}")


if __name__ == "__main__":
    main()
