"""`tune:<model>-<mitigation>` (`tune:smollm2-135m-none`, `tune:smollm2-135m-outlier_penalty`): a pretrained model
trained further here with one mitigation and `RECIPE`, cached by the recipe's hash. The `none` member is the fair
control (same data, steps and seed, no mitigation), and the pretrained model itself the second reference. This
source only reads a trained one; `qharness.training.ensure` trains it on first use.

`tune400:` names the same with the longer recipe (`LONG_RECIPE`: 400 steps, cosine decay), which keeps a bf16 copy
of the weights at each of its snapshot steps; `@step<N>` reads that copy, so every point of a training curve is a
model name of its own (`tune400:smollm2-135m-none@step100`) and its leaderboard rows stay keyed apart. Settings of a
loss-side mitigation follow the mitigation, each after a ':' (`tune400:smollm2-135m-lp_penalty:power=8:strength=1`;
not ',', which a YAML list would split), the values `train --from ... --penalty-NAME` takes, so the name is the whole
recipe. `:seed=N` (an integer, 0 by default) trains the same recipe with another seed
(`tune400:smollm2-135m-none:seed=1`): its own run folder and family (each seed's mitigations are set against that
seed's control), and the rows of a recipe's seeds share `train_recipe`, which report/seeds.py groups.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qharness.core.cache import cache_path
from qharness.core.errors import ConfigError, ModelLoadError, QHarnessError, UnknownName
from qharness.data.recipe import TUNE400_SNAPSHOTS, TUNE400_TRAIN, TuneRecipe
from qharness.models.sources import SOURCES, Source, read_trained, source_for

PREFIX = "tune:"
LONG_PREFIX = "tune400:"
RECIPE = TuneRecipe(base="")  # every tune: model: this, with its base and mitigation filled in
LONG_RECIPE = TuneRecipe(base="", train=TUNE400_TRAIN, snapshots=TUNE400_SNAPSHOTS)  # every tune400: model
SNAPSHOTS = "snapshots"  # the run folder's subfolder of step<N> model folders
STEP = re.compile(r"^(.*)@step(\d+)$")
SEEDED_BASE = re.compile(r":seed=\d+-")  # tune:zoo:llama-base:seed=1-none: a seed inside the base
SETTINGS = re.compile(r"^(?P<rest>.*?)(?P<settings>(?::[A-Za-z_]+=[^:]*)+)?$")  # a base holds no ':NAME=' part


def step_of(model: str) -> tuple[str, int] | None:
    """`tune400:smollm2-135m-none@step100` -> ("tune400:smollm2-135m-none", 100); None for a name without a step."""
    matched = STEP.match(model)
    return (matched.group(1), int(matched.group(2))) if matched else None


@dataclass(frozen=True)
class TuneName:
    prefix: str  # PREFIX or LONG_PREFIX: which recipe
    base: str
    mitigation: str
    penalty: tuple[tuple[str, float], ...] = ()  # sorted (setting, value)
    step: int | None = None  # a snapshot's step, None for the finished model
    seed: int = 0  # the training seed (`:seed=N`)

    @property
    def run(self) -> str:
        """The name of the whole training run: without the step."""
        return self.prefix + f"{self.base}-{self.mitigation}" + _settings_text(self.penalty) + _seed_text(self.seed)


def _seed_text(seed: int) -> str:
    return f":seed={seed}" if seed else ""


def _settings_text(penalty: tuple[tuple[str, float], ...]) -> str:
    return "".join(f":{key}={value:g}" for key, value in penalty)


def _prefix_of(name: str) -> str:
    return LONG_PREFIX if name.startswith(LONG_PREFIX) else PREFIX


def _settings(text: str, name: str) -> tuple[tuple[str, float], ...]:
    pairs = []
    for item in text.removeprefix(":").split(":"):
        key, sep, value = item.partition("=")
        try:
            pairs.append((key.strip(), float(value)))
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise UnknownName(f"'{name}': penalty settings are :NAME=NUMBER each, e.g. "
                              f"{LONG_PREFIX}smollm2-135m-lp_penalty:power=8:strength=1; got '{item}'")
    return tuple(sorted(pairs))


def parse_name(name: str) -> TuneName:
    """`tune400:smollm2-135m-outlier_penalty+gated_attention:strength=10@step100` -> its parts; checks the form only.
    Mitigation names have no '-', so the base is everything before the last '-' of the part without settings (a base
    may hold ':' too, as zoo:llama-base does, but never ':NAME=')."""
    prefix = _prefix_of(name)
    if SEEDED_BASE.search(name):
        raise UnknownName(f"'{name}': the base of a tuned model cannot carry a seed; a seed goes after the "
                          f"mitigation ({prefix}<model>-<mitigation>:seed=N) and seeds the continued training")
    rest, step = name.removeprefix(prefix), None
    matched = STEP.match(rest)
    if matched:
        rest, step = matched.group(1), int(matched.group(2))
    parts = SETTINGS.match(rest)
    assert parts is not None, "the pattern matches any string"
    rest, settings = parts["rest"], parts["settings"]
    penalty = _settings(settings, name) if settings else ()
    seed = _seed(dict(penalty).get("seed", 0), name)
    penalty = tuple(pair for pair in penalty if pair[0] != "seed")
    base, _, mitigation = rest.rpartition("-")  # after the settings are off: a value may hold '-' (1e-3)
    if not base or not mitigation:
        raise UnknownName(f"unknown tuned model '{name}': write {prefix}<model>-<mitigation>, e.g. "
                          f"{prefix}smollm2-135m-none or {prefix}smollm2-135m-outlier_penalty")
    return TuneName(prefix, base, mitigation, penalty, step, seed)


def _seed(value: float, name: str) -> int:
    from qharness.data.recipe import MAX_SEED

    if not (math.isfinite(value) and 0 <= value <= MAX_SEED and value == int(value)):
        raise UnknownName(f"'{name}': :seed= takes an integer in 0..{MAX_SEED}, got {value:g}")
    return int(value)


def parse(name: str) -> tuple[str, str]:
    """`tune:smollm2-135m-outlier_penalty` -> ("smollm2-135m", "outlier_penalty")."""
    parsed = parse_name(name)
    return parsed.base, parsed.mitigation


def recipe_for(name: str) -> TuneRecipe:
    """The recipe of a tune: or tune400: name; the base must be a model name of another kind, the mitigation one that
    can be added to a trained model (it preserves the function, or has a retrofit), and a snapshot step one the
    recipe keeps."""
    from qharness.models import mitigations

    parsed = parse_name(name)
    if parsed.base.startswith((PREFIX, LONG_PREFIX)):
        raise UnknownName(f"'{name}': the base of a tuned model is a pretrained model, not another tuned one")
    try:
        source_for(parsed.base)
    except QHarnessError:
        whole = name.removeprefix(parsed.prefix)
        if _is_model(whole):  # tune:smollm2-135m: not an unknown 'smollm2', a name without its mitigation
            raise UnknownName(f"tuned model '{name}' names no mitigation: write {parsed.prefix}{whole}-<mitigation>, "
                              f"e.g. {parsed.prefix}{whole}-none (the control)") from None
        for cut in (i for i, c in enumerate(whole) if c == "-"):  # tune:smollm2-135m-kv-bias: the typo is in the
            if _is_model(whole[:cut]):  # mitigation, whose registry names the close ones
                mitigations.resolve(whole[cut + 1:])
        raise
    unfit = [m.name for m in mitigations.resolve(parsed.mitigation) if not (m.preserves_function or m.retrofit)]
    if unfit:
        fit = sorted(e.name for e in mitigations.load_mitigations() if e.obj.preserves_function or e.obj.retrofit)
        raise UnknownName(f"mitigation '{'+'.join(unfit)}' cannot yet be added to a trained model without changing "
                          f"what it computes; continued training takes none or {', '.join(fit)}")
    mitigations.check_penalty(parsed.mitigation, parsed.penalty)
    versions = "+".join(f"{m.name}={m.version}" for m in mitigations.resolve(parsed.mitigation) if m.version)
    kind = RECIPE if parsed.prefix == PREFIX else LONG_RECIPE
    recipe = replace(kind, base=parsed.base, mitigation=parsed.mitigation, penalty=parsed.penalty, retrofit=versions,
                     train=replace(kind.train, seed=parsed.seed))
    if parsed.step is not None and parsed.step not in recipe.snapshots:
        kept = ", ".join(f"@step{s}" for s in recipe.snapshots) or "none (only tune400: names keep snapshots)"
        raise UnknownName(f"'{name}': this recipe keeps no weights at step {parsed.step}; its snapshots: {kept}")
    return recipe


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
    if not name.startswith((PREFIX, LONG_PREFIX)):
        return False
    check_context(recipe_for(name))  # a malformed or untrainable tune: name is an error here, not "unknown model"
    return True


def family(name: str) -> str:
    """Models continued from one base by one recipe; a snapshot's family is its step's, so each step's mitigations
    are set against the control at that same step."""
    parsed = parse_name(name)
    return (parsed.prefix + parsed.base + _seed_text(parsed.seed)
            + (f"@step{parsed.step}" if parsed.step is not None else ""))


def folder_for(name: str) -> Path:
    """The run folder (checkpoint, log, model, snapshots) of a tuned model, whichever step the name reads."""
    parsed = parse_name(name)
    text = f"{parsed.base}-{parsed.mitigation}" + (f"-seed{parsed.seed}" if parsed.seed else "")
    label = "".join(c if c.isalnum() or c in "._+-" else "_" for c in text)[-80:]
    kind = parsed.prefix.removesuffix(":")
    return cache_path(kind, "models", f"{label}-{recipe_for(name).digest()}")


def snapshot_folder(run_folder: Path, step: int) -> Path:
    return run_folder / SNAPSHOTS / f"step{step}"


def read(name: str, dtype: Any) -> tuple[Any, Any, str]:
    parsed = parse_name(name)
    folder = folder_for(name)
    provenance = f"{name} (trained here from {parsed.base}, recipe {recipe_for(name).digest()})"
    if parsed.step is None:
        return read_trained(name, folder, dtype, provenance)
    snapshot = snapshot_folder(folder, parsed.step)
    if not (snapshot / "config.json").is_file():
        from qharness.models.sources import is_trained_run

        if is_trained_run(folder):
            raise ModelLoadError(f"{name}: the step-{parsed.step} weights were deleted once evaluated (their rows are "
                                 f"in the leaderboard); retrain with `rm -r {folder}` and `qharness train --model "
                                 f"{parsed.run}` to read them again")
        raise ModelLoadError(f"{name} is not trained yet; `qharness train --model {parsed.run}` trains it, and "
                             "`qharness run` / `scan` / `sweep` do so on first use")
    from qharness.models.loading import load_pretrained

    return (*load_pretrained(str(snapshot), dtype), provenance + f" at step {parsed.step}")


def describe_name(name: str) -> dict[str, str]:
    return {"mitigation": parse_name(name).mitigation, "family": family(name)}


SOURCES.add("tune", Source(
    name="tune",
    form="a tuned model (tune:smollm2-135m-none, tune:smollm2-135m-outlier_penalty, "
         "tune400:smollm2-135m-none@step100)",
    order=25,
    matches=matches,
    read=read,
    context_limit=lambda name: source_for(parse(name)[0]).context_limit(parse(name)[0]),
    family=family,
    describe_name=describe_name,
    requires=lambda name: (parse(name)[0],),
    history=lambda name: folder_for(name) / "train_log.jsonl",
))
