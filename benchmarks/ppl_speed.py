"""The perplexity runner's throughput against a bare batched forward pass over the same windows (target: <= 1.1x).

    python benchmarks/ppl_speed.py                          # smollm2-135m, kjv-heldout, windows of 512, batch 4
    python benchmarks/ppl_speed.py --context 2048 --batch-size 1

"bare" is model(input_ids) on the same windows under inference_mode with nothing else; the runner adds the NLL in
float64 and the bookkeeping.
"""

from __future__ import annotations

import argparse
import time

import torch

from qharness.models.sources import ModelSpec, load_model
from qharness.tasks import get_task, load_task_text
from qharness.tasks.perplexity import bos_token_id, perplexity, token_windows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="kjv-heldout")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--limit", type=int, default=8, help="windows")
    args = parser.parse_args()
    loaded = load_model(ModelSpec(args.model), progress=False)
    text = load_task_text(get_task(args.task))
    ids = loaded.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    windows = [w for w in token_windows(ids, args.context, bos_token_id(loaded.tokenizer))
               if len(w) == args.context][: args.limit]
    tokens = sum(len(w) - 1 for w in windows)

    def bare() -> None:
        with torch.inference_mode():
            for i in range(0, len(windows), args.batch_size):
                loaded.model(input_ids=torch.tensor(windows[i : i + args.batch_size]))

    def runner() -> None:
        perplexity(loaded.model, loaded.tokenizer, text, args.context, batch_size=args.batch_size,
                   limit=len(windows), progress=False)

    bare()  # warm-up
    timings = {}
    for label, fn in (("bare forward", bare), ("perplexity runner", runner)):
        start = time.perf_counter()
        fn()
        timings[label] = time.perf_counter() - start
    print(f"{args.model} on {args.task}: {len(windows)} windows x {args.context} tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'pass':18} {'seconds':>8} {'tokens/s':>9} {'x bare':>7}")
    for label, seconds in timings.items():
        print(f"{label:18} {seconds:8.2f} {tokens / seconds:9.0f} {seconds / timings['bare forward']:7.2f}")


if __name__ == "__main__":
    main()
