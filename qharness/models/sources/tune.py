"""`tune:<model>-<mitigation>` (`tune:smollm2-135m-none`, `tune:smollm2-135m-outlier_penalty`): a pretrained model
trained further here with one mitigation and `RECIPE`, cached by the recipe's hash. The `none` member is the fair
control (same data, steps and seed, no mitigation), and the pretrained model itself the second reference. This
source only reads a trained one; `qharness.training.ensure` trains it on first use.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from qharness.cache import cache_path
from qharness.errors import UnknownName
from qharness.models.sources import SOURCES, Source, read_trained, source_for
from qharness.recipe import TuneRecipe

PREFIX = "tune:"
RECIPE = TuneRecipe(base="")  # every tuned model: this, with its base and mitigation filled in


def parse(name: str) -> tuple[str, str]:
    """`tune:smollm2-135m-outlier_penalty` -> ("smollm2-135m", "outlier_penalty"); mitigation names have no '-'."""
    base, _, mitigation = name.removeprefix(PREFIX).rpartition("-")
    if not base or not mitigation:
        raise UnknownName(f"unknown tuned model '{name}': write tune:<model>-<mitigation>, e.g. "
                          "tune:smollm2-135m-none or tune:smollm2-135m-outlier_penalty")
    return base, mitigation


def recipe_for(name: str) -> TuneRecipe:
    """The recipe of a tune: name; the base must be a model name of another kind, the mitigation one that can be
    added to a trained model (it preserves the function, or has a retrofit)."""
    from qharness.models import mitigations

    base, mitigation = parse(name)
    if base.startswith(PREFIX):
        raise UnknownName(f"'{name}': the base of a tuned model is a pretrained model, not another tune: name")
    source_for(base)  # raises for an unknown base
    unfit = [m.name for m in mitigations.resolve(mitigation) if not (m.preserves_function or m.retrofit)]
    if unfit:
        fit = sorted(e.name for e in mitigations.load_mitigations() if e.obj.preserves_function or e.obj.retrofit)
        raise UnknownName(f"mitigation '{'+'.join(unfit)}' cannot yet be added to a trained model without changing "
                          f"what it computes; continued training takes none or {', '.join(fit)}")
    return replace(RECIPE, base=base, mitigation=mitigation)


def family(name: str) -> str:
    return PREFIX + parse(name)[0]


def folder_for(name: str) -> Path:
    base, mitigation = parse(name)
    label = "".join(c if c.isalnum() or c in "._+-" else "_" for c in f"{base}-{mitigation}")[-80:]
    return cache_path("tune", "models", f"{label}-{recipe_for(name).digest()}")


def read(name: str, dtype: Any) -> tuple[Any, Any, str]:
    return read_trained(name, folder_for(name), dtype,
                        f"{name} (trained here from {parse(name)[0]}, recipe {recipe_for(name).digest()})")


def describe_name(name: str) -> dict[str, str]:
    return {"mitigation": parse(name)[1], "family": family(name)}


SOURCES.add("tune", Source(
    name="tune",
    form="a tuned model (tune:smollm2-135m-none, tune:smollm2-135m-outlier_penalty)",
    order=25,
    matches=lambda name: name.startswith(PREFIX) and bool(recipe_for(name)),
    read=read,
    context_limit=lambda name: source_for(parse(name)[0]).context_limit(parse(name)[0]),
    family=family,
    describe_name=describe_name,
    requires=lambda name: (parse(name)[0],),
    history=lambda name: folder_for(name) / "train_log.jsonl",
))
