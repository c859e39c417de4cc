"""The report's figures, one function a figure, each writing a PNG and returning its path (None when the rows hold
nothing to draw). `compare` calls them; they are public so a notebook can draw one figure from its own rows."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from qharness.core.figures import pyplot
from qharness.report.costs import COST_METRIC, CostPoint
from qharness.report.curves import BROKEN_FP_COST, FP, SCAN_CURVES, Curve, measures_of, split_broken
from qharness.report.degradation import Degradation


def plot_layer_errors(entries: list[dict[str, Any]], path: Path) -> Path | None:
    if not entries:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for entry in entries:
        label = f"{entry['model']} {entry['quant']}" + (f" keep {entry['keep']}" if entry.get("keep") else "")
        ax.scatter([layer["fp_max"] for layer in entry["layers"]], [layer["rel_error"] for layer in entry["layers"]],
                   s=12, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("layer's max |activation| (fp)")
    ax.set_ylabel("layer output error, relative L2")
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_heatmap(items: list[Degradation], path: Path) -> Path | None:
    ppl = [d for d in items if d.metric == "ppl" and not (d.keep or d.transform)]  # a KV setting is a scheme here
    if not ppl:
        return None
    plt = pyplot()
    models = sorted({d.model for d in ppl})
    schemes = sorted({d.label for d in ppl})
    cell: dict[tuple[str, str], list[float]] = defaultdict(list)
    for d in ppl:
        cell[(d.model, d.label)].append(d.rel * 100)
    grid = [[sum(cell[(m, s)]) / len(cell[(m, s)]) if cell[(m, s)] else float("nan") for s in schemes]
            for m in models]
    fig, ax = plt.subplots(figsize=(2.0 + 0.6 * len(schemes), 1.2 + 0.5 * len(models)))
    image = ax.imshow([[min(v, 100.0) for v in row] for row in grid], cmap="Reds", vmin=0, aspect="auto")
    ax.set_xticks(range(len(schemes)), schemes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=8)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:.1f}" if abs(value) < 1000 else f"{value:.0e}", ha="center", va="center",
                        fontsize=6)
    fig.colorbar(image, label="ppl change, % (cap 100)")
    ax.set_title("perplexity change vs fp (mean over tasks)")
    fig.savefig(path, dpi=120, bbox_inches="tight")  # rotated scheme names need the room
    plt.close(fig)
    return path


def plot_training(families: dict[str, tuple[str, str]], path: Path) -> Path | None:
    """max |h| on the training loop's probe batch against the step, for every model of a family trained here:
    how fast each mitigation shrinks the activation (and whether it grows back)."""
    from qharness.models.sources import related

    logs = {model: log for model in sorted(families) if (log := related(model)[1]) is not None}
    if not logs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, log in logs.items():
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        ax.plot([e["step"] for e in entries], [e["max_abs"] for e in entries], "-o", markersize=3, label=model)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("max |h| (probe batch)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_against_activation(items: list[Degradation], measures: dict[str, dict[str, float]],
                            path: Path) -> Path | None:
    points = [(measures[d.model]["massive_max"], d.rel * 100, d.quant) for d in items
              if d.metric == "ppl" and d.plain and "massive_max" in measures.get(d.model, {})]
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for quant in sorted({p[2] for p in points}):
        xs = [p[0] for p in points if p[2] == quant]
        ys = [p[1] for p in points if p[2] == quant]
        ax.scatter(xs, ys, s=14, label=quant)
    ax.set_xscale("log")
    ax.set_yscale("symlog")
    ax.set_xlabel("max |activation| (scan)")
    ax.set_ylabel("perplexity change, %")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cost_quality(points: list[CostPoint], path: Path) -> Path | None:
    kernels = [p for p in points if not p.simulated]
    if not kernels:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (model, task, mode) in sorted({(p.model, p.task, p.mode) for p in kernels}):
        group = sorted((p for p in kernels if (p.model, p.task, p.mode) == (model, task, mode)),
                       key=lambda p: p.speedup)
        ax.scatter([p.speedup for p in group], [p.quality * 100 for p in group], label=f"{model} {task} {mode}")
        front = [p for p in group if p.pareto]
        ax.plot([p.speedup for p in front], [p.quality * 100 for p in front], linestyle="--", linewidth=1)
        for p in group:
            ax.annotate(p.quant, (p.speedup, p.quality * 100), fontsize=7)
    ax.set_xlabel(f"{COST_METRIC} against the fp model (x)")
    ax.set_ylabel("perplexity change (%)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


WIDE_CHANGE = 1000.0  # % : past this a change plot turns symlog, so a broken run cannot flatten the others to a line
WIDE_SPAN = 100.0  # max / min of a positive measure past which its plot turns log


def curve_scale(measure: str, values: list[float]) -> tuple[str, dict[str, float]]:
    """The y scale of one curve plot: the scan's measures always log; fp perplexity log once it spans 100x; a change
    in percent symlog (linear within +-100%) once any run passes +-1,000%, as a broken model's does."""
    if measure in SCAN_CURVES.values():
        return "log", {}
    if measure == FP:
        positive = [v for v in values if v > 0]
        wide = bool(positive) and max(positive) / min(positive) > WIDE_SPAN
        return ("log", {}) if wide else ("linear", {})
    if values and max(abs(v) for v in values) > WIDE_CHANGE:
        return "symlog", {"linthresh": 100.0}
    return "linear", {}


def plot_curves(curves: list[Curve], out_dir: Path) -> list[Path]:
    """One PNG per measure: the measure against the training step, one line per run. A broken run (curves.broken)
    is named under the plots of perplexity and its changes, not drawn, so its 1e16% does not flatten the runs one can
    compare; the scan's plots, on a log scale, draw it."""
    if not curves:
        return []
    plt = pyplot()
    paths = []
    comparable, left_out = split_broken(curves)
    for measure in measures_of(curves):
        scan = measure in SCAN_CURVES.values()
        change = not scan and measure != FP  # a relative change, drawn in percent
        fig, ax = plt.subplots(figsize=(6, 4))
        plotted: list[float] = []
        for curve in curves if scan else comparable:
            points = sorted(curve.points.get(measure, {}).items())
            if points:
                values = [v * 100 if change else v for _, v in points]
                ax.plot([s for s, _ in points], values, "-o", markersize=3, label=curve.run)
                plotted += values
        scale, options = curve_scale(measure, plotted)
        ax.set_yscale(scale, **options)
        named = left_out and not scan
        ax.set_xlabel("training step" + (f"\nnot drawn, broken (fp ppl over {BROKEN_FP_COST + 1:g}x the control's at "
                                         "every step): " + ", ".join(left_out) if named else ""),
                      **({"fontsize": 8} if named else {}))
        ax.set_ylabel(f"{measure}: ppl change, %" if change else measure)
        ax.legend(fontsize=5)
        fig.tight_layout()
        path = out_dir / f"curve_{re.sub(r'[^A-Za-z0-9_.-]+', '_', measure).strip('_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
