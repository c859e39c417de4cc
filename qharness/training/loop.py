"""The training loop: next-token loss on random windows of one token stream, BOS first in every sequence.

It runs through accelerate, so the same code is one process on a CPU here and data-parallel over GPUs under
`accelerate launch -m qharness train ...` at scale (each process draws its own batches; the main one logs,
checkpoints and saves while the others wait for it where they would race it); the loop itself stays nanoGPT-short
because the mitigations need two things a generic Trainer hides: a hook after every optimizer step (TVR's rescale)
and the live max/median activation ratio in the log.
Each optimizer step accumulates gradients over `grad_accum` micro-batches (accelerate's accumulate()), and with
precision bf16 runs the forward passes under bf16 autocast over fp32 weights (see `_accelerator`).
A checkpoint (safetensors weights, optimizer and scheduler state, step) is written atomically every
`checkpoint_every` steps and when the time budget runs out; calling `train` again on the same folder resumes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter  # the log's tokens/s: its own clock, apart from the budget's time.monotonic
from typing import Any

import torch
from torch import Tensor, nn

from qharness.activations.scan import layer_hooks
from qharness.activations.stats import layer_stats
from qharness.core.errors import ConfigError
from qharness.data.recipe import LATER_FIELDS, TrainConfig
from qharness.models.layers import decoder_layers

StepHook = Callable[[nn.Module, int], Any]  # (model, step) after each optimizer step; step counts from 1
CHECKPOINT = "checkpoint"
LOG = "train_log.jsonl"


@dataclass(frozen=True)
class TrainResult:
    step: int  # optimizer steps done in total
    finished: bool  # reached cfg.steps (False: stopped by the budget)
    loss: float  # mean loss over the last logging interval
    seconds: float  # wall time of this call


def sample_batch(tokens: Tensor, step: int, cfg: TrainConfig, bos_id: int, rank: int = 0, world: int = 1) -> Tensor:
    """The batch_size x grad_accum sequences of `step` on process `rank` of `world`, a function of (seed, step, rank)
    only: a resumed run sees the same data as an unbroken one, and data-parallel processes see different data. The
    loop splits them into grad_accum micro-batches of batch_size rows, so batch b x grad_accum g draws the very rows
    of batch b*g x grad_accum 1 (and grad_accum 1 draws what it drew before grad_accum existed)."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * world + rank)
    span, rows = cfg.context - 1, cfg.batch_size * cfg.grad_accum
    starts = torch.randint(0, len(tokens) - span, (rows,), generator=generator)
    windows = tokens[starts[:, None] + torch.arange(span)]
    return torch.cat([torch.full((rows, 1), bos_id, dtype=windows.dtype), windows], dim=1).long()


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to min_lr_ratio x lr; `step` counts from 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def activation_probe(model: nn.Module, probe: Tensor) -> dict[str, float]:
    """Largest |h| over the decoder layers' outputs on `probe` (one batch), its layer's median, their ratio, and
    whether the BOS position holds it: the quantity the mitigations are meant to shrink."""
    was_training = model.training
    model.eval()
    stats = []
    with layer_hooks(decoder_layers(model), lambda index, hidden: stats.append(
            [layer_stats(sequence, k=1) for sequence in hidden])):
        model(input_ids=probe)
    model.train(was_training)
    layer = max(stats, key=lambda per_seq: max(s.max for s in per_seq))
    top = max(layer, key=lambda s: s.max)
    median = sum(s.median for s in layer) / len(layer)
    return {"max_abs": top.max, "median_abs": median, "ratio": top.max / median if median > 0 else math.inf,
            "bos_holds_max": float(top.top[0].position == 0)}


def process_state() -> Any:
    """accelerate's view of this process: one process here, its rank and the world size under `accelerate launch`.
    A per-process singleton, made with the device choice `train`'s Accelerator makes (accelerate refuses to change
    it once made)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def main_process_decides(value: bool) -> bool:
    """The main process's `value` on every process (one broadcast), so data-parallel processes take one branch."""
    state = process_state()
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return bool(box[0])


def _try_flock(handle: Any) -> bool:
    import fcntl

    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def main_process_lock(path: Path, poll_seconds: float = 1.0) -> Iterator[None]:
    """An exclusive file lock on `path` for this whole job. One process: wait for it. Data-parallel: the main
    process holds it for all of them. Taken by every process it deadlocks: rank 1 blocks on the lock rank 0 holds
    while rank 0 blocks in its first collective, waiting for rank 1. Waiting for rank 0 in a barrier instead would
    hit the collective timeout (10-30 minutes) whenever another job holds the lock longer. So the main process only
    tries the lock, and one broadcast per try tells every process whether it got it: they enter together, and no
    collective ever waits on the file lock. Released when the main process leaves."""
    import fcntl

    state = process_state()
    with path.open("w") as handle:
        if state.num_processes == 1:
            fcntl.flock(handle, fcntl.LOCK_EX)
        else:
            while not main_process_decides(state.is_main_process and _try_flock(handle)):
                time.sleep(poll_seconds)
        yield


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    cfg: TrainConfig, world_size: int = 1) -> None:
    from safetensors.torch import save_model

    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(model, str(staging / "model.safetensors"))
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    state = {"step": step, "config": asdict(cfg), "world_size": world_size}
    (staging / "state.json").write_text(json.dumps(state, indent=1))
    previous = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(previous)
    staging.rename(folder)  # the swap: a kill leaves either the old or the new checkpoint complete
    shutil.rmtree(previous, ignore_errors=True)


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    world_size: int = 1, device: torch.device | str = "cpu") -> int:
    """Restore a checkpoint into model and optimizer; returns its step (0 when there is none). The world size is
    part of the recipe: each process draws its own batch, so 2 processes train on twice the tokens per step."""
    from safetensors.torch import load_model

    if not folder.exists() and folder.with_name(folder.name + ".old").exists():
        folder.with_name(folder.name + ".old").rename(folder)  # killed between the two renames
    if not (folder / "state.json").exists():
        return 0
    state = json.loads((folder / "state.json").read_text())
    # Every setting but the budget must match, precision and grad_accum included (they change the weights). A key
    # the checkpoint lacks was written before the setting existed, when the loop behaved as its LATER_FIELDS value.
    saved = {**LATER_FIELDS, **state["config"]}
    wanted = asdict(cfg)
    changed = sorted(k for k in wanted if k != "budget_minutes" and saved.get(k) != wanted[k])
    if changed:
        settings = ", ".join(f"{k} {saved.get(k)} -> {wanted[k]}" for k in changed)
        raise ConfigError(f"checkpoint in {folder} was trained with other settings ({settings}); "
                          "use a new output folder or the same settings")
    saved_world = state.get("world_size", 1)  # checkpoints from before it was recorded: written by one process
    if saved_world != world_size:
        raise ConfigError(f"checkpoint in {folder} was trained by {saved_world} processes, this run has {world_size} "
                          f"(it changes the batches); resume with accelerate launch --num_processes {saved_world} "
                          "or use a new output folder")
    load_model(model, str(folder / "model.safetensors"))
    # Our own file, written by save_checkpoint; weights_only keeps torch.load from running arbitrary pickles anyway.
    # map_location: the state was saved from the main process's device (cuda:0); unmapped, every rank would load it
    # there, and a CPU-only resume would fail. accelerate names a data-parallel CPU process's device 'cpu:0', which
    # torch.load cannot map to.
    device = torch.device(device)
    location = "cpu" if device.type == "cpu" else device
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=location, weights_only=True))
    return int(state["step"])


def _remove(created: list[Path]) -> None:
    for path in reversed(created):  # the log before its folder
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _out_of_time(accelerator: Any, created: list[Path], cfg: TrainConfig, seconds: float, bar: Any, log: Any) -> None:
    """The budget ran out before this call's first step: nothing trained, so nothing is saved, and what this call
    created (a fresh run folder, an empty log) is removed before the one-line error."""
    bar.close()
    if log is not None:
        log.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _remove(created)
    raise ConfigError(f"the {cfg.budget_minutes:g}-minute budget ran out before the first training step (setting up "
                      f"took {seconds:.1f} s); nothing was trained or saved; give a larger --budget")


def _accelerator(cfg: TrainConfig) -> Any:
    """accelerate's Accelerator for this run. Its mixed precision stays 'no' and the loop autocasts to bf16 itself
    (`_optimizer_step`): accelerate keeps the precision in a per-process singleton that refuses a second value, and one
    process trains several recipes (the zoo, the tests); for bf16 accelerate does no more than that autocast (bf16
    needs no loss scaler). 'no' also keeps `accelerate launch --mixed_precision` from overriding the recipe."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no",
                              gradient_accumulation_steps=cfg.grad_accum)
    launched = accelerator.gradient_accumulation_steps
    if launched != cfg.grad_accum:  # the environment's ACCELERATE_GRADIENT_ACCUMULATION_STEPS won
        raise ConfigError(f"accelerate was launched with gradient accumulation {launched} but the recipe says "
                          f"{cfg.grad_accum}; drop it from accelerate launch and pass --grad-accum")
    return accelerator


def _optimizer_step(accelerator: Any, model: nn.Module, optimizer: Any, batch: Tensor, cfg: TrainConfig,
                    penalty: Any) -> tuple[float, float | None]:
    """One optimizer step over the grad_accum micro-batches of `batch`, through accelerate's accumulate(): backward
    divides each micro-batch's loss by grad_accum, data-parallel gradients are reduced on the last one only, and the
    prepared optimizer steps and zeroes only then. Returns the mean loss and mean penalty over the micro-batches."""
    losses, extras = [], []
    for micro in batch.split(cfg.batch_size):
        with accelerator.accumulate(model):
            with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss = model(input_ids=micro, labels=micro).loss
            extra = penalty.take() if penalty is not None else None
            accelerator.backward(loss if extra is None else loss + extra)
            if cfg.grad_clip > 0 and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if extra is not None:
            extras.append(extra.item())
    return sum(losses) / len(losses), sum(extras) / len(extras) if extras else None


def train(model: nn.Module, tokens: Tensor, cfg: TrainConfig, out_dir: Path, bos_id: int,
          hooks: Sequence[StepHook] = (), progress: bool = True, penalty: Any = None) -> TrainResult:
    """Train `model` in place on `tokens` (1-D) until cfg.steps or the time budget; resumes from out_dir. A
    `penalty` (a loss-side mitigation with `attached(model)` and `take()`) adds its term to every step's loss.

    Ctrl-C: a run with a checkpoint resumes from it, so it stays as it is. One without (interrupted before its first
    checkpoint) could resume nothing: what this call created, a fresh folder and a log of steps a rerun takes again,
    is removed rather than left as an empty train_log.jsonl that looks like a run."""
    created = [path for path in (out_dir, out_dir / LOG) if not path.exists()]
    try:
        return _train(model, tokens, cfg, out_dir, bos_id, hooks, progress, penalty, created)
    except KeyboardInterrupt:
        if not (out_dir / CHECKPOINT).exists() and int(os.environ.get("RANK", "0")) == 0:
            _remove(created)
        raise


def _train(model: nn.Module, tokens: Tensor, cfg: TrainConfig, out_dir: Path, bos_id: int,
           hooks: Sequence[StepHook], progress: bool, penalty: Any, created: list[Path]) -> TrainResult:
    from tqdm.auto import tqdm

    if len(tokens) < cfg.context:
        raise ConfigError(f"training text has {len(tokens)} tokens, fewer than one sequence of {cfg.context}")
    started = time.monotonic()
    accelerator = _accelerator(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    world, is_main = accelerator.num_processes, accelerator.is_main_process
    with accelerator.main_process_first():  # the main process repairs a checkpoint killed mid-swap before others read
        step = load_checkpoint(out_dir / CHECKPOINT, model, optimizer, cfg, world, accelerator.device)
    first_step = step
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    probe = sample_batch(tokens, -1, cfg, bos_id)[:2].to(accelerator.device)
    log = (out_dir / LOG).open("a") if is_main else None
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not (progress and is_main))
    model.train()
    penalties: list[float] = []
    interval_start, interval_steps = perf_counter(), 0  # for the log's tokens/s
    with penalty.attached(inner) if penalty is not None else contextlib.nullcontext():
        while step < cfg.steps:
            if cfg.budget_minutes is not None:  # decided together, so data-parallel processes stop at one step
                over = torch.tensor(float(time.monotonic() - started > cfg.budget_minutes * 60),
                                    device=accelerator.device)
                if accelerator.reduce(over, reduction="max").item():
                    if step == first_step:
                        _out_of_time(accelerator, created, cfg, time.monotonic() - started, bar, log)
                    break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            batch = sample_batch(tokens, step, cfg, bos_id, accelerator.process_index, accelerator.num_processes)
            loss, extra = _optimizer_step(accelerator, model, optimizer, batch.to(accelerator.device), cfg, penalty)
            if extra is not None:
                penalties.append(extra)
            step += 1
            for hook in hooks:
                hook(inner, step)
            losses.append(loss)
            interval_steps += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:  # every process: the loss is averaged over all of them
                mean = torch.tensor(sum(losses) / len(losses), device=accelerator.device)
                loss_all = accelerator.reduce(mean, reduction="mean").item()
                losses = []
                if log is not None:
                    seconds = perf_counter() - interval_start
                    entry = {"step": step, "loss": loss_all, "lr": learning_rate(step - 1, cfg),
                             **activation_probe(inner, probe),  # tokens/s: this process's, steps since the last line
                             "tokens_per_s": interval_steps * cfg.batch_size * cfg.grad_accum * cfg.context / seconds}
                    if penalties:  # the loss-side mitigation's term, mean over the interval (this process's)
                        entry["penalty"] = sum(penalties) / len(penalties)
                        penalties.clear()
                    log.write(json.dumps(entry) + "\n")
                    log.flush()
                    interval_start, interval_steps = perf_counter(), 0
                    bar.set_postfix(loss=f"{loss_all:.3f}", max=f"{entry['max_abs']:.0f}",
                                    ratio=f"{entry['ratio']:.0f}")
            if step % cfg.checkpoint_every == 0 and is_main:
                save_checkpoint(out_dir / CHECKPOINT, inner, optimizer, step, cfg, world)
    bar.close()
    if log is not None:
        log.close()
    if is_main:
        save_checkpoint(out_dir / CHECKPOINT, inner, optimizer, step, cfg, world)
    accelerator.wait_for_everyone()  # the others read the log below only once the main process has written it
    model.eval()
    last = json.loads((out_dir / LOG).read_text().splitlines()[-1]) if (out_dir / LOG).stat().st_size else {}
    return TrainResult(step, step >= cfg.steps, float(last.get("loss", math.nan)), time.monotonic() - started)
