"""Distillation of a retrofitted model back to the model it was made from, before continued training: a mitigation
that cannot keep the function when it is added (DyT replaces the norms) first learns, on the training text, to give
the original's next-token distributions.

    loss = KL(p_original || p_converted), mean over tokens, on batches the training steps never draw

Only the parameters `trainable` names move (DyT's alpha, gamma and beta): the rest of the model is the pretrained
one, so what distillation repairs is the new modules' fit, not the model around them. AdamW, clipped at 1.0, a
constant lr. The batches are drawn like the training loop's (BOS first, random windows of the token stream) from
steps -2, -3, ...: the loop's own steps are 0 and up and its activation probe is step -1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from qharness.core.errors import ConfigError
from qharness.data.recipe import TrainConfig
from qharness.training.loop import sample_batch

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor, nn


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 100  # optimizer steps of distillation
    lr: float = 1e-2  # for the trainable parameters alone: DyT's handful per layer
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 1 or self.log_every < 1:
            raise ConfigError(f"distillation steps and log_every must be >= 1, got {self.steps}, {self.log_every}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"distillation lr must be a number > 0, got {self.lr}")


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(teacher || student) of the next-token distributions, mean over tokens, in fp32."""
    student = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    teacher = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def distill_(student: nn.Module, teacher: nn.Module, trainable: list[nn.Parameter], tokens: Tensor,
             train: TrainConfig, bos_id: int, cfg: DistillConfig,
             drift: Callable[[], float] | None = None) -> list[dict[str, float]]:
    """Move `trainable` (parameters of `student`) so the student's next-token distributions match the teacher's on
    training batches of `train`'s shape; returns a log entry every cfg.log_every steps (KL, and `drift()`)."""
    chosen = {id(p) for p in trainable}
    frozen = [p for p in student.parameters() if id(p) not in chosen and p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    device = next(student.parameters()).device
    log, kls = [], []
    was_training = student.training
    student.train()
    try:
        for step in range(cfg.steps):
            batch = sample_batch(tokens, -2 - step, train, bos_id)[:train.batch_size].to(device)
            with torch.no_grad():
                target = teacher(input_ids=batch).logits
            loss = kl_to_teacher(student(input_ids=batch).logits, target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            kls.append(loss.item())
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                student.eval()
                entry = {"step": step + 1, "kl": sum(kls) / len(kls)}
                if drift is not None:
                    entry["logit_drift"] = drift()
                log.append(entry)
                kls = []
                student.train()
    finally:
        for param in frozen:
            param.requires_grad_(True)
        student.train(was_training)
    return log
