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

from qharness.report.degradation import Degradation, percent_interval
from qharness.report.families import REFERENCE
from qharness.report.noise import Noise

MAX_FP_COST = 0.10  # a trained fix whose fp perplexity is worse than the control's by more is not a candidate


def _fix(d: Degradation) -> str | None:
    """The column of a row that applies one load-time fix (keep or transform); None for the plain scheme or a row
    with a KV-cache setting (a different scheme, not a fix)."""
    if d.kv or d.plain:
        return None
    return ", ".join(part for part in (f"transform {d.transform}" if d.transform else "",
                                       f"keep {d.keep}" if d.keep else "") if part)


def fixes_table(items: list[Degradation], families: dict[str, tuple[str, str]],
                noise: Noise | None = None) -> dict[str, Any]:
    """Rows (model, task, evaluation setting, scheme) of perplexity tasks for every model run with a load-time fix
    or trained further with a mitigation; columns: plain, each load-time fix, each trained member of its family,
    and the best. With `noise` (the rows' per-unit results), a fix within noise of plain is marked, and fixes within
    noise of the best are named as tied with it instead of losing to it."""
    ppl = [d for d in items if d.metric == "ppl" and not d.kv]
    found = {(d.model, d.task, d.setting, d.quant, _fix(d) or "plain"): d for d in ppl if d.plain or _fix(d)}
    fixed = {d.model for d in ppl if _fix(d)}
    fp = {(d.model, d.task, d.setting): d.fp_value for d in ppl}
    references = {model for model, (_, mitigation) in families.items() if mitigation == REFERENCE}
    rows, columns = [], ["plain"]
    for model in sorted(fixed | references):
        family = families.get(model, ("", ""))[0]
        trained = sorted((m for m, (f, mitigation) in families.items()
                          if family and f == family and mitigation != REFERENCE and m != model),
                         key=lambda m: (families[m][1] != "none", families[m][1]))
        runs = {(d.task, d.setting, d.quant) for d in ppl if d.model == model and d.plain}
        for task, setting, scheme in sorted(runs):
            cells = {"plain": found[(model, task, setting, scheme, "plain")]}
            cells.update({f: d for (m, t, s, q, f), d in found.items()
                          if (m, t, s, q) == (model, task, setting, scheme) and f != "plain"})
            for member in trained:
                if (member, task, setting, scheme, "plain") in found:
                    cells[f"trained: {families[member][1]}"] = found[(member, task, setting, scheme, "plain")]
            if len(cells) < 2:
                continue
            columns += [c for c in cells if c not in columns]
            costly = _costly(trained, families, lambda m, t, s=setting: fp.get((m, t, s)), task)
            candidates = [c for c in cells if c != "plain" and c not in costly]
            best = min(candidates, key=lambda c: cells[c].rel) if candidates else ""
            tied = [] if noise is None or not best else sorted(
                c for c in candidates if c != best and noise.tied(cells[c], cells[best]))
            noisy = [] if noise is None else sorted(c for c in cells if c != "plain"
                                                    and noise.tied(cells[c], cells["plain"]))
            rows.append({"model": model, "task": task, "scheme": scheme, "evaluated": cells["plain"].evaluated,
                         "cells": {c: d.rel for c, d in cells.items()},
                         "intervals": {c: d.ci for c, d in cells.items() if d.ci is not None},
                         "best": best, "tied": tied, "within_noise_of_plain": noisy,
                         "costly": sorted(c for c in cells if c in costly)})
    ordered = ["plain", *sorted(c for c in columns if c.startswith("keep")),
               *sorted(c for c in columns if c.startswith("transform")),
               *[c for c in columns if c.startswith("trained")]]
    return {"columns": ordered, "rows": rows}


def _costly(trained: list[str], families: dict[str, tuple[str, str]], fp: Any, task: str) -> set[str]:
    """The `trained:` columns whose model lost more than MAX_FP_COST of fp perplexity against the control (its
    family's `none` member): a quantization gain bought with quality is no fix."""
    control = next((fp(m, task) for m in trained if families[m][1] == "none"), None)
    if control is None:
        return set()
    return {f"trained: {families[m][1]}" for m in trained
            if fp(m, task) is not None and fp(m, task) > control * (1 + MAX_FP_COST)}


def _best_text(row: dict[str, Any]) -> str:
    return f"tied: {', '.join([row['best'], *row['tied']])}" if row["tied"] else row["best"]


def _cell_text(row: dict[str, Any], column: str) -> str:
    if column not in row["cells"]:
        return ""
    text = percent_interval(row["cells"][column], row["intervals"].get(column))
    return text + ("*" if column in row["costly"] else "") + (" ≈" if column in row["within_noise_of_plain"] else "")


def fixes_markdown(table: dict[str, Any], table_of: Any) -> list[str]:
    parts = ["", "## Fixes compared: keeping BOS, a post-hoc transform, a training-time mitigation", ""]
    if not table["rows"]:
        return parts + ["No model has been run with a fix yet: `--keep-positions 0`, `--transform rotate` or "
                        "`--transform smoothquant`, or a `tune:` model trained from it with a mitigation."]
    parts += ["Relative perplexity change under each scheme (lower is better). `trained:` columns are the model "
              "trained further with that mitigation, each against its own full-precision perplexity; `trained: none` "
              "is the same training without one (the control). * the trained model's fp perplexity is more than "
              f"{MAX_FP_COST:.0%} worse than the control's, so it is no candidate for the best fix.", ""]
    sized = any(r["evaluated"] for r in table["rows"])
    if sized or any(r["intervals"] for r in table["rows"]):  # leaderboards with per-unit results
        parts[-2] += (" [lo, hi]: the row's 95% paired interval, in points of percent. ≈ within noise of plain: "
                      "the paired interval of the difference covers 0. Fixes within noise of the best are named "
                      "as tied with it. Rows are compared only within one evaluation setting (`evaluated`).")
    columns = table["columns"]
    header = ["model", "task", *(["evaluated"] if sized else []), "scheme", *columns, "best fix"]
    parts.append(table_of(header, [[r["model"], r["task"], *([r["evaluated"]] if sized else []), r["scheme"],
                                    *[_cell_text(r, c) for c in columns], _best_text(r)]
                                   for r in table["rows"]]))
    return parts
