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
from qharness.errors import ConfigError, QHarnessError, UnknownName
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
    try:
        source_for(base)
    except QHarnessError:
        whole = name.removeprefix(PREFIX)
        if _is_model(whole):  # tune:smollm2-135m: not an unknown 'smollm2', a name without its mitigation
            raise UnknownName(f"tuned model '{name}' names no mitigation: write {PREFIX}{whole}-<mitigation>, e.g. "
                              f"{PREFIX}{whole}-none (the control)") from None
        for cut in (i for i, c in enumerate(whole) if c == "-"):  # tune:smollm2-135m-kv-bias: the typo is in the
            if _is_model(whole[:cut]):  # mitigation, whose registry names the close ones
                mitigations.resolve(whole[cut + 1:])
        raise
    unfit = [m.name for m in mitigations.resolve(mitigation) if not (m.preserves_function or m.retrofit)]
    if unfit:
        fit = sorted(e.name for e in mitigations.load_mitigations() if e.obj.preserves_function or e.obj.retrofit)
        raise UnknownName(f"mitigation '{'+'.join(unfit)}' cannot yet be added to a trained model without changing "
                          f"what it computes; continued training takes none or {', '.join(fit)}")
    return replace(RECIPE, base=base, mitigation=mitigation)


def _is_model(name: str) -> bool:
    try:
        source_for(name)
    except QHarnessError:
        return False
    return True


def check_context(recipe: TuneRecipe) -> None:
    """Training sequences fit the positions the base model knows: GPT-2's learned positions end at n_positions,
    and a longer sequence indexes past them mid-run (after a zoo base was trained for it)."""
    limit = source_for(recipe.base).context_limit(recipe.base)
    if limit is not None and recipe.train.context > limit:
        raise ConfigError(f"{recipe.base} takes at most {limit} positions, but this training reads "
                          f"{recipe.train.context}-token sequences; train it with --from {recipe.base} --context "
                          f"{limit} (or less) --out FOLDER")


def matches(name: str) -> bool:
    if not name.startswith(PREFIX):
        return False
    check_context(recipe_for(name))  # a malformed or untrainable tune: name is an error here, not "unknown model"
    return True


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
    matches=matches,
    read=read,
    context_limit=lambda name: source_for(parse(name)[0]).context_limit(parse(name)[0]),
    family=family,
    describe_name=describe_name,
    requires=lambda name: (parse(name)[0],),
    history=lambda name: folder_for(name) / "train_log.jsonl",
))
