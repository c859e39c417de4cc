"""Issue #20's goal, judged from a leaderboard: does a mitigation's scheme (per-tensor static INT8) cost at most
`scheme_bar` over the model's own fp perplexity, at an fp cost of at most `fp_bar` against the control, both as the
upper end of a 95% interval on the same tokens?

The scheme's change is the row's own paired interval (its `ci_high`); the fp cost is a paired block bootstrap of the
mitigation's fp per-token NLLs against the control's (report/noise.py's `rows_change`, the control standing in for
the fp model). Nothing is recomputed: the rows and their units files are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qharness.core.errors import DataError
from qharness.data.results import Row, is_baseline, key, read_rows
from qharness.report.noise import Noise
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

    def cells(self) -> list[str]:
        lo, hi = self.scheme_interval
        cost = "-" if self.is_control else _pct(self.fp_cost or 0.0, self.fp_interval)
        met = "-" if self.is_control else {True: "yes", False: "no", None: "? (no paired units)"}[self.met]
        return [f"`{self.model}`" + (" (control)" if self.is_control else ""), f"{self.fp_ppl:.2f}", cost,
                f"{100 * self.scheme_change:+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}]", met]


def _pct(value: float, interval: Interval | None) -> str:
    text = f"{100 * value:+.1f}%"
    return text + (f" [{100 * interval.low:+.1f}, {100 * interval.high:+.1f}]" if interval is not None else "")


def _row(rows: list[Row], model: str, quant: str, task: str, path: Path, transform: str = "") -> Row | None:
    found = [r for r in rows if (r["model"], r["quant"], r["task"], r["metric"]) == (model, quant, task, "ppl")
             and not r.get("keep") and not r.get("kv") and (r.get("transform") or "") == transform]
    if len(found) > 1:
        raise DataError(f"{path}: {len(found)} rows of {model} {quant} on {task} (evaluated with different settings: "
                        "limit, context, dtype, bos); the goal table takes one, so keep one in the leaderboard")
    return found[0] if found else None


def verdicts(path: Path, goal: Goal) -> list[Verdict]:
    """One verdict per model of the leaderboard that has both its fp row and the scheme's row (with intervals), the
    control first."""
    rows = read_rows(path)
    control_fp = _row(rows, goal.control, "none", goal.task, path)
    if control_fp is None:
        raise DataError(f"{path}: no fp row of the control {goal.control} on {goal.task}")
    noise = Noise(path)
    models = sorted({r["model"] for r in rows if is_baseline(r)}, key=lambda m: (m != goal.control, m))
    out = []
    for model in models:
        fp = _row(rows, model, "none", goal.task, path)
        scheme = _row(rows, model, goal.scheme, goal.task, path, goal.transform)
        if fp is None or scheme is None or not scheme.get("ci_high"):
            continue
        change, lo, hi = (float(scheme[c]) for c in ("rel_delta", "ci_low", "ci_high"))
        if model == goal.control:
            out.append(Verdict(model, float(fp["value"]), None, None, change, (lo, hi), None, is_control=True))
            continue
        interval = noise.rows_change(key(fp), key(control_fp))
        cost = float(fp["value"]) / float(control_fp["value"]) - 1
        met = None if interval is None else hi <= goal.scheme_bar and interval.high <= goal.fp_bar
        out.append(Verdict(model, float(fp["value"]), cost, interval, change, (lo, hi), met))
    return out


def _scheme_label(goal: Goal) -> str:
    return f"`{goal.scheme}`" + (f" after `{goal.transform}`" if goal.transform else "")


def header(goal: Goal) -> list[str]:
    return ["model", "fp ppl", "fp vs control [95%]", f"{_scheme_label(goal)} vs own fp [95%]", "goal met"]


def goal_text(goal: Goal) -> str:
    return (f"Met: the upper end of the interval of the change under {_scheme_label(goal)} over the model's own "
            f"fp perplexity is <= {100 * goal.scheme_bar:+.0f}%, and of its fp change against the control <= "
            f"{100 * goal.fp_bar:+.0f}%, on {goal.task}.")
