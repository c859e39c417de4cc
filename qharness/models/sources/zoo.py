"""The zoo's names: `zoo:<arch>-<mitigation>` (`zoo:llama-base`, `zoo:llama-tvr+dyt`, `zoo:gpt2-kv_bias`) is a small
Llama (GLU) or GPT-2 (non-GLU) trained here with `RECIPE`, its arch and mitigation filled in, and cached under the
recipe's hash. This source only reads a trained one; `qharness.training.ensure` trains it on first use.

The recipe is the one that grows the most pronounced BOS outlier in a Llama of this size in a CPU budget (see the
README, "The zoo"): lr 3e-3 without weight decay, batch 8 x 128 tokens, 4,000 steps (one pass over the 4.3 M-token
training text), about 7 minutes per model on 2 cores. `:seed=N` trains the same recipe with another seed
(`zoo:llama-base:seed=1`): a model of its own, in its own family, whose rows share `train_recipe` with the other
seeds' (report/seeds.py groups them).
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from qharness.core.cache import cache_path
from qharness.core.errors import QHarnessError, UnknownName
from qharness.data.recipe import ARCHES, Recipe
from qharness.models.sources import SOURCES, Source, is_trained_run, read_trained

PREFIX = "zoo:"
BASELINE = "base"  # the mitigation part of a zoo name for "no mitigation"
# The paper's five mitigations, then the two from other work.
MITIGATIONS = ("kv_bias", "tvr", "dyt", "tvr+kv_bias", "tvr+dyt", "gated_attention", "clipped_softmax")
GRID: tuple[str, ...] = (
    *(f"zoo:llama-{m}" for m in (BASELINE, *MITIGATIONS)),
    *(f"zoo:gpt2-{m}" for m in (BASELINE, "kv_bias", "dyt")),
)
RECIPE = Recipe()  # every zoo model: this, with its arch and mitigation filled in
SEED = re.compile(r"^(?P<name>.*?):seed=(?P<seed>[^:]*)$")


def is_zoo_name(name: str) -> bool:
    return name.startswith(PREFIX)


def split_seed(name: str) -> tuple[str, int]:
    """`zoo:llama-base:seed=2` -> ("zoo:llama-base", 2); a name without `:seed=` has seed 0."""
    from qharness.data.recipe import MAX_SEED

    matched = SEED.match(name)
    if not matched:
        return name, 0
    text = matched["seed"]
    if not (text.isdigit() and int(text) <= MAX_SEED):
        raise UnknownName(f"'{name}': :seed= takes an integer in 0..{MAX_SEED}, got '{text}'")
    if text != str(int(text)) or int(text) == 0:  # one name per model: its rows are keyed by the name
        plain = matched["name"] + (f":seed={int(text)}" if int(text) else "")
        raise UnknownName(f"'{name}' is the model '{plain}'; write it so (seed 0 is the default)")
    return matched["name"], int(text)


def parse(name: str) -> tuple[str, str]:
    """`zoo:llama-tvr+dyt` -> ("llama", "tvr+dyt"); the baseline's mitigation is "none". Checks the form only."""
    arch, _, mitigation = split_seed(name)[0].removeprefix(PREFIX).partition("-")
    if arch not in ARCHES or not mitigation:
        raise UnknownName(f"unknown zoo model '{name}': write zoo:<arch>-<mitigation> with arch one of "
                          f"{', '.join(ARCHES)}, e.g. zoo:llama-base or zoo:gpt2-kv_bias")
    if mitigation == "none":  # the baseline's recipe under a second name: a duplicate trained, a second baseline
        raise UnknownName(f"unknown zoo model '{name}': the zoo's baseline is named {BASELINE}; did you mean "
                          f"'{PREFIX}{arch}-{BASELINE}'?")
    return arch, "none" if mitigation == BASELINE else mitigation


def _recipe(name: str) -> Recipe:
    arch, mitigation = parse(name)
    return replace(RECIPE, arch=replace(RECIPE.arch, arch=arch), mitigation=mitigation,
                   train=replace(RECIPE.train, seed=split_seed(name)[1]))


def recipe_for(name: str) -> Recipe:
    """`zoo:llama-tvr+dyt` -> its recipe; an unknown arch or mitigation raises with the valid names."""
    from qharness.models import mitigations

    recipe = _recipe(name)
    mitigations.check_from_scratch(recipe.mitigation)  # raises naming the valid mitigations
    return recipe


def folder_for(name: str) -> Path:
    """The run folder (checkpoint, log, model/) of a zoo model, by the hash of its recipe."""
    unseeded, seed = split_seed(name)
    label = unseeded.removeprefix(PREFIX) + (f"-seed{seed}" if seed else "")
    return cache_path("zoo", "models", f"{label}-{_recipe(name).digest()}")


def is_trained(name: str) -> bool:
    return is_trained_run(folder_for(name))


def describe(name: str) -> dict[str, Any]:
    """What a trained zoo model's folder says about its training (empty if not trained yet)."""
    path = folder_for(name) / "model" / "training.json"
    return json.loads(path.read_text()) if path.exists() else {}


def matches(name: str) -> bool:
    if not is_zoo_name(name):
        return False
    try:
        recipe_for(name)  # a malformed zoo name is an error here, not "unknown model"
    except QHarnessError as exc:
        close = difflib.get_close_matches(name, GRID, n=1, cutoff=0.8)
        if not close or "did you mean" in str(exc):  # the mitigation registry's own suggestion says it already
            raise
        raise type(exc)(f"{exc}; did you mean '{close[0]}'?") from exc
    return True


def read(name: str, dtype: Any) -> tuple[Any, Any, str]:
    return read_trained(name, folder_for(name), dtype, f"{name} (trained here, recipe {_recipe(name).digest()})",
                        cost=" (about 7 min on 2 cores)")


def family(name: str) -> str:
    seed = split_seed(name)[1]
    return PREFIX + parse(name)[0] + (f":seed={seed}" if seed else "")


def describe_name(name: str) -> dict[str, str]:
    arch, mitigation = parse(name)
    return {"arch": arch, "mitigation": mitigation, "family": family(name)}


SOURCES.add("zoo", Source(
    name="zoo",
    form="a zoo model (zoo:llama-base, zoo:gpt2-kv_bias, ...)",
    order=20,
    matches=matches,
    read=read,
    context_limit=lambda name: _recipe(name).arch.context,
    names=lambda: list(GRID),
    family=family,
    describe_name=describe_name,
    history=lambda name: folder_for(name) / "train_log.jsonl",
))
