"""Training step time of the zoo's architecture per mitigation, against the baseline (the cost of a mitigation).

    python benchmarks/train_speed.py                   # llama and gpt2, every zoo mitigation, 30 steps each
    python benchmarks/train_speed.py --arch llama --steps 100 --threads 1

Random tokens stand in for the corpus (the step time does not depend on the text). Each row is the median step
time of `--steps` steps after 5 warm-up steps, with batch 8 x 128 tokens as in the zoo's recipe; 4,000 steps at
that rate is the cost of one zoo model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qharness.models import mitigations
from qharness.models.sources import zoo
from qharness.recipe import ArchConfig, TrainConfig
from qharness.training.architectures import new_model
from qharness.training.loop import sample_batch


def step_times(arch: str, spec: str, steps: int) -> list[float]:
    cfg = TrainConfig()
    model = new_model(ArchConfig(arch=arch), 0, 1, seed=0)
    applied = mitigations.build_(model, spec)
    mitigations.initialize_(model, applied)
    hooks = [m.after_step for m in applied if m.after_step is not None]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    tokens = torch.randint(2, ArchConfig().vocab_size, (100_000,))
    model.train()
    times = []
    for step in range(steps + 5):
        batch = sample_batch(tokens, step, cfg, bos_id=0)
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for hook in hooks:
            hook(model, step + 1)
        times.append(time.perf_counter() - start)
    return times[5:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("llama", "gpt2", "both"), default="both")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in zoo.GRID if args.arch == "both" or n.startswith(f"zoo:{args.arch}-")]
    print(f"threads {args.threads}, batch 8 x 128, median of {args.steps} steps")
    print(f"{'model':28} {'ms/step':>8} {'vs base':>8} {'4000 steps, min':>16}")
    base: dict[str, float] = {}
    for name in names:
        recipe = zoo.recipe_for(name)
        median = statistics.median(step_times(recipe.arch.arch, recipe.mitigation, args.steps))
        base.setdefault(recipe.arch.arch, median)
        print(f"{name:28} {median * 1e3:8.1f} {median / base[recipe.arch.arch]:7.2f}x {median * 4000 / 60:16.1f}")


if __name__ == "__main__":
    main()
