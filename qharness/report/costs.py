"""Quality against cost: for each model, every (scheme, backend) that has both a quality row (its perplexity change
on a task) and `qharness bench` rows (its speed and weight bytes against the fp model), and the Pareto front of
them. Costs measured under sim are a simulation's, not a kernel's: they are listed apart and never on the front."""

from __future__ import annotations

from dataclasses import dataclass

from qharness.data.results import BASELINE, Row, is_cost
from qharness.report.degradation import Degradation

COST_METRIC = "decode_b1_tok_s"  # what a user waits for in generation; weight bytes are beside it


@dataclass(frozen=True)
class CostPoint:
    model: str
    quant: str
    backend: str
    task: str
    quality: float  # relative perplexity change (positive: worse)
    speedup: float  # COST_METRIC against the fp model (above 1: faster)
    weight_ratio: float  # weight bytes against the fp model
    mode: str  # bench:eager or bench:compile
    simulated: bool
    pareto: bool = False


def cost_points(rows: list[Row], items: list[Degradation]) -> list[CostPoint]:
    costs: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for row in rows:
        if is_cost(row) and row["quant"] != BASELINE and row.get("fp_value"):
            ratio = float(row["value"]) / float(row["fp_value"])
            costs.setdefault((row["model"], row["quant"], row["backend"], row["task"]), {})[row["metric"]] = ratio
    points = []
    for d in items:
        if not d.plain or d.metric != "ppl":
            continue
        for (model, quant, backend, mode), metrics in costs.items():
            if (model, quant, backend) == (d.model, d.quant, d.backend) and COST_METRIC in metrics:
                points.append(CostPoint(model, quant, backend, d.task, d.rel, metrics[COST_METRIC],
                                        metrics.get("weight_bytes", float("nan")), mode, backend == "sim"))
    return mark_pareto(points)


def mark_pareto(points: list[CostPoint]) -> list[CostPoint]:
    """A kernel point is on the front when no other kernel point of its model, task and mode is at least as fast
    and at least as good, and better in one."""
    marked = []
    for p in points:
        peers = [q for q in points if (q.model, q.task, q.mode) == (p.model, p.task, p.mode) and not q.simulated]
        dominated = any(q.speedup >= p.speedup and q.quality <= p.quality and (q.speedup, q.quality) !=
                        (p.speedup, p.quality) for q in peers)
        marked.append(CostPoint(**{**p.__dict__, "pareto": not p.simulated and not dominated}))
    return marked


def cost_markdown(points: list[CostPoint], table) -> list[str]:
    parts = ["", "## Quality against cost", ""]
    if not points:
        return parts + ["Run `qharness bench` on a model that also has `qharness run` rows to set them side by side."]
    rows = [[p.model, p.quant, p.backend + (" (simulated cost)" if p.simulated else ""), p.task, f"{p.quality:+.2%}",
             f"{p.speedup:.2f}x", f"{p.weight_ratio:.2f}x", p.mode, "yes" if p.pareto else ""]
            for p in sorted(points, key=lambda p: (p.model, p.task, p.mode, -p.speedup))]
    return parts + [table(["model", "scheme", "backend", "task", "ppl change", f"{COST_METRIC} vs fp",
                           "weights vs fp", "mode", "Pareto"], rows)]


