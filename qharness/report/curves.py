"""Training curves: every measure of the models evaluated at several steps of one training run (the `tune400:`
names, `...@step100`), against the step, for `qharness compare`.

A point is a model name that says its step (`@step<N>`); the points of one run share the name without the step, and
the model the run started from (the pretrained model, when it has rows) is its step 0. The measures: max |h| and
max/median from the scan rows, fp perplexity of the curve task (kjv-heldout when present), its change against the
control (the run with mitigation none at the same step), and each scheme's perplexity change against the model's
own fp perplexity. One plot per measure with every run on it, and a table of the last step with the first beside it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from qharness.data.results import SCAN_TASK, Row, is_baseline
from qharness.models.sources.tune import step_of
from qharness.report.degradation import Degradation, number, percent, percent_interval

SCAN_CURVES = {"massive_max": "max abs", "massive_ratio": "max/median"}  # no "|": a markdown cell
FP = "fp ppl"
FP_VS_CONTROL = "fp vs control"


@dataclass
class Curve:
    run: str  # the run's name without the step
    mitigation: str
    base: str = ""  # the model it was trained from, its step 0 when that has rows
    points: dict[str, dict[int, float]] = field(default_factory=dict)  # measure -> step -> value
    intervals: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)  # scheme -> step -> its 95% CI


def _base_of(run: str) -> str:
    from qharness.models.sources import related

    return next(iter(related(run)[0]), "")


def _curve_task(rows: list[Row], models: set[str]) -> str | None:
    tasks = sorted({r["task"] for r in rows if r["model"] in models and r["metric"] == "ppl"},
                   key=lambda t: (t != "kjv-heldout", t))
    return tasks[0] if tasks else None


def build_curves(rows: list[Row], items: list[Degradation]) -> tuple[list[Curve], str | None]:
    """One Curve per run that has rows at two or more steps (or one step and its base); and the task they use."""
    stepped = {r["model"]: step_of(r["model"]) for r in rows if step_of(r["model"])}
    curves: dict[str, Curve] = {}
    for model, (run, _) in stepped.items():
        if run not in curves:
            mitigation = next((r.get("mitigation", "") for r in rows if r["model"] == model and r.get("mitigation")),
                              "")
            curves[run] = Curve(run, mitigation or "none", _base_of(run))
    at: dict[str, list[tuple[Curve, int]]] = defaultdict(list)  # model -> the (curve, step) points it gives
    for model, (run, step) in stepped.items():
        at[model].append((curves[run], step))
    for curve in curves.values():
        if curve.base:
            at[curve.base].append((curve, 0))
    task = _curve_task(rows, set(at))
    for row in rows:
        for curve, step in at.get(row["model"], ()):
            if row.get("task") == SCAN_TASK and row["metric"] in SCAN_CURVES and row["bos"] == "True" and row["value"]:
                curve.points.setdefault(SCAN_CURVES[row["metric"]], {})[step] = float(row["value"])
            elif row["task"] == task and row["metric"] == "ppl" and is_baseline(row) and not row.get("keep"):
                curve.points.setdefault(FP, {})[step] = float(row["value"])
    for d in items:
        if d.task == task and d.metric == "ppl" and d.plain:
            for curve, step in at.get(d.model, ()):
                curve.points.setdefault(d.quant, {})[step] = d.rel
                if d.ci is not None:
                    curve.intervals.setdefault(d.quant, {})[step] = d.ci
    _against_control(list(curves.values()))
    kept = [c for c in curves.values() if len({s for values in c.points.values() for s in values}) >= 2]
    return sorted(kept, key=lambda c: (c.mitigation != "none", c.run)), task


def _against_control(curves: list[Curve]) -> None:
    """fp perplexity against the control's at the same step (the control: mitigation none, same base, recipe and
    training seed: the run's family)."""
    controls = {_family(c.run): c for c in curves if c.mitigation == "none"}
    for curve in curves:
        control = controls.get(_family(curve.run))
        if control is None or FP not in curve.points or FP not in control.points:
            continue
        mine, theirs = curve.points[FP], control.points[FP]
        curve.points[FP_VS_CONTROL] = {s: mine[s] / theirs[s] - 1 for s in mine if s in theirs and s > 0}


def _family(run: str) -> str:
    from qharness.core.errors import QHarnessError
    from qharness.models.sources.tune import family

    try:
        return family(run)
    except QHarnessError:  # a run whose name no longer parses here: its controls are those of its prefix and base
        return run.partition(":")[0] + ":" + _base_of(run)


BROKEN_FP_COST = 10.0  # fp perplexity more than 11x the control's (+1,000%): a model that no longer models the text


def broken(curve: Curve) -> bool:
    """A run whose fp perplexity exceeds the control's by more than +1,000% at every step it was set against it (a
    retrofit that never recovered): its scheme changes are a broken model's, not a quantizer's."""
    against = curve.points.get(FP_VS_CONTROL, {})
    return bool(against) and all(v > BROKEN_FP_COST for v in against.values())


def split_broken(curves: list[Curve]) -> tuple[list[Curve], list[str]]:
    """The runs a plot of changes draws, and the broken runs it names instead; if every run is broken, all are
    drawn (a plot of something rather than of nothing)."""
    flags = [broken(c) for c in curves]
    if all(flags):
        return list(curves), []
    marked = list(zip(curves, flags, strict=True))
    return [c for c, bad in marked if not bad], [c.run for c, bad in marked if bad]


def measures_of(curves: list[Curve]) -> list[str]:
    order = [*SCAN_CURVES.values(), FP, FP_VS_CONTROL]
    found = {m for c in curves for m in c.points}
    return [m for m in order if m in found] + sorted(found - set(order))


def _cell(measure: str, value: float | None) -> str:
    if value is None:
        return ""
    return number(value) if measure in (*SCAN_CURVES.values(), FP) else percent(value)


def curves_markdown(curves: list[Curve], task: str | None, table: Any) -> list[str]:
    """The report's section: a heading, then `curves_table`."""
    if not curves:
        return []
    return ["", "## Training curves", "",
            *curves_table(curves, task, table, " One plot per measure below (step 0: the model the run started from).")]


def curves_table(curves: list[Curve], task: str | None, table: Any, more: str = "") -> list[str]:
    """The table: per run and measure, the value at the last step with the first evaluated step beside it (also
    what a published findings table shows, report/publish.py)."""
    measures = measures_of(curves)
    rows = []
    for curve in curves:
        cells = []
        for measure in measures:
            values = {s: v for s, v in curve.points.get(measure, {}).items() if s > 0}
            first, last = (min(values), max(values)) if values else (None, None)
            ci = curve.intervals.get(measure, {}).get(last) if last is not None else None
            at_last = percent_interval(values[last], ci) if ci is not None else _cell(measure, values.get(last))
            cells.append(f"{at_last} ({_cell(measure, values[first])} at {first})"
                         if values and first != last else at_last if values else "")
        steps = sorted({s for v in curve.points.values() for s in v if s > 0})
        rows.append([curve.run, ", ".join(map(str, steps)), *cells])
    return [f"Each run's last evaluated step, with its first in brackets; schemes: perplexity change against the "
            f"model's own fp perplexity on {task}, with its 95% interval where the row kept its per-token NLLs; fp vs "
            "control: against the run without a mitigation (same base, recipe and training seed) at the same step."
            + more, "", table(["run", "steps", *measures], rows)]


