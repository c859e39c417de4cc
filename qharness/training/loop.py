"""The training loop: next-token loss on random windows of one token stream, BOS first in every sequence.

It runs through accelerate, so the same code is one process on a CPU here and data-parallel over GPUs under
`accelerate launch -m qharness train ...` at scale (each process draws its own batches; the main one logs and
checkpoints); the loop itself stays nanoGPT-short because the mitigations need two things a generic
Trainer hides: a hook after every optimizer step (TVR's rescale) and the live max/median activation ratio in the log.
A checkpoint (safetensors weights, optimizer and scheduler state, step) is written atomically every
`checkpoint_every` steps and when the time budget runs out; calling `train` again on the same folder resumes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qharness.activations.scan import layer_hooks
from qharness.activations.stats import layer_stats
from qharness.errors import ConfigError
from qharness.models.layers import decoder_layers
from qharness.recipe import TrainConfig

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
    """The batch of `step` on process `rank` of `world`, a function of (seed, step, rank) only: a resumed run sees
    the same data as an unbroken one, and data-parallel processes see different data."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * world + rank)
    span = cfg.context - 1
    starts = torch.randint(0, len(tokens) - span, (cfg.batch_size,), generator=generator)
    windows = tokens[starts[:, None] + torch.arange(span)]
    return torch.cat([torch.full((cfg.batch_size, 1), bos_id, dtype=windows.dtype), windows], dim=1).long()


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


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    cfg: TrainConfig) -> None:
    from safetensors.torch import save_model

    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(model, str(staging / "model.safetensors"))
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    (staging / "state.json").write_text(json.dumps({"step": step, "config": asdict(cfg)}, indent=1))
    previous = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(previous)
    staging.rename(folder)  # the swap: a kill leaves either the old or the new checkpoint complete
    shutil.rmtree(previous, ignore_errors=True)


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> int:
    """Restore a checkpoint into model and optimizer; returns its step (0 when there is none)."""
    from safetensors.torch import load_model

    if not folder.exists() and folder.with_name(folder.name + ".old").exists():
        folder.with_name(folder.name + ".old").rename(folder)  # killed between the two renames
    if not (folder / "state.json").exists():
        return 0
    state = json.loads((folder / "state.json").read_text())
    saved = {k: v for k, v in state["config"].items() if k != "budget_minutes"}
    wanted = {k: v for k, v in asdict(cfg).items() if k != "budget_minutes"}
    if saved != wanted:
        changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
        raise ConfigError(f"checkpoint in {folder} was trained with other settings ({', '.join(changed)}); "
                          "use a new output folder or the same settings")
    load_model(model, str(folder / "model.safetensors"))
    # Our own file, written by save_checkpoint; weights_only keeps torch.load from running arbitrary pickles anyway.
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return int(state["step"])


def train(model: nn.Module, tokens: Tensor, cfg: TrainConfig, out_dir: Path, bos_id: int,
          hooks: Sequence[StepHook] = (), progress: bool = True) -> TrainResult:
    """Train `model` in place on `tokens` (1-D) until cfg.steps or the time budget; resumes from out_dir."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if len(tokens) < cfg.context:
        raise ConfigError(f"training text has {len(tokens)} tokens, fewer than one sequence of {cfg.context}")
    started = time.monotonic()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    out_dir.mkdir(parents=True, exist_ok=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    step = load_checkpoint(out_dir / CHECKPOINT, model, optimizer, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    probe = sample_batch(tokens, -1, cfg, bos_id)[:2].to(accelerator.device)
    log = (out_dir / LOG).open("a")
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not progress)
    model.train()
    while step < cfg.steps:
        if cfg.budget_minutes is not None:  # decided together, so data-parallel processes stop at one step
            over = torch.tensor(float(time.monotonic() - started > cfg.budget_minutes * 60), device=accelerator.device)
            if accelerator.reduce(over, reduction="max").item():
                break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        batch = sample_batch(tokens, step, cfg, bos_id, accelerator.process_index, accelerator.num_processes)
        batch = batch.to(accelerator.device)
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        for hook in hooks:
            hook(inner, step)
        losses.append(loss.item())
        bar.update(1)
        if (step % cfg.log_every == 0 or step == cfg.steps) and accelerator.is_main_process:
            entry = {"step": step, "loss": sum(losses) / len(losses), "lr": learning_rate(step - 1, cfg),
                     **activation_probe(inner, probe)}
            log.write(json.dumps(entry) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{entry['loss']:.3f}", max=f"{entry['max_abs']:.0f}", ratio=f"{entry['ratio']:.0f}")
            losses = []
        if step % cfg.checkpoint_every == 0 and accelerator.is_main_process:
            save_checkpoint(out_dir / CHECKPOINT, inner, optimizer, step, cfg)
    bar.close()
    log.close()
    if accelerator.is_main_process:
        save_checkpoint(out_dir / CHECKPOINT, inner, optimizer, step, cfg)
    model.eval()
    last = json.loads((out_dir / LOG).read_text().splitlines()[-1]) if (out_dir / LOG).stat().st_size else {}
    return TrainResult(step, step >= cfg.steps, float(last.get("loss", math.nan)), time.monotonic() - started)
