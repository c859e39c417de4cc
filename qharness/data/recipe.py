"""A training recipe as plain data: the architecture, the optimizer settings and the mitigation.

Frozen dataclasses and nothing else (no torch), so that naming a trained model by its recipe's hash (the zoo, model
sources) needs none of the training code, and the training code and the model sources can both depend on this.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from qharness.core.errors import ConfigError

Arch = Literal["llama", "gpt2"]
ARCHES: tuple[str, ...] = ("llama", "gpt2")
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
# Fields added after models were cached under their recipes' digests, with the value that reproduces the old
# behaviour: a field at that value stays out of the digest, so every existing digest (a cache folder's name) holds.
LATER_FIELDS: dict[str, object] = {"mlp_hidden": None, "precision": "fp32", "grad_accum": 1}
MAX_SEED = 2**32 - 1  # the training loop seeds each step with seed * 1,000,003 + ..., which must fit in 64 bits


def check_seed(seed: int, where: str) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{where} seed must be in 0..{MAX_SEED}, got {seed}")


def digest_fields(config: Any) -> dict[str, Any]:
    """A config's fields as the digest sees them: LATER_FIELDS at their old value left out, the budget too (how long a
    call may run, not a setting)."""
    return {k: v for k, v in asdict(config).items()
            if k != "budget_minutes" and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}


def unseeded_digest(recorded: dict[str, Any]) -> str:
    """Twelve hex digits of a recorded recipe (training.json's `recipe`) without its seed: the seeds of one recipe
    share it. A record written before a setting existed lacks it; it is filled at the value that setting had before
    (LATER_FIELDS; a continued-training recipe's empty `retrofit`), so a recipe's seeds agree whenever each was
    trained. The budget stays out, as it does of `digest_fields`: how long one call may run is not a setting, so a seed
    trained with `--budget` groups with its recipe's other seeds."""
    unseeded = {k: v for k, v in recorded.items() if k != "digest"}
    if "base" in unseeded:  # a TuneRecipe's record
        unseeded.setdefault("retrofit", "")
    for part, config in (("arch", ArchConfig), ("train", TrainConfig)):
        if isinstance(unseeded.get(part), dict):
            names = {f.name for f in fields(config)}
            later = {k: v for k, v in LATER_FIELDS.items() if k in names}
            unseeded[part] = {**later, **{k: v for k, v in unseeded[part].items()
                                          if k not in ("seed", "budget_minutes")}}
    return hashlib.sha256(json.dumps(unseeded, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ArchConfig:
    arch: Arch = "llama"  # llama (GLU: SwiGLU, RMSNorm, RoPE) or gpt2 (GELU, LayerNorm, learned positions)
    d_model: int = 128  # hidden size
    layers: int = 4  # decoder layers
    heads: int = 4  # attention heads (no grouped-query attention)
    context: int = 128  # longest sequence, BOS included (GPT-2's learned positions stop here)
    vocab_size: int = 4096  # the byte-level BPE trained on the training text
    mlp_hidden: int | None = None  # MLP inner size; None: 8/3 x d_model rounded up to 32 (llama), 4 x d_model (gpt2)

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ConfigError(f"unknown architecture '{self.arch}'; valid: {', '.join(ARCHES)}")
        for name in ("d_model", "layers", "heads", "context", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"arch {name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ConfigError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ConfigError(f"mlp_hidden must be >= 1 (or null for the default), got {self.mlp_hidden}")


@dataclass(frozen=True)
class TrainConfig:
    """The defaults are the zoo's recipe, chosen for the largest activations a CPU budget grows: with a constant lr
    after warmup and no gradient clipping the baseline Llama's max |h| after 4,000 steps is 641, against 191 with
    cosine decay to 0.1 x lr and clipping at 1.0 (whose outlier sits on BOS more consistently, and whose loss is
    lower: 3.89 vs 4.04). README, "The zoo", has the comparison."""

    steps: int = 4000
    batch_size: int = 8
    context: int = 128  # tokens per sequence, BOS included
    lr: float = 3e-3
    weight_decay: float = 0.0  # none: weight decay damps the BOS outlier we want the baseline to grow
    warmup: int = 100
    min_lr_ratio: float = 1.0  # cosine decay to lr x this; 1 = constant after warmup
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 500
    budget_minutes: float | None = None  # stop (with a checkpoint) after this much wall time in this call
    precision: Precision = "fp32"  # bf16: forward under bf16 autocast; weights, gradients, AdamW state stay fp32
    grad_accum: int = 1  # micro-batches per optimizer step: a step sees batch_size x grad_accum x processes sequences

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        for name in ("lr", "weight_decay", "min_lr_ratio", "grad_clip"):  # nan and inf slip past the checks below
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"train {name} must be a finite number, got {getattr(self, name)}")
        check_seed(self.seed, "train")
        for name in ("steps", "batch_size", "context", "log_every", "checkpoint_every", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train {name} must be >= 1, got {getattr(self, name)}")
        if self.context < 2:
            raise ConfigError(f"train context must be >= 2 (BOS and one token), got {self.context}")
        if not self.lr > 0:
            raise ConfigError(f"train lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "warmup", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train {name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train min_lr_ratio must be in [0, 1] (1 = constant lr), got {self.min_lr_ratio}")
        if self.budget_minutes is not None and self.budget_minutes < 0:
            raise ConfigError(f"train budget must be >= 0 minutes, got {self.budget_minutes}")

    @property
    def tokens(self) -> int:
        """The tokens one process trains on over the run: steps x batch_size x grad_accum sequences of context."""
        return self.steps * self.batch_size * self.grad_accum * self.context


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a trained model's weights; its digest names the model's folder in the cache."""

    arch: ArchConfig = field(default_factory=ArchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mitigation: str = "none"  # "none", a mitigation name, or several joined by '+'

    def digest(self) -> str:
        """Ten hex digits of the settings' hash (see digest_fields)."""
        settings = {"arch": digest_fields(self.arch), "mitigation": self.mitigation, "train": digest_fields(self.train)}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


# Continued training of a pretrained model: 20k tokens, about 3 minutes for SmolLM2-135M on 2 CPU cores. At lr 5e-5
# the outlier penalty (strength 0.05) only took SmolLM2's max |h| from 27,557 to 19,414 in these 40 steps; at 2e-4
# (strength 1) to 5,110, at the cost README "Continued training" reports.
TUNE_TRAIN = TrainConfig(steps=40, batch_size=2, context=256, lr=2e-4, weight_decay=0.0, warmup=4, min_lr_ratio=1.0,
                         grad_clip=1.0, seed=0, log_every=5, checkpoint_every=10)


# The longer continued training (`tune400:` names, issue 20): 10x the steps of TUNE_TRAIN at the same batch and peak
# lr, 20 warmup steps and a cosine decay to 10% of the peak, so that the mitigations that "change nothing in 40
# steps" get a length where they can act. 400 steps x 2 x 256 tokens = 204,800 tokens. The learning rate is a
# function of the step alone (loop.learning_rate), so a resumed run continues the schedule exactly.
TUNE400_TRAIN = TrainConfig(steps=400, batch_size=2, context=256, lr=2e-4, weight_decay=0.0, warmup=20,
                            min_lr_ratio=0.1, grad_clip=1.0, seed=0, log_every=5, checkpoint_every=20)
TUNE400_SNAPSHOTS = (40, 100, 200, 400)  # steps whose weights are kept (bf16) to be evaluated: the curves' points


@dataclass(frozen=True)
class TuneRecipe:
    """A pretrained model trained further with a mitigation; its digest names the result's folder in the cache."""

    base: str  # the model continued: any name --model accepts (built-in, folder, .gguf, hub id)
    mitigation: str = "none"  # "none" (the control) or mitigations that keep the model's function at step 0
    train: TrainConfig = TUNE_TRAIN
    penalty: tuple[tuple[str, float], ...] = ()  # settings of a loss-side mitigation, e.g. (("strength", 0.1),)
    data: tuple[str, ...] = ()  # training text: files or folders; () = the built-in training text
    # steps at which a bf16 copy of the weights is saved (run folder/snapshots/step<N>) for evaluation; what is kept
    # of a run, not how it trains, so it is outside the digest
    snapshots: tuple[int, ...] = ()
    retrofit: str = ""  # the mitigations' retrofit versions ("dyt=sequential"), in the digest when set

    def __post_init__(self) -> None:
        wrong = [step for step in self.snapshots if not 1 <= step <= self.train.steps]
        if wrong:
            raise ConfigError(f"snapshot steps {wrong} are outside the training's 1..{self.train.steps} steps")

    def digest(self) -> str:
        settings = {"base": self.base, "mitigation": self.mitigation, "penalty": dict(self.penalty),
                    "data": list(self.data), "train": digest_fields(self.train)}
        if self.retrofit:  # left out when empty: the digests of models trained before versions existed hold
            settings["retrofit"] = self.retrofit
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
