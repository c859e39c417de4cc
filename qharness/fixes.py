"""Fixes compared: for one model and scheme, how much of the quantization loss does each fix leave?

- keeping positions in full precision (`--keep-positions 0`: the BOS token, the causal check);
- a post-hoc transform applied before quantizing (`--transform`: SmoothQuant, Hadamard rotation), free at load time;
- a training-time mitigation: the model trained further with it (a `tune:` model of the model's family), which costs
  training and moves the fp model too (the mitigations table has that cost; here each trained model is measured
  against its own fp).

Each cell is the relative perplexity change under the scheme, so a user can read off whether a mitigation is worth
retraining for when a transform at load time would do.
"""

from __future__ import annotations

from typing import Any

from qharness.degradation import Degradation, percent
from qharness.families import REFERENCE

MAX_FP_COST = 0.10  # a trained fix whose fp perplexity is worse than the control's by more is not a candidate


def _fix(d: Degradation) -> str | None:
    """The column of a row that applies one load-time fix (keep or transform); None for the plain scheme or a row
    with a KV-cache setting (a different scheme, not a fix)."""
    if d.kv or d.plain:
        return None
    return ", ".join(part for part in (f"transform {d.transform}" if d.transform else "",
                                       f"keep {d.keep}" if d.keep else "") if part)


def fixes_table(items: list[Degradation], families: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Rows (model, task, scheme) of perplexity tasks for every model run with a load-time fix or trained further
    with a mitigation; columns: plain, each load-time fix, each trained member of its family, and the best."""
    ppl = [d for d in items if d.metric == "ppl" and not d.kv]
    rel = {(d.model, d.task, d.quant, _fix(d) or "plain"): d.rel for d in ppl if d.plain or _fix(d)}
    fixed = {d.model for d in ppl if _fix(d)}
    fp = {(d.model, d.task): d.fp_value for d in ppl}
    references = {model for model, (_, mitigation) in families.items() if mitigation == REFERENCE}
    rows, columns = [], ["plain"]
    for model in sorted(fixed | references):
        family = families.get(model, ("", ""))[0]
        trained = sorted((m for m, (f, mitigation) in families.items()
                          if family and f == family and mitigation != REFERENCE and m != model),
                         key=lambda m: (families[m][1] != "none", families[m][1]))
        for task, scheme in sorted({(d.task, d.quant) for d in ppl if d.model == model and d.plain}):
            cells = {"plain": rel[(model, task, scheme, "plain")]}
            cells.update({f: value for (m, t, q, f), value in rel.items()
                          if (m, t, q) == (model, task, scheme) and f != "plain"})
            for member in trained:
                if (member, task, scheme, "plain") in rel:
                    cells[f"trained: {families[member][1]}"] = rel[(member, task, scheme, "plain")]
            if len(cells) < 2:
                continue
            columns += [c for c in cells if c not in columns]
            costly = _costly(trained, families, fp.get, task)
            candidates = [c for c in cells if c != "plain" and c not in costly]
            best = min(candidates, key=cells.__getitem__) if candidates else ""
            rows.append({"model": model, "task": task, "scheme": scheme, "cells": cells, "best": best,
                         "costly": sorted(c for c in cells if c in costly)})
    ordered = ["plain", *sorted(c for c in columns if c.startswith("keep")),
               *sorted(c for c in columns if c.startswith("transform")),
               *[c for c in columns if c.startswith("trained")]]
    return {"columns": ordered, "rows": rows}


def _costly(trained: list[str], families: dict[str, tuple[str, str]], fp: Any, task: str) -> set[str]:
    """The `trained:` columns whose model lost more than MAX_FP_COST of fp perplexity against the control (its
    family's `none` member): a quantization gain bought with quality is no fix."""
    control = next((fp((m, task)) for m in trained if families[m][1] == "none"), None)
    if control is None:
        return set()
    return {f"trained: {families[m][1]}" for m in trained
            if fp((m, task)) is not None and fp((m, task)) > control * (1 + MAX_FP_COST)}


def fixes_markdown(table: dict[str, Any], table_of: Any) -> list[str]:
    parts = ["", "## Fixes compared: keeping BOS, a post-hoc transform, a training-time mitigation", ""]
    if not table["rows"]:
        return parts + ["No model has been run with a fix yet: `--keep-positions 0`, `--transform rotate` or "
                        "`--transform smoothquant`, or a `tune:` model trained from it with a mitigation."]
    parts += ["Relative perplexity change under each scheme (lower is better). `trained:` columns are the model "
              "trained further with that mitigation, each against its own full-precision perplexity; `trained: none` "
              "is the same training without one (the control). * the trained model's fp perplexity is more than "
              f"{MAX_FP_COST:.0%} worse than the control's, so it is no candidate for the best fix.", ""]
    columns = table["columns"]
    parts.append(table_of(["model", "task", "scheme", *columns, "best fix"],
                          [[r["model"], r["task"], r["scheme"],
                            *[percent(r["cells"][c]) + ("*" if c in r["costly"] else "") if c in r["cells"] else ""
                              for c in columns], r["best"]]
                           for r in table["rows"]]))
    return parts
