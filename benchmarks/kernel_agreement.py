"""Print how far each library kernel is from `sim`, beside the dtype's own rounding and the scheme's own effect.

    python benchmarks/kernel_agreement.py               # every kernel declared on this machine's device
    python benchmarks/kernel_agreement.py --device cpu  # the CPU kernels

One line per (backend, scheme, dtype, width); the verdict uses the rule of qharness/quant/agreement.py (the same
asserts as tests/quant/test_cuda_agreement.py). Exit 1 when a kernel differs from its scheme.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from qharness.core.errors import BackendUnavailable
from qharness.models.sources import resolve_dtype
from qharness.quant.agreement import kernel_cases, llama_builder, measure_agreement


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--widths", default="128,1024")
    parser.add_argument("--builds", action="store_true", help="include kernels compiled at first use (minutes)")
    args = parser.parse_args()
    device = torch.device(args.device)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1)).to(device)
    failed = 0
    print(f"{'backend':8} {'scheme':28} dtype width  (relative RMS of the logits)")
    for case in kernel_cases(device.type):
        if case.needs_build and not (args.builds or os.environ.get("QHARNESS_KERNEL_BUILDS")):
            print(f"{case.backend:8} {case.scheme:28} {case.dtype:5}        skipped: compiles at first use (--builds)")
            continue
        for hidden in map(int, args.widths.split(",")):
            try:
                result = measure_agreement(llama_builder(hidden), case.scheme, case.backend,
                                           resolve_dtype(case.dtype, device), device, ids)
            except BackendUnavailable as exc:
                print(f"{case.backend:8} {case.scheme:28} {case.dtype:5} {hidden:5}  declined: {exc}")
                continue
            except Exception as exc:  # a kernel that crashes is a finding of this table, not the end of it
                print(f"{case.backend:8} {case.scheme:28} {case.dtype:5} {hidden:5}  CRASHED: "
                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                failed += 1
                continue
            print(result.line(), flush=True)
            failed += not result.ok
    print(f"{failed} kernel(s) differ from their scheme" if failed else "every kernel computes its scheme")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
