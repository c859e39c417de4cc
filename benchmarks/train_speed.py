"""Training step time of the zoo's architecture per mitigation, against the baseline (the cost of a mitigation);
with --tune, continued training of SmolLM2-135M through the loop against a bare step (the cost of the loop).

    python benchmarks/train_speed.py                   # llama and gpt2, every zoo mitigation, 30 steps each
    python benchmarks/train_speed.py --arch llama --steps 100 --threads 1
    python benchmarks/train_speed.py --tune --steps 4  # SmolLM2-135M: bare steps vs the loop, tokens/s
    python benchmarks/train_speed.py --tune400 --precision bf16 --random-weights  # on a GPU: the 400-step table's cost

Random tokens stand in for the corpus (the step time does not depend on the text). Each row is the median step
time of `--steps` steps after 5 warm-up steps, with batch 8 x 128 tokens as in the zoo's recipe; 4,000 steps at
that rate is the cost of one zoo model.

--tune times SmolLM2-135M (fp32, the built-in training text) at the tune recipe's batch and context (2 x 256) three
ways: forward+backward alone, plus the AdamW step, and `train` (qharness.training.loop, as `continue_training` runs
it: accelerate, accumulate(), lr schedule, logging with the activation probe every 5 steps). Each is the median of
`--steps` steps after one warm-up step; the loop's row also gives its whole call (setup, probes, the checkpoint)
divided by its steps. The bare step runs again after the loop: on a shared machine the two bare rows show how
far the load drifted, and the loop's ratio means little when they differ.

--tune400 (issue #20's GPU item) trains a SmolLM2-135M-shaped model through the same loop at the tune400 recipe
(2 x 256 tokens a step, the activation probe every 5 steps, a checkpoint every 20) on whatever device the loop takes
(CUDA when there is one), in fp32 or bf16 autocast: the median step and its tokens/s after 5 warm-up steps, the mean
step (probes and checkpoints included), peak memory (CUDA's allocator, allocated and reserved, or the process's peak
RSS on CPU, loading included), and what 400 steps cost per model and for every run of sweeps/tune400.yaml at the mean
step (training only: the evaluations are not in it; --steps a multiple of 20 gives the recipe's share of
checkpoints). --random-weights builds the shape with random weights, for a machine without the real ones (the step
time does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from qharness.data.recipe import TUNE_TRAIN, ArchConfig, TrainConfig
from qharness.models import mitigations
from qharness.models.sources import zoo
from qharness.training.architectures import new_model
from qharness.training.loop import sample_batch, train


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


def bare_steps(model: torch.nn.Module, tokens: torch.Tensor, cfg: TrainConfig, bos: int, steps: int,
               with_optimizer: bool) -> float:
    """Median seconds of forward+backward (and the AdamW step) over `steps` steps after one warm-up step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    model.train()
    times = []
    for step in range(steps + 1):
        batch = sample_batch(tokens, step, cfg, bos)
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        if with_optimizer:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def loop_steps(model: torch.nn.Module, tokens: torch.Tensor, cfg: TrainConfig, bos: int) -> tuple[float, float]:
    """Median seconds between the loop's consecutive step hooks, and its whole call divided by its steps."""
    import tempfile
    from pathlib import Path

    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        result = train(model, tokens, cfg, Path(folder), bos, [lambda m, s: stamps.append(time.perf_counter())],
                       progress=False)
    return statistics.median(b - a for a, b in itertools.pairwise(stamps)), result.seconds / cfg.steps


def tune_table(steps: int) -> None:
    """Bare steps before and after the loop, so a machine whose load drifts shows it rather than skewing the ratio."""
    from dataclasses import replace

    from qharness.models.sources import ModelSpec, load_model
    from qharness.tasks.perplexity import bos_token_id
    from qharness.training.continued import tuning_tokens

    cfg = replace(TUNE_TRAIN, steps=steps + 1, log_every=5, checkpoint_every=10_000)
    batch, context = cfg.batch_size, cfg.context
    print(f"SmolLM2-135M fp32, threads {torch.get_num_threads()}, batch {batch} x {context} tokens, median of {steps}")
    print(f"{'':36} {'s/step':>7} {'tokens/s':>9} {'vs bare':>8} {'whole call, s/step':>19}", flush=True)

    def fresh() -> torch.nn.Module:
        return load_model(ModelSpec("smollm2-135m", dtype="fp32", device="cpu"), progress=False).model

    tokenizer = load_model(ModelSpec("smollm2-135m", dtype="fp32", device="cpu"), progress=False).tokenizer
    tokens, bos = tuning_tokens(tokenizer, (), progress=False), bos_token_id(tokenizer)
    base: list[float] = []

    def row(what: str, median: float, whole: float | None = None) -> None:
        ratio = f"{median / base[0]:7.2f}x" if base else f"{'':8}"
        tail = f"{whole:19.2f}" if whole is not None else ""
        print(f"{what:36} {median:7.2f} {batch * context / median:9.0f} {ratio} {tail}", flush=True)

    row("forward+backward", bare_steps(fresh(), tokens, cfg, bos, steps, with_optimizer=False))
    base.append(bare_steps(fresh(), tokens, cfg, bos, steps, with_optimizer=True))
    row("forward+backward+AdamW (bare step)", base[0])
    row("train loop (continue_training's)", *loop_steps(fresh(), tokens, cfg, bos))
    row("bare step again, after the loop", bare_steps(fresh(), tokens, cfg, bos, steps, with_optimizer=True))


def tune400_throughput(steps: int, precision: str, random_weights: bool) -> None:
    import resource
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    import yaml

    from qharness.data.recipe import TUNE400_TRAIN
    from qharness.experiment.bench import SHAPES
    from qharness.models.sources.tune import step_of

    warm = 5
    if steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {steps}")
    # the recipe's own checkpoints (every 20 steps, AdamW state included) and probes (every 5): the real cost
    cfg = replace(TUNE400_TRAIN, steps=steps + warm, precision=precision)
    if random_weights:
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, intermediate, heads, kv_heads, layers, vocab = SHAPES["smollm2-135m"]
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                                             num_attention_heads=heads, num_key_value_heads=kv_heads,
                                             num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=True,
                                             max_position_embeddings=8192))
        what = "SmolLM2-135M shape, random weights"
    else:
        from qharness.models.sources import ModelSpec, load_model

        model = load_model(ModelSpec("smollm2-135m", dtype="fp32", device="cpu"), progress=False).model
        what = "SmolLM2-135M"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    tokens = torch.randint(2, model.config.vocab_size, (200_000,))
    stamps: list[float] = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def stamp(module: torch.nn.Module, step: int) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as folder:
        train(model, tokens, cfg, Path(folder), 0, [stamp], progress=False)
    intervals = [b - a for a, b in itertools.pairwise(stamps[warm - 1:])]
    per_step = statistics.median(intervals)  # a plain step: the tokens/s
    mean_step = statistics.fmean(intervals)  # probes and checkpoints included: what 400 steps cost
    if device == "cuda":
        allocated, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
        peak = f"{allocated:.2f} allocated, {reserved:.2f} reserved"
    else:  # the process's peak RSS, the model's loading included
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} RSS"
    sweep = yaml.safe_load(Path(__file__).resolve().parents[1].joinpath("sweeps/tune400.yaml").read_text())
    runs = sorted({(step_of(name) or (name, 0))[0] for name in sweep["models"]})
    minutes = mean_step * TUNE400_TRAIN.steps / 60
    print(f"{what}, {where}, {precision}, batch {cfg.batch_size} x {cfg.context} tokens, {steps} steps after {warm}")
    print(f"{'s/step (median)':>15} {'tokens/s':>9} {'s/step (mean)':>14} {'400 steps, min':>15} "
          f"{f'{len(runs)} runs, min':>12}  peak GiB")
    print(f"{per_step:15.3f} {cfg.batch_size * cfg.context / per_step:9.0f} {mean_step:14.3f} {minutes:15.1f} "
          f"{minutes * len(runs):12.1f}  {peak}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("llama", "gpt2", "both"), default="both")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tune", action="store_true", help="SmolLM2-135M: bare steps vs the training loop")
    parser.add_argument("--tune400", action="store_true", help="the tune400 recipe's throughput and peak memory")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="with --tune400")
    parser.add_argument("--random-weights", action="store_true", help="with --tune400: no real weights needed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.tune400:
        tune400_throughput(args.steps, args.precision, args.random_weights)
        return
    if args.tune:
        tune_table(args.steps)
        return
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
