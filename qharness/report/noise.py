"""When is a difference between two results noise? Paired intervals between leaderboard rows, from their units.

Two rows measured on the same tokens (or items) differ by rel_a - rel_b, each rel against its own fp row (the same
one for two fixes of one model; the control's for a mitigation). `Noise.difference` draws the same blocks for all
of them (bootstrap.rel_difference_interval), so the text's own difficulty cancels and the interval is as tight as
the pairing allows. A difference whose interval covers 0 is "within noise": the report says so, and the best-fix
choice names such fixes as tied instead of picking a winner. Rows without units (leaderboards written before they
were kept) or on other tokens give no interval, and the report says nothing about their noise.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

from qharness.data.units import Units, fp_key, read_units
from qharness.report.degradation import Degradation, percent
from qharness.stats import bootstrap

SEED = 0  # the report's intervals are reproducible: one seed for every comparison


class Noise:
    """Reads the units of the rows being compared (each file once) and gives paired difference intervals."""

    def __init__(self, results: Path | None) -> None:
        self.results = results
        self._units: dict[tuple[str, ...], Units | None] = {}

    def units(self, row_key: tuple[str, ...]) -> Units | None:
        if self.results is None or not row_key:
            return None
        if row_key not in self._units:
            self._units[row_key] = read_units(self.results, row_key)
        return self._units[row_key]

    def pair(self, d: Degradation) -> tuple[Units, Units] | None:
        """(fp units, quantized units) of a row, when both were kept on the same tokens."""
        q, fp = self.units(d.row_key), self.units(fp_key(d.row_key))
        return (fp, q) if q is not None and q.pairs_with(fp) else None

    def fp_change(self, member: Degradation, control: Degradation) -> bootstrap.Interval | None:
        """The interval of ppl_member / ppl_control - 1 in full precision (a mitigation's quality cost), from the
        fp rows of two quantized rows that each kept units paired with their fp row."""
        if self.pair(member) is None or self.pair(control) is None:
            return None
        return self.rows_change(fp_key(member.row_key), fp_key(control.row_key))

    def rows_change(self, member: tuple[str, ...], control: tuple[str, ...]) -> bootstrap.Interval | None:
        """The interval of the perplexity of row `member` over that of row `control` - 1, by their keys; None unless
        both kept per-token NLLs on the same tokens."""
        a, b = self.units(member), self.units(control)
        if a is None or b is None or not a.pairs_with(b) or a.kind != "nll":
            return None
        return bootstrap.rel_change_interval(b.values, a.values, seed=SEED)

    def difference(self, a: Degradation, b: Degradation) -> bootstrap.Interval | None:
        """The paired interval of a.rel - b.rel, or None when the two are not on the same units."""
        pa, pb = self.pair(a), self.pair(b)
        if pa is None or pb is None or not pa[0].pairs_with(pb[0]):
            return None
        if pa[0].kind == "nll":
            return bootstrap.rel_difference_interval(pa[0].values, pa[1].values, pb[0].values, pb[1].values,
                                                     seed=SEED)
        return bootstrap.ratio_difference_interval(pa[0].values, pa[1].values, pb[0].values, pb[1].values,
                                                   seed=SEED)

    def recovered(self, plain: Degradation, fixed: Degradation) -> bootstrap.Interval | None:
        """The interval of the share of `plain`'s loss that `fixed` takes back, both against one fp row on the same
        tokens (perplexity only); None without units, on other tokens, or when a resample shows no loss."""
        if fp_key(plain.row_key) != fp_key(fixed.row_key):
            return None  # two fp rows (a mitigation against its control): the share is defined against one
        pa, pb = self.pair(plain), self.pair(fixed)
        if pa is None or pb is None or pa[0].kind != "nll" or not pa[1].pairs_with(pb[1]):
            return None
        return bootstrap.recovered_interval(pa[0].values, pa[1].values, pb[1].values, seed=SEED)

    def tied(self, a: Degradation, b: Degradation) -> bool:
        """The two differ by less than the noise (False when that cannot be told)."""
        interval = self.difference(a, b)
        return interval is not None and interval.covers(0.0)


def within_noise(interval: bootstrap.Interval | None) -> bool | None:
    return None if interval is None else interval.covers(0.0)


def points(interval: bootstrap.Interval) -> str:
    """An interval of a difference of relative changes, in points of percent: '[-0.2, +0.5] pts'."""
    return f"[{interval.low * 100:+.1f}, {interval.high * 100:+.1f}] pts"


def verdict(interval: bootstrap.Interval | None, a: str, b: str) -> str:
    if interval is None:
        return ""
    if interval.covers(0.0):
        return "within noise"
    return f"{a} lower" if interval.high < 0 else f"{b} lower"


def _settings(d: Degradation) -> dict[str, str]:
    return {"keep": d.keep, "transform": d.transform, "kv": d.kv}


def paired_differences(items: list[Degradation], noise: Noise) -> list[dict[str, Any]]:
    """Every two rows of one model, scheme, task and evaluation setting that differ in exactly one of keep,
    transform and KV cache (keep BOS against plain, rotated against plain with the same Linears kept, a KV
    setting against another), with the paired interval of their difference."""
    groups: dict[tuple[Any, ...], list[Degradation]] = {}
    for d in items:
        groups.setdefault((d.model, d.quant, d.task, d.metric, d.setting), []).append(d)
    out = []
    for (model, quant, task, metric, _), members in sorted(groups.items(), key=lambda kv: kv[0][:4]):
        for a, b in combinations(sorted(members, key=lambda d: (d.kv, d.transform, d.keep)), 2):
            changed = [name for name, value in _settings(a).items() if _settings(b)[name] != value]
            if len(changed) != 1:
                continue
            interval = noise.difference(b, a)
            if interval is None:
                continue
            out.append({"model": model, "scheme": quant, "task": task, "metric": metric, "changed": changed[0],
                        "a": a.label, "b": b.label, "rel_a": a.rel, "rel_b": b.rel, "evaluated": a.evaluated,
                        "difference": b.rel - a.rel, "low": interval.low, "high": interval.high,
                        "verdict": verdict(interval, b.label, a.label)})
    return out


def paired_markdown(pairs: list[dict[str, Any]], table_of: Any) -> list[str]:
    parts = ["", "## Paired differences: one setting changed, same model, scheme and text", ""]
    if not pairs:
        return parts + ["No two rows that differ in one setting have per-unit results on the same tokens "
                        "(leaderboards written before they were kept have none; rerun with `--force`)."]
    parts += ["Each pair was measured on the same tokens (items); the difference B - A of their relative changes "
              "has a paired block-bootstrap 95% interval (blocks of 128 tokens, 2,000 resamples, seed 0). "
              "\"within noise\": the interval covers 0.", ""]
    parts.append(table_of(["model", "scheme", "task", "evaluated", "changed", "A", "B", "rel A", "rel B", "B - A",
                           "95% interval", "verdict"],
                          [[p["model"], p["scheme"], p["task"], p["evaluated"], p["changed"], p["a"], p["b"],
                            percent(p["rel_a"]), percent(p["rel_b"]), f"{p['difference'] * 100:+.2f} pts",
                            f"[{p['low'] * 100:+.2f}, {p['high'] * 100:+.2f}]", p["verdict"]] for p in pairs]))
    return parts


def ranked_schemes(items: list[Degradation], noise: Noise) -> list[dict[str, Any]]:
    """Per model, task, metric and evaluation setting, the plain schemes ordered by their loss, each against the
    next milder one with the paired interval of the difference: which steps of the ranking are real and which
    are ties (per-token INT8 against LLM.int8(), say)."""
    groups: dict[tuple[Any, ...], list[Degradation]] = {}
    for d in items:
        if d.plain:
            groups.setdefault((d.model, d.task, d.metric, d.setting), []).append(d)
    out = []
    for (model, task, metric, _), members in sorted(groups.items(), key=lambda kv: kv[0][:3]):
        ranked = sorted(members, key=lambda d: d.loss)
        for milder, worse in zip(ranked, ranked[1:], strict=False):
            interval = noise.difference(worse, milder)
            if interval is None:
                continue
            out.append({"model": model, "task": task, "metric": metric, "evaluated": worse.evaluated,
                        "milder": milder.quant, "worse": worse.quant, "rel_milder": milder.rel, "rel_worse": worse.rel,
                        "difference": worse.rel - milder.rel, "low": interval.low, "high": interval.high,
                        "verdict": "within noise" if interval.covers(0.0) else "real"})
    return out


def ranked_markdown(ranked: list[dict[str, Any]], table_of: Any) -> list[str]:
    parts = ["", "## Schemes ranked: is each one really worse than the next milder one?", "",
             "The plain schemes of one model, task and evaluation setting, from the mildest, each against the one "
             "before it on the same tokens: the difference of their relative changes with its paired 95% interval "
             "(points of percent). \"within noise\": the two are not told apart on this text.", ""]
    parts.append(table_of(["model", "task", "evaluated", "metric", "milder", "worse", "rel milder", "rel worse",
                           "worse - milder", "95% interval", "verdict"],
                          [[r["model"], r["task"], r["evaluated"], r["metric"], r["milder"], r["worse"],
                            percent(r["rel_milder"]), percent(r["rel_worse"]), f"{r['difference'] * 100:+.2f} pts",
                            f"[{r['low'] * 100:+.2f}, {r['high'] * 100:+.2f}]", r["verdict"]] for r in ranked]))
    return parts
