"""Training recipes as YAML files: a published from-scratch setting (architecture, optimizer, data, and the processes
it ran on) that `qharness train --recipe FILE` trains and `--dry-run` prices at 6·N·T FLOPs without training.

A file holds the keys of `RecipeFile`, with `arch:` and `train:` mappings checked against ArchConfig and TrainConfig
through qharness.core.typecheck, so an unknown key or a value of the wrong type is a one-line error. `recipes/`
holds the published settings; each file says in comments which values its paper or code confirms and which are
assumed. To add one, copy a file there and cite where every number comes from.

Data: from-scratch training reads the built-in training text only (`data: builtin`, its own 4k BPE). A recipe that
names a hub dataset (`data: hf:<dataset>`, what the published run trained on) is refused for training with a
one-line error until streaming reaches this path; `--data builtin` trains its architecture and settings on the
built-in text instead (with the built-in tokenizer's vocabulary), and `--dry-run` prices the published run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from qharness.core.errors import ConfigError, DataError
from qharness.core.typecheck import from_mapping, read_yaml_mapping
from qharness.data.recipe import ArchConfig, Recipe, TrainConfig

BUILTIN = "builtin"
# Dense tensor-core peak of one H100 SXM or H200 (the same compute die) in TFLOP/s: BF16 989, TF32 495 (what fp32
# matmuls run as on it). NVIDIA's datasheets; the sparse figures are twice these and never apply to training.
PEAK_TFLOPS = {"bf16": 989.0, "fp32": 495.0}
UTILIZATION = 0.4  # model FLOPs utilization a well-tuned small-model run reaches (nanoGPT's GPT-2 reports ~40% on A100)


@dataclass(frozen=True)
class RecipeFile:
    name: str  # the recipe's name, e.g. gpt2-124m-sun2024 (default: the file's name)
    source: str = ""  # where the settings come from: paper and code
    data: str = BUILTIN  # "builtin" (the shipped training text) or "hf:<dataset>", the data the published run used
    tokenizer: str = BUILTIN  # the tokenizer the published run used (a record: the built-in text has its own)
    processes: int = 1  # data-parallel processes of the published run; a step sees batch x grad_accum x processes
    mitigation: str = "none"  # as `qharness train --mitigation`
    arch: ArchConfig = field(default_factory=ArchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ConfigError(f"recipe {self.name}: processes must be >= 1, got {self.processes}")
        if self.data != BUILTIN and not self.data.startswith("hf:"):
            raise ConfigError(f"recipe {self.name}: data must be '{BUILTIN}' or 'hf:<dataset>', got '{self.data}'")
        if self.arch.context != self.train.context:
            raise ConfigError(f"recipe {self.name}: arch context {self.arch.context} differs from train context "
                              f"{self.train.context}; give context once, under train")

    def recipe(self) -> Recipe:
        return Recipe(arch=self.arch, train=self.train, mitigation=self.mitigation)

    @property
    def sequences_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum * self.processes


def load_recipe_file(path: Path) -> RecipeFile:
    """Read and check the whole file (syntax, keys, every value's type) before anything is built."""
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    raw = read_yaml_mapping(path, "a recipe is a mapping (name, data, arch, train, ...)")
    valid = sorted(f.name for f in fields(RecipeFile))  # arch and train included: they are read as sections below
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; valid keys: {valid}")
    sections = {}
    for key, cls in (("arch", ArchConfig), ("train", TrainConfig)):
        section = raw.get(key, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: {key} must be a mapping of its settings, got {section!r}")
        sections[key] = from_mapping(cls, section, f"{path}: {key}", skip=("budget_minutes",))
    top = from_mapping(RecipeFile, {k: v for k, v in raw.items() if k not in sections}, str(path),
                       skip=("arch", "train"))
    train = TrainConfig(**sections["train"])
    arch = ArchConfig(**{"context": train.context, **sections["arch"]})  # context is given once, under train
    return RecipeFile(**{"name": path.stem, **top}, arch=arch, train=train)


def with_overrides(base: RecipeFile, arch: dict[str, Any], train: dict[str, Any], mitigation: str | None,
                   data: str | None) -> RecipeFile:
    """`base` with command-line values put in; --context sets the model's context too. `data` 'builtin' on a recipe
    of a hub dataset also takes the built-in tokenizer's vocabulary (the recipe's belongs to its own tokenizer)."""
    from qharness.training.text import VOCAB_SIZE

    if "context" in train:
        arch = {**arch, "context": train["context"]}
    if data is not None and data != BUILTIN:
        raise DataError(f"--data {data}: from-scratch training reads only the built-in text (--data {BUILTIN}); "
                        "files and hub datasets are for --from")
    if data == BUILTIN and base.data != BUILTIN:
        arch = {"vocab_size": VOCAB_SIZE, **arch}
    return replace(base, arch=replace(base.arch, **arch), train=replace(base.train, **train),
                   mitigation=mitigation or base.mitigation, data=data or base.data)


def check_trainable(recipe: RecipeFile) -> None:
    if recipe.data != BUILTIN:
        raise DataError(f"recipe {recipe.name} trains on {recipe.data}, which from-scratch training cannot read yet "
                        f"(it reads the built-in text only); --dry-run prices it, --data {BUILTIN} trains its "
                        "settings on the built-in text")


def compute_estimate(recipe: RecipeFile) -> dict[str, float]:
    """Parameters (counted on a meta-device model: no memory), tokens, 6·N·T and GPU-hours at UTILIZATION of one
    H100/H200. 6·N·T counts the weight matmuls forward and backward (Kaplan et al. 2020); attention's
    score and value products add 12·layers·d_model·context FLOPs per token, reported apart."""
    import torch

    from qharness.training.architectures import new_model

    with torch.device("meta"):
        model = new_model(recipe.arch, 0, 1, seed=0)
    params = sum(p.numel() for p in model.parameters())
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    tokens = recipe.train.tokens * recipe.processes
    flops = 6 * params * tokens
    attention = 12 * recipe.arch.layers * recipe.arch.d_model * recipe.train.context * tokens
    peak = PEAK_TFLOPS[recipe.train.precision] * 1e12
    return {"parameters": params, "non_embedding": params - embeddings, "tokens": tokens, "flops": flops,
            "attention_flops": attention, "peak_tflops": peak / 1e12,
            "gpu_hours": flops / (peak * UTILIZATION) / 3600}


def _count(n: float) -> str:
    return next(f"{n / scale:.2f} {unit}" for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k"), (1, ""))
                if n >= scale or scale == 1).rstrip()


def _duration(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 0.1 else f"{hours * 3600:.1f} s"


def format_estimate(recipe: RecipeFile) -> str:
    e, a, t = compute_estimate(recipe), recipe.arch, recipe.train
    hours, gpus = e["gpu_hours"], "1 GPU" if recipe.processes == 1 else f"{recipe.processes} GPUs"
    return "\n".join([
        f"recipe {recipe.name}" + (f"  ({recipe.source})" if recipe.source else ""),
        f"model: {a.arch}, d_model {a.d_model}, {a.layers} layers, {a.heads} heads, context {a.context}, "
        f"vocab {a.vocab_size}, mitigation {recipe.mitigation}",
        f"data: {recipe.data} (tokenizer {recipe.tokenizer}); {gpus} x batch {t.batch_size} x "
        f"grad_accum {t.grad_accum} = {recipe.sequences_per_step} sequences a step; precision {t.precision}",
        f"parameters N = {_count(e['parameters'])} ({_count(e['non_embedding'])} without embeddings)",
        f"tokens T = {t.steps:,} steps x {recipe.sequences_per_step} x {t.context} = {_count(e['tokens'])}",
        f"6NT = {e['flops']:.3g} FLOPs (attention adds {e['attention_flops']:.2g}, "
        f"+{e['attention_flops'] / e['flops']:.0%})",
        f"estimate: {hours:,.3g} GPU-hours on H100/H200 at {UTILIZATION:.0%} of the {e['peak_tflops']:.0f} TFLOP/s "
        f"dense {t.precision} peak: {_duration(hours / recipe.processes)} on {gpus}",
    ])
