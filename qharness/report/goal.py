"""Issue #20's goal, judged from a leaderboard: does a mitigation's scheme (per-tensor static INT8) cost at most
`scheme_bar` over the model's own fp perplexity, at an fp cost of at most `fp_bar` against the control, both as the
upper end of a 95% interval on the same tokens?

The scheme's change is the row's own paired interval (its `ci_high`); the fp cost is a paired block bootstrap of the
mitigation's fp per-token NLLs against the control's (report/noise.py's `rows_change`, the control standing in for
the fp model). Nothing is recomputed: the rows and their units files are read.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from qharness.core.errors import DataError
from qharness.data.results import Row, is_baseline, key, read_rows
from qharness.models.sources.tune import step_of
from qharness.report.degradation import number, percent_interval
from qharness.report.noise import Noise
from qharness.report.seeds import t975
from qharness.stats.bootstrap import Interval


@dataclass(frozen=True)
class Goal:
    control: str  # the model every fp cost is measured against
    scheme: str = "int8-w8a8-tensor-static"
    task: str = "kjv-heldout"
    transform: str = ""  # the scheme's rows after this post-hoc transform (e.g. rotate); fp rows never have one
    scheme_bar: float = 0.05  # the scheme's change over the model's own fp, upper end of the interval
    fp_bar: float = 0.03  # the fp change against the control, upper end of the interval


@dataclass(frozen=True)
class Verdict:
    model: str
    fp_ppl: float
    fp_cost: float | None  # None for the control
    fp_interval: Interval | None  # None for the control, or where the two models' units do not pair
    scheme_change: float
    scheme_interval: tuple[float, float]
    met: bool | None  # None for the control, and where the fp cost has no interval (unknown, not "no")
    is_control: bool = False
    recipe: str = ""  # train_recipe: the training recipe's digest without its seed ("" for a model not trained here)
    seed: str = ""  # train_seed
    step: int = 0  # a snapshot's training step (`@step100`); 0 for a finished run

    def cells(self) -> list[str]:
        lo, hi = self.scheme_interval
        if self.is_control:
            cost = met = "-"
        elif self.fp_cost is None:
            cost, met = f"? (no control of seed {self.seed})", "?"
        else:
            cost = percent_interval(self.fp_cost, None if self.fp_interval is None else
                                    (self.fp_interval.low, self.fp_interval.high))
            met = {True: "yes", False: "no", None: "? (no paired units)"}[self.met]
        return [f"`{self.model}`" + (" (control)" if self.is_control else ""), number(self.fp_ppl), cost,
                percent_interval(self.scheme_change, (lo, hi)), met]


def _row(rows: list[Row], model: str, quant: str, task: str, path: Path, transform: str = "") -> Row | None:
    found = [r for r in rows if (r["model"], r["quant"], r["task"], r["metric"]) == (model, quant, task, "ppl")
             and not r.get("keep") and not r.get("kv") and (r.get("transform") or "") == transform]
    if len(found) > 1:
        raise DataError(f"{path}: {len(found)} rows of {model} {quant} on {task} (evaluated with different settings: "
                        "limit, context, dtype, bos); the goal table takes one, so keep one in the leaderboard")
    return found[0] if found else None


def unjudged(rows: list[Row], path: Path, goal: Goal, judged: list[Verdict]) -> list[str]:
    """Models of the leaderboard (`rows`, read from `path` by the caller) with an fp row on the goal's task but no
    verdict (the scheme's row with its interval is missing: not computed, or refused, as a rotation refuses DyT), so a
    table can name them rather than drop them."""
    have = {v.model for v in judged}
    candidates = sorted({r["model"] for r in rows if is_baseline(r)} - have)
    return [m for m in candidates if _row(rows, m, "none", goal.task, path) is not None]  # the fp row verdicts take


def verdicts(path: Path, goal: Goal) -> list[Verdict]:
    """One verdict per model of the leaderboard that has both its fp row and the scheme's row (with intervals), the
    control first."""
    rows = read_rows(path)
    named, controls = _controls(rows, goal, path)
    control_recipe = named.get("train_recipe", "")
    noise = Noise(path)
    models = sorted({r["model"] for r in rows if is_baseline(r)}, key=lambda m: (m != goal.control, m))
    out = []
    for model in models:
        fp = _row(rows, model, "none", goal.task, path)
        scheme = _row(rows, model, goal.scheme, goal.task, path, goal.transform)
        if fp is None or scheme is None or not scheme.get("ci_high"):
            continue
        change, lo, hi = (float(scheme[c]) for c in ("rel_delta", "ci_low", "ci_high"))
        recipe, seed = fp.get("train_recipe", ""), fp.get("train_seed", "")
        common = {"recipe": recipe, "seed": seed, "step": _step(model)}
        if model == goal.control or (recipe and recipe == control_recipe):
            out.append(Verdict(model, float(fp["value"]), None, None, change, (lo, hi), None, is_control=True,
                               **common))
            continue
        # a model trained here is set against the control trained with its seed (to the same step); one not trained
        # here (the pretrained model, rows older than train_recipe), or any model against an untrained control,
        # against the named control
        control_fp = controls.get((seed, common["step"])) if control_recipe and recipe else named
        if control_fp is None:  # trained with a seed the control was not: no fair fp cost, and no verdict
            out.append(Verdict(model, float(fp["value"]), None, None, change, (lo, hi), None, **common))
            continue
        interval = noise.rows_change(key(fp), key(control_fp))
        cost = float(fp["value"]) / float(control_fp["value"]) - 1
        met = None if interval is None else hi <= goal.scheme_bar and interval.high <= goal.fp_bar
        out.append(Verdict(model, float(fp["value"]), cost, interval, change, (lo, hi), met, **common))
    return out


def _step(model: str) -> int:
    """The training step a snapshot's name carries (`...@step100`); 0 for a finished run, which is its own."""
    stepped = step_of(model)
    return stepped[1] if stepped else 0


def _controls(rows: list[Row], goal: Goal, path: Path) -> tuple[Row, dict[tuple[str, int], Row]]:
    """The named control's fp row, and the control's fp row for each (training seed, step) it was trained and
    evaluated at: every model of the named control's training recipe. Two of one seed and step are refused."""
    named = _row(rows, goal.control, "none", goal.task, path)
    if named is None:
        raise DataError(f"{path}: no fp row of the control {goal.control} on {goal.task}")
    recipe = named.get("train_recipe", "")
    found: dict[tuple[str, int], Row] = {}
    for model in sorted({r["model"] for r in rows if recipe and r.get("train_recipe") == recipe} | {goal.control}):
        fp = _row(rows, model, "none", goal.task, path)
        if fp is None:
            continue
        at = (fp.get("train_seed", ""), _step(model))
        if at in found:
            raise DataError(f"{path}: {found[at]['model']} and {model} are both the control's seed {at[0]!r} at step "
                            f"{at[1] or 'final'}; keep one of them in the leaderboard")
        found[at] = fp
    return named, found


@dataclass(frozen=True)
class SeedVerdict:
    """A recipe's verdict over its training seeds (at one step): the mean of the per-seed changes with a 95% interval
    that holds both sources of noise (`_over_seeds_interval`)."""

    recipe: str  # a model name of the recipe with its seed left out
    seeds: tuple[str, ...]
    fp_cost: tuple[float, float, float] | None  # (mean, low, high); None for the control
    scheme_change: tuple[float, float, float]
    met: bool | None  # None for the control

    def cells(self) -> list[str]:
        cost = "-" if self.fp_cost is None else percent_interval(self.fp_cost[0], self.fp_cost[1:])
        met = "-" if self.met is None else ("yes" if self.met else "no")
        return [f"`{self.recipe}`" + (" (control)" if self.fp_cost is None else ""), ", ".join(self.seeds), cost,
                percent_interval(self.scheme_change[0], self.scheme_change[1:]), met]


def over_seeds(found: list[Verdict], goal: Goal) -> tuple[list[SeedVerdict], list[str]]:
    """Each recipe (at each step) with two or more seeds, every one of them with its fp cost (the control: with its
    scheme change); and a line for each recipe left out because a seed has no control, rather than averaging it over
    fewer seeds than it shows."""
    groups: dict[tuple[str, int], list[Verdict]] = {}
    for verdict in found:
        if verdict.recipe:
            groups.setdefault((verdict.recipe, verdict.step), []).append(verdict)
    out, left_out = [], []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda v: int(v.seed) if v.seed.isdigit() else -1)
        name = re.sub(r":seed=\d+(?=@step\d+$|$)", "", members[0].model)
        control = members[0].is_control
        uncontrolled = [v.seed for v in members if not control and v.fp_cost is None]
        unpaired = [v.seed for v in members if not control and v.fp_cost is not None and v.fp_interval is None]
        if uncontrolled or unpaired:
            why = [f"no control of seed {', '.join(uncontrolled)}"] if uncontrolled else []
            why += [f"no paired units for seed {', '.join(unpaired)}"] if unpaired else []
            left_out.append(f"`{name}` ({'; '.join(why)})")
            continue
        change = _over_seeds_interval([v.scheme_change for v in members], [v.scheme_interval for v in members])
        cost = None if control else _over_seeds_interval(
            [v.fp_cost or 0.0 for v in members],
            [(v.fp_interval.low, v.fp_interval.high) for v in members if v.fp_interval is not None])
        met = None if cost is None else change[2] <= goal.scheme_bar and cost[2] <= goal.fp_bar
        out.append(SeedVerdict(name, tuple(v.seed for v in members), cost, change, met))
    return out, left_out


def _over_seeds_interval(values: list[float], intervals: list[tuple[float, float]]) -> tuple[float, float, float]:
    """The mean over seeds with a 95% interval of two parts in quadrature: the seeds' spread (Student's t with n - 1
    degrees of freedom on the standard error of the mean) and the evaluation text's, the mean of the seeds' own
    bootstrap half-widths. The second does not shrink with more seeds: every seed is scored on the same tokens, so
    which tokens were drawn is shared by all of them and never shows in their spread. Where the two overlap (each
    seed's own token noise is in both) the sum counts it twice: conservative, never narrower than either part."""
    mean = statistics.fmean(values)
    seeds = t975(len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    text = statistics.fmean((high - low) / 2 for low, high in intervals)
    half = (seeds**2 + text**2) ** 0.5
    return mean, mean - half, mean + half


def scheme_label(goal: Goal) -> str:
    return f"`{goal.scheme}`" + (f" after `{goal.transform}`" if goal.transform else "")


def header(goal: Goal) -> list[str]:
    return ["model", "fp ppl", "fp vs control [95%]", f"{scheme_label(goal)} vs own fp [95%]", "goal met"]


def seeds_header(goal: Goal) -> list[str]:
    return ["recipe", "seeds", "fp vs control, mean over seeds [95%]", f"{scheme_label(goal)} vs own fp, mean [95%]",
            "goal met over seeds"]


def goal_text(goal: Goal) -> str:
    return (f"Met: the upper end of the interval of the change under {scheme_label(goal)} over the model's own "
            f"fp perplexity is <= {100 * goal.scheme_bar:+.0f}%, and of its fp change against the control <= "
            f"{100 * goal.fp_bar:+.0f}%, on {goal.task}.")
