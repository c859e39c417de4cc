"""Which models belong together: a family is models trained with one recipe except the mitigation (the zoo's
zoo:llama-*, the tune: models continued from one pretrained model, a published pair); its member with mitigation
"none" is the baseline, and a family trained from another model also has that model as its reference."""

from __future__ import annotations

from qharness.data.results import Row

REFERENCE = "reference"  # the mitigation label of the model a family was trained from (the pretrained model)


def with_references(families: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """`families` plus, for a family trained from another model (tune: models), that model as its reference row."""
    from qharness.models.sources import related

    out = dict(families)
    for model, (family, _) in families.items():
        for base in related(model)[0]:
            out.setdefault(base, (family, REFERENCE))
    return out


def model_families(rows: list[Row]) -> dict[str, tuple[str, str]]:
    """model -> (family, mitigation) for every model that belongs to a family."""
    return {row["model"]: (row["family"], row["mitigation"] or "none") for row in rows if row.get("family")}
