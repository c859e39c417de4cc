"""Per scheme and backend: quantization time, quantized forward time relative to fp, and weight storage.

    python benchmarks/quant_speed.py                       # smollm2-135m, every scheme, every backend that runs here
    python benchmarks/quant_speed.py --schemes int8,nf4 --tokens 1024

Prints a table; numbers are this machine's (2 CPU cores in CI). `sim` simulates, so its forward time is fp time
plus the fake-quantization overhead, not a kernel speed-up.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from qharness.core.errors import BackendUnavailable
from qharness.models.sources import ModelSpec, load_model
from qharness.quant.apply import quantize_, target_linears
from qharness.quant.backends import QuantContext, backends_for, load_backends
from qharness.quant.calibrate import calibration_batches, calibration_text
from qharness.quant.footprint import weight_bytes
from qharness.quant.schemes import SCHEMES, get_scheme


def forward_seconds(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        model(input_ids=ids)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--schemes", default=",".join(SCHEMES.names()))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loaded = load_model(ModelSpec(args.model), progress=False)
    ids = torch.randint(0, loaded.model.config.vocab_size, (1, args.tokens), device=loaded.device)
    targets = target_linears(loaded.model)
    fp_time = forward_seconds(loaded.model, ids, args.repeats)
    batches = calibration_batches(loaded.tokenizer, calibration_text(), device=loaded.device)
    context = QuantContext(loaded.device, calibration=lambda: batches, tokenizer=loaded.tokenizer)
    rows = [("fp", "-", "-", f"{fp_time * 1e3:.0f}", "1.00", f"{weight_bytes(targets, None) / 2**20:.1f}")]
    for name in args.schemes.split(","):
        scheme = get_scheme(name)
        for backend in backends_for(scheme):
            try:
                load_backends().get(backend).check(loaded.device, scheme, loaded.dtype, targets)
                model = copy.deepcopy(loaded.model)
                start = time.perf_counter()
                quantize_(model, scheme, backend=backend, context=context)
                quantize_time = time.perf_counter() - start
                seconds = forward_seconds(model, ids, args.repeats)
            except BackendUnavailable as exc:
                rows.append((scheme.name, backend, "unavailable: " + str(exc)[:60], "", "", ""))
                continue
            rows.append((scheme.name, backend, f"{quantize_time:.1f}", f"{seconds * 1e3:.0f}",
                         f"{seconds / fp_time:.2f}", f"{weight_bytes(targets, scheme) / 2**20:.1f}"))
            del model
    header = ("scheme", "backend", "quantize s", f"forward ms ({args.tokens} tok)", "x fp", "weights MiB")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"{args.model} on {loaded.device} ({torch.get_num_threads()} threads)")
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    main()
