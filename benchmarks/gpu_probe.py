"""What gpu_check.sh runs on: the GPU, torch, and every library qharness can use, with versions read from the
installed distributions' metadata (importing a package to read `__version__` fails for namespace packages:
optimum-quanto provides `optimum` without optimum's own `__version__`, which stopped the first H200 check).

    python benchmarks/gpu_probe.py              # exit 0 on a CUDA machine, 2 without one
    python benchmarks/gpu_probe.py --no-cuda-ok # the same report on a CPU (gpu_check.sh --dry-run runs this)

Never raises: a probe that cannot answer prints why and the check goes on.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import shutil
import sys

# distribution name -> the import name qharness uses
PACKAGES = {"torch": "torch", "transformers": "transformers", "accelerate": "accelerate",
            "bitsandbytes": "bitsandbytes", "torchao": "torchao", "optimum-quanto": "optimum.quanto",
            "gptqmodel": "gptqmodel", "lm-eval": "lm_eval", "gguf": "gguf", "triton": "triton"}


def version_of(distribution: str, module: str) -> str:
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "MISSING"
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return version if found else f"{version} (installed, but '{module}' does not import)"


def probe() -> bool:
    """Print the report; True when a CUDA device is visible."""
    for distribution, module in PACKAGES.items():
        print(f"{distribution:15} {version_of(distribution, module)}")
    print("nvcc           ", shutil.which("nvcc") or "not found (quanto's fp8 kernel on CUDA will be refused)")
    try:
        import torch
    except ImportError as exc:
        print(f"torch does not import: {exc}")
        return False
    if not torch.cuda.is_available():
        print(f"no CUDA device visible (torch {torch.__version__})")
        return False
    major, minor = torch.cuda.get_device_capability(0)
    print(f"cuda {torch.version.cuda}, {torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}, "
          f"compute capability {major}.{minor}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    if (major, minor) < (10, 0):
        print("  below 10.0: torchao's MXFP8/MXFP4/NVFP4 W4A4 kernels are refused (sim runs them under auto)")
    if (major, minor) < (8, 9):
        print("  below 8.9: torchao's FP8 W8A8 kernels are refused")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-cuda-ok", action="store_true", help="exit 0 without a GPU (a dry run of the probe)")
    args = parser.parse_args()
    try:
        has_cuda = probe()
    except Exception as exc:  # the probe reports; it never stops the check with a traceback
        print(f"probe error: {type(exc).__name__}: {exc}")
        has_cuda = False
    return 0 if has_cuda or args.no_cuda_ok else 2


if __name__ == "__main__":
    sys.exit(main())
