"""Peak CPU memory of loading a checkpoint with a device map: read straight onto the devices, or whole and then
spread? (issue #18: a model larger than CPU memory must load)

    python benchmarks/placed_load_memory.py [--model smollm2-135m] [--cpu 64MiB]

The model is saved once as a safetensors folder (what a hub checkpoint is), then each way of loading it runs in a
fresh process (so that one load's freed memory or warm caches do not count for the next), printing its peak memory
against the fp32 weight bytes W. Peak memory is the process's anonymous resident memory (RssAnon, sampled every 5
ms, minus its value after the imports): the pages of a memory-mapped safetensors file are the page cache's, which
the kernel reclaims under pressure, so they are not what must fit; a copy of a weight in the process is.
- `whole`: no device map, every weight in CPU memory;
- `read, then spread`: the path a GGUF or built-in model takes (`placement.dispatch_`), the whole model in CPU memory
  before accelerate moves all but `--cpu` of it to disk;
- `straight onto devices`: the path a folder or hub id takes (`placement.load_placed`): the map planned on an empty
  model, each weight read from its shard to its device.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, threading, time
import torch
from qharness.models.sources import ModelSpec, load_model, source_for

def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) * 1024

peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)

args = json.loads(sys.argv[1])
if args["how"] == "spread":
    object.__setattr__(source_for(args["folder"]), "read_placed", None)  # force the read-then-spread path
spread = args["how"] != "whole"
spec = ModelSpec(args["folder"], device="cpu", device_map="auto" if spread else None,
                 max_memory={"cpu": args["cpu"]} if spread else None)
before = anon()
watcher = threading.Thread(target=sample, daemon=True)
watcher.start()
loaded = load_model(spec, progress=False)
with torch.no_grad():
    loaded.model(torch.tensor([[1, 2, 3, 4]]))
done.set()
watcher.join()
on_disk = sum(1 for d in (loaded.placement.device_map.values() if loaded.placement else ()) if d == "disk")
print(json.dumps({"peak": max(peak[0], anon()) - before, "disk_modules": on_disk}))
"""


def measure(folder: Path, how: str, cpu: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"folder": str(folder), "how": how, "cpu": cpu})],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cpu", default="200MiB", help="--max-memory cpu=... for the two spread loads")
    args = parser.parse_args()
    from qharness.models.sources import ModelSpec, load_model

    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(ModelSpec(args.model, device="cpu", dtype="fp32"), progress=False)
        weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        del loaded
        mib = 2**20
        print(f"{args.model}, fp32, W = {weights / mib:.0f} MiB; spread loads with --max-memory cpu={args.cpu}")
        print(f"{'load':24s} {'peak anon MiB':>13s} {'x W':>6s} {'modules on disk':>16s}")
        for how, label in (("whole", "whole"), ("spread", "read, then spread"), ("straight", "straight onto devices")):
            result = measure(Path(tmp), how, args.cpu)
            print(f"{label:24s} {result['peak'] / mib:13.0f} {result['peak'] / weights:6.2f} "
                  f"{result['disk_modules']:16d}")


if __name__ == "__main__":
    main()
