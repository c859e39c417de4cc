"""Peak memory of `qharness run` against the model it evaluates: does a run hold one model, or two?

    python benchmarks/run_memory.py                       # SmolLM2-135M, 3 schemes, 1 window, CPU
    python benchmarks/run_memory.py --quant int8,int4 --model path/to/folder --device cuda
    python benchmarks/run_memory.py --transform smoothquant     # or --layer-errors: each may hold one more copy

Each measurement runs in a fresh process. `bare`: load the model and run one fp forward of the run's batch (a
window of the task); `run`: `qharness.experiment.runner.run` with the schemes. On the CPU the figure is peak RSS
minus the RSS after the imports (ru_maxrss cannot be reset, hence a process each); on CUDA,
torch.cuda.max_memory_allocated.
Printed: the fp weight bytes W, the bare forward's peak beyond them F, the run's peak P, and (P - F) / W, which
issue #18 asks to be <= 1.3 (it was 3.1 on an H200 when each scheme quantized a deep copy of the fp model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, torch
from pathlib import Path
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
args = json.loads(sys.argv[1])
from qharness.models.sources import ModelSpec, load_model
from qharness.experiment.runner import run
from qharness.experiment.settings import RunSettings
from qharness.tasks import get_task, load_task_text
from qharness.tasks.perplexity import perplexity
after_imports = rss()
cuda = args["device"] == "cuda"
if args["what"] == "bare":
    loaded = load_model(ModelSpec(args["model"], device=args["device"]), progress=False)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    task = get_task(args["task"])
    perplexity(loaded.model, loaded.tokenizer, load_task_text(task), task.context_length, limit=1, progress=False)
    out = {"weights": weights}
else:
    run(RunSettings(model=args["model"], device=args["device"], quants=tuple(args["quants"]), tasks=(args["task"],),
                    limit=1, results=Path(args["results"]), transform=args["transform"],
                    layer_errors=args["layer_errors"]), say=lambda m: None, progress=False)
    out = {}
peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out["peak"] = peak - (0 if cuda else after_imports)
print(json.dumps(out))
"""


def measure(what: str, args: argparse.Namespace, results: Path) -> dict:
    payload = json.dumps({"what": what, "model": args.model, "device": args.device, "task": args.task,
                          "quants": args.quant.split(","), "results": str(results), "transform": args.transform,
                          "layer_errors": args.layer_errors})
    done = subprocess.run([sys.executable, "-c", CHILD, payload], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quant", default="int8-w8a8-tensor,int4-weight-g128,int8-w8a8-tensor-static")
    parser.add_argument("--task", default="kjv-heldout")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--transform", default="", help="as run's --transform (a transformed copy of the model)")
    parser.add_argument("--layer-errors", action="store_true", help="as run's (a quantized copy beside the fp one)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure each this many times and print each ratio and the median (glibc's arenas make "
                             "peak RSS vary by up to 300 MiB from one process to the next)")
    args = parser.parse_args()
    ratios = [one(args) for _ in range(args.repeat)]
    if args.repeat > 1:
        print(f"median (P - F) / W over {args.repeat}: {statistics.median(ratios):.2f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    return 0


def one(args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        bare = measure("bare", args, Path(tmp) / "unused.csv")
        ran = measure("run", args, Path(tmp) / "leaderboard.csv")
    weights, forward = bare["weights"], bare["peak"] - bare["weights"]
    mib = 2**20
    extra = (f", --transform {args.transform}" if args.transform else "") + (", --layer-errors" if args.layer_errors
                                                                            else "")
    print(f"model {args.model} on {args.device}, schemes {args.quant}{extra}, 1 window of {args.task}")
    print(f"fp weights W {weights / mib:.0f} MiB; bare forward beyond them F {forward / mib:.0f} MiB; "
          f"run peak P {ran['peak'] / mib:.0f} MiB; (P - F) / W = {(ran['peak'] - forward) / weights:.2f}")
    return (ran["peak"] - forward) / weights


if __name__ == "__main__":
    sys.exit(main())
