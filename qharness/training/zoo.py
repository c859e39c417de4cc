"""The model zoo: small Llama (GLU) and GPT-2 (non-GLU) models trained here with and without each mitigation,
named `zoo:<arch>-<mitigation>` (`zoo:llama-base`, `zoo:llama-tvr+dyt`, `zoo:gpt2-kv_bias`) and accepted anywhere
`--model` is. A zoo model is trained on first use with the one recipe below, cached under the recipe's hash, and
resumed from its checkpoint if a run was interrupted.

The recipe is the one that grows the most pronounced BOS outlier in a Llama of this size in a CPU budget (see
../shared/corpora.md and the README): lr 3e-3 without weight decay, batch 8 x 128 tokens, 4,000 steps (one pass over
the 4.3 M-token training text), about 7 minutes per model on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from qharness.cache import cache_dir
from qharness.errors import UnknownName
from qharness.training.architectures import ARCHES, ArchConfig
from qharness.training.loop import TrainConfig

PREFIX = "zoo:"
BASELINE = "base"
# The paper's five mitigations, then the two from other work.
MITIGATIONS = ("kv_bias", "tvr", "dyt", "tvr+kv_bias", "tvr+dyt", "gated_attention", "clipped_softmax")
GRID: tuple[str, ...] = (
    *(f"zoo:llama-{m}" for m in (BASELINE, *MITIGATIONS)),
    *(f"zoo:gpt2-{m}" for m in (BASELINE, "kv_bias", "dyt")),
)


@dataclass(frozen=True)
class Recipe:
    arch: ArchConfig = field(default_factory=ArchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mitigation: str = "none"

    def digest(self) -> str:
        settings = {"arch": asdict(self.arch), "mitigation": self.mitigation,
                    "train": {k: v for k, v in asdict(self.train).items() if k != "budget_minutes"}}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


RECIPE = Recipe()  # every zoo model: this, with its arch and mitigation filled in


def is_zoo_name(name: str) -> bool:
    return name.startswith(PREFIX)


def recipe_for(name: str) -> Recipe:
    """`zoo:llama-tvr+dyt` -> its recipe; unknown arch or mitigation raises with the valid names."""
    from qharness.models import mitigations

    arch, _, mitigation = name.removeprefix(PREFIX).partition("-")
    if arch not in ARCHES or not mitigation:
        raise UnknownName(f"unknown zoo model '{name}': write zoo:<arch>-<mitigation> with arch one of "
                          f"{', '.join(ARCHES)}, e.g. zoo:llama-base or zoo:gpt2-kv_bias")
    spec = "none" if mitigation == BASELINE else mitigation
    mitigations.resolve(spec)  # raises naming the valid mitigations
    return replace(RECIPE, arch=replace(RECIPE.arch, arch=arch), mitigation=spec)


def folder_for(name: str, recipe: Recipe) -> Path:
    return cache_dir("zoo", "models", f"{name.removeprefix(PREFIX)}-{recipe.digest()}")


@contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """One trainer per model: a sweep's workers asking for the same zoo model wait for the first to finish. Under
    `accelerate launch` the main process holds it for all ranks (taken by each, it deadlocked; see
    loop.main_process_lock)."""
    from qharness.training.loop import main_process_lock

    with main_process_lock(folder / ".lock"):
        yield


def train_zoo_model(name: str, progress: bool = True, budget_minutes: float | None = None) -> Path | None:
    """Train `name` unless it is trained; returns its model folder, or None when the budget stopped it first."""
    from qharness.training.run import train_model

    recipe = recipe_for(name)
    folder = folder_for(name, recipe)
    with exclusive(folder):
        if not (folder / "model" / "config.json").exists():
            if progress:
                print(f"{name}: not trained yet; training it now ({recipe.train.steps} steps, resumable)")
            if not train_model(recipe, folder, progress=progress, budget_minutes=budget_minutes).finished:
                return None
    return folder / "model"


def materialize(name: str, progress: bool = True) -> Path:
    """The folder of a trained zoo model, training it first if needed."""
    path = train_zoo_model(name, progress)
    assert path is not None  # no budget: training runs to the end
    return path


def describe(name: str) -> dict[str, Any]:
    """What a trained zoo model's folder says about its training (empty if not trained yet)."""
    recipe = recipe_for(name)
    path = folder_for(name, recipe) / "model" / "training.json"
    return json.loads(path.read_text()) if path.exists() else {}
