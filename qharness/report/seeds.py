"""Seeds of one recipe: models trained here with the same recipe and different training seeds, grouped.

The rule: two rows are seeds of one recipe when their `train_recipe` (the digest of the training recipe without its
seed, from each model's training.json) agrees, their `train_seed` differs, and everything else that makes a row (the
scheme, what was kept, the KV cache, the transform, the task, the metric and the evaluation setting) is the same.
Each group gives the mean and the spread (sample standard deviation, and min to max) over seeds of the value (the
fp perplexity, a scan measure such as max |h|, a quantized perplexity) and of the relative change, which is the
uncertainty a single trained model cannot show.
"""

from __future__ import annotations

import statistics
from typing import Any

from qharness.data.results import Row
from qharness.report.degradation import percent

GROUP_COLUMNS = ("train_recipe", "mitigation", "quant", "backend", "keep", "kv", "transform", "task", "task_hash",
                 "metric", "bos", "context_length", "limit", "dtype")


def seed_groups(rows: list[Row]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, ...], dict[str, Row]] = {}
    for row in rows:
        # a scan row may have no value (first_massive_layer of a model without massive activations)
        if not row.get("train_recipe") or row.get("train_seed", "") == "" or row.get("value", "") == "":
            continue
        groups.setdefault(tuple(row.get(c, "") for c in GROUP_COLUMNS), {})[row["train_seed"]] = row
    out = []
    for group, by_seed in sorted(groups.items()):
        if len(by_seed) < 2:
            continue
        members = [by_seed[s] for s in sorted(by_seed, key=int)]
        values = [float(r["value"]) for r in members]
        rels = [float(r["rel_delta"]) for r in members if r.get("rel_delta") and r["quant"] != "none"]
        fields = dict(zip(GROUP_COLUMNS, group, strict=True))
        out.append({**{k: fields[k] for k in ("train_recipe", "mitigation", "quant", "keep", "kv", "transform",
                                               "task", "metric", "limit")},
                    "seeds": [int(s) for s in sorted(by_seed, key=int)], "models": [r["model"] for r in members],
                    "values": values,
                    "value_mean": statistics.fmean(values), "value_sd": statistics.stdev(values),
                    "value_min": min(values), "value_max": max(values),
                    "rel_mean": statistics.fmean(rels) if rels else None,
                    "rel_sd": statistics.stdev(rels) if len(rels) >= 2 else None,
                    "rel_min": min(rels, default=None), "rel_max": max(rels, default=None)})
    return out


def seeds_markdown(groups: list[dict[str, Any]], table_of: Any) -> list[str]:
    parts = ["", "## Training seeds: one recipe trained with several seeds", ""]
    if not groups:
        return parts + ["No recipe has results for more than one training seed yet (`qharness train --seed S` gives "
                        "each model its seed; rows record it as train_seed)."]
    parts += ["Rows of models trained with the same recipe (train_recipe) and different seeds, on the same scheme, "
              "task and evaluation setting: mean, sample standard deviation and range over seeds.", ""]
    parts.append(table_of(["recipe", "mitigation", "scheme", "task", "metric", "limit", "seeds", "value mean", "sd",
                           "range", "rel mean", "rel sd", "rel range"],
                          [[g["train_recipe"], g["mitigation"], _scheme(g), g["task"], g["metric"], g["limit"] or "all",
                            ", ".join(map(str, g["seeds"])), _figure(g["value_mean"], 4), _figure(g["value_sd"], 2),
                            f"{_figure(g['value_min'], 4)} to {_figure(g['value_max'], 4)}", percent(g["rel_mean"]),
                            "" if g["rel_sd"] is None else f"{g['rel_sd'] * 100:.2f} pts",
                            "" if g["rel_min"] is None else f"{percent(g['rel_min'])} to {percent(g['rel_max'])}"]
                           for g in groups]))
    return parts


def _figure(value: float, digits: int) -> str:
    """`digits` significant digits, but a number with more digits before the point in full (25,623, not 2.562e+04:
    a largest activation reads as a number, not in scientific notation)."""
    return f"{value:,.0f}" if abs(value) >= 10**digits else f"{value:.{digits}g}"


def _scheme(group: dict[str, Any]) -> str:
    extras = [f"{name} {group[name]}" for name in ("keep", "kv", "transform") if group[name]]
    return group["quant"] + (f" ({', '.join(extras)})" if extras else "")


# Student's t 0.975 quantiles by degrees of freedom (the stdlib has none, and scipy is not a dependency for one
# function); a fractional Welch dof is rounded down, which widens the interval: conservative.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def t975(dof: float) -> float:
    if dof < 1:
        return float("inf")
    return _T975[max(d for d in _T975 if d <= dof)] if dof < 1e9 else 1.960


def seed_contrasts(groups: list[dict[str, Any]]) -> list[list[str]]:
    """Per task, each recipe's mean fp perplexity over seeds against the first recipe's (in the groups' order), with
    Welch's 95% interval on the difference of the means: two recipes trained with a few seeds each, whose difference
    is an effect only where that interval leaves out 0."""
    rows = []
    fp = [g for g in groups if g["quant"] == "none" and g["metric"] == "ppl" and len(g["seeds"]) >= 2]
    for task in sorted({g["task"] for g in fp}):
        members = [g for g in fp if g["task"] == task]
        for other in members[1:]:
            first = members[0]
            a, b = first["values"], other["values"]
            diff = statistics.fmean(b) - statistics.fmean(a)
            va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
            dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb > 0 else float("inf")
            half = t975(dof) * (va + vb) ** 0.5
            rows.append([task, f"{other['mitigation']} ({other['train_recipe']})",
                         f"{first['mitigation']} ({first['train_recipe']})", f"{diff:+.2f}",
                         f"[{diff - half:+.2f}, {diff + half:+.2f}]",
                         "within noise" if diff - half <= 0 <= diff + half else ("higher" if diff > 0 else "lower")])
    return rows
