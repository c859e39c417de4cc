"""What predicts the quantization loss? Across every (model, scheme, task) perplexity result in the leaderboard, the
rank correlation of the relative perplexity change with each candidate measure, with n and a bootstrap interval.

Recent work (Beyond Outliers, arXiv 2509.23500) finds max/median and kurtosis weak predictors, so the comparator
tests them on our rows instead of assuming them. Candidates:
- `massive_ratio`: the largest per-layer max/median |h| (scan rows);
- `max_kurtosis`: the largest per-layer kurtosis of the hidden states (the scan's profile.json);
- `error_growth`: how the quantization error propagates: the geometric-mean factor by which the relative error of a
  decoder layer's output grows from one layer to the next, first to last (`run --layer-errors`). > 1: errors
  compound through the depth; < 1: later layers wash them out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qharness.report.degradation import Degradation
from qharness.stats.rankstats import bootstrap_interval, spearman

CANDIDATES = ("massive_ratio", "max_kurtosis", "error_growth")
MIN_POINTS = 8  # below this a rank correlation's bootstrap interval spans most of [-1, 1]: not worth a verdict


def profile_extras(scan_folder: Path) -> dict[str, dict[str, float]]:
    """model -> {max_kurtosis, attention_on_first} from the profiles a sweep's scans wrote next to the leaderboard
    (BOS-on scans only; attention_on_first is the mean over the layers that measured it)."""
    from qharness.activations.profile import Profile

    out: dict[str, dict[str, float]] = {}
    for path in sorted(scan_folder.glob("*/profile.json")) if scan_folder.is_dir() else []:
        profile = Profile.read(path)
        if not profile.model or not profile.config.get("bos", True) or not profile.layers:
            continue
        extras = {"max_kurtosis": max(layer.kurtosis for layer in profile.layers)}
        attention = [layer.attention_on_first for layer in profile.layers if layer.attention_on_first is not None]
        if attention:
            extras["attention_on_first"] = sum(attention) / len(attention)
        out[profile.model] = extras
    return out


def error_growth(layers: list[dict[str, Any]]) -> float | None:
    """(e_last / e_first) ** (1 / (L - 1)) over the layers' relative output errors; None when undefined."""
    errors = [layer["rel_error"] for layer in sorted(layers, key=lambda layer: layer["layer"])]
    if len(errors) < 2 or errors[0] <= 0 or errors[-1] <= 0:
        return None
    return math.exp(math.log(errors[-1] / errors[0]) / (len(errors) - 1))


def predictor_points(items: list[Degradation], measures: dict[str, dict[str, float]],
                     layer_entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per plain (model, scheme, task) perplexity result: its relative change and every candidate known."""
    growth = {(e["model"], e["quant"]): error_growth(e["layers"]) for e in layer_entries if not e.get("keep")}
    points = []
    for d in items:
        if d.metric != "ppl" or not d.plain or d.rel != d.rel:
            continue
        known = {**measures.get(d.model, {}), "error_growth": growth.get((d.model, d.quant))}
        points.append({"model": d.model, "quant": d.quant, "task": d.task, "rel": d.rel,
                       **{c: known.get(c) for c in CANDIDATES}})
    return points


def predictors(points: list[dict[str, Any]], resamples: int = 2000) -> list[dict[str, Any]]:
    """Per candidate: n, Spearman's rho with the perplexity change, its 95% bootstrap interval and a verdict."""
    out = []
    for candidate in CANDIDATES:
        usable = [p for p in points if p[candidate] is not None]
        n = len(usable)
        rho = low = high = None
        if n >= 3:
            xs, ys = [p[candidate] for p in usable], [p["rel"] for p in usable]
            if len(set(xs)) > 1 and len(set(ys)) > 1:  # a constant (one model's ratio) has no ranks: rho is nan
                rho = spearman(xs, ys)
                low, high = bootstrap_interval(xs, ys, resamples)
        models = len({p["model"] for p in usable})
        out.append({"measure": candidate, "n": n, "models": models, "spearman": rho, "low": low, "high": high,
                    "verdict": verdict(n, rho, low, high, models)})
    return out


def verdict(n: int, rho: float | None, low: float | None, high: float | None, models: int = 0) -> str:
    if n < MIN_POINTS:
        return f"too few points to conclude (n = {n}, needs {MIN_POINTS})"
    if rho is None or rho != rho:
        return (f"the measure or the loss does not vary over these {n} points"
                + (" (one model: a per-model measure is one value)" if models == 1 else ""))
    if low is not None and low > 0:
        return "predicts it: higher measure, larger loss (interval above 0)"
    if high is not None and high < 0:
        return "anti-predicts it: higher measure, smaller loss (interval below 0)"
    return "no clear relation (the interval spans 0)"


def rho_interval(low: float | None, high: float | None) -> str:
    """'[+0.42, +0.65]'; empty without an interval (too few points, or no resample gave a defined rho)."""
    return "" if low is None or high is None or low != low else f"[{low:+.2f}, {high:+.2f}]"


def predictors_markdown(rows: list[dict[str, Any]], table_of: Any) -> list[str]:
    parts = ["", "## What predicts the loss: rank correlation over every (model, scheme, task)", "",
             "Spearman's rho between each measure and the relative perplexity change, pooled over every plain "
             "scheme and model with both; 95% percentile bootstrap interval over the points (seed 0). "
             "error_growth = per-layer growth factor of the quantization error (`run --layer-errors`).", ""]
    parts.append(table_of(["measure", "points", "models", "Spearman rho", "95% interval", "verdict"],
                          [[r["measure"], str(r["n"]), str(r["models"]),
                            "" if r["spearman"] is None else f"{r['spearman']:+.2f}",
                            rho_interval(r["low"], r["high"]), r["verdict"]]
                           for r in rows]))
    return parts
