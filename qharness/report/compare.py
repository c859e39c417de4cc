"""The comparator: how much does each scheme cost each model, and how much of that is its massive activations?

Reads the leaderboard (and the per-layer error files) and writes results/report.md, results/report.html and plots:
- degradation per (model, scheme, task, metric): fp -> quantized, absolute and relative;
- the causal check: a scheme run again with BOS (or other positions) kept in full precision (`--keep-positions`):
  the share of the loss that comes back is the share the kept activations caused;
- rank correlation across models between the massive-activation measures (scan) and the degradation, per scheme
  (needs at least 3 models with both);
- per layer, the quantized model's output error against the layer's activation magnitude (`run --layer-errors`);
  the error is relative to the layer output's norm, which massive entries dominate where they exist;
- the mitigations: for models trained here with one recipe and different mitigations (a `family` in the
  leaderboard, e.g. the zoo's zoo:llama-*), each one's max activation and max/median ratio, its full-precision
  perplexity (the quality cost, against its family's member without a mitigation) and the relative perplexity change
  under the headline schemes (the quantizability gain); a family trained from another model (tune:) starts with that
  model, and each member's max |h| over its training steps is plotted when its training log is in the cache;
- the fixes compared per scheme: keeping BOS, a post-hoc transform, a training-time mitigation (fixes.py);
- what predicts the loss: rank correlation, pooled over every (model, scheme, task), of the perplexity change with
  max/median, kurtosis and the layer-wise error growth, with a bootstrap interval (predictors.py);
- a heatmap of relative perplexity change (model x scheme) and degradation against max activation;
- from the rows' per-unit results (units.py, noise.py): each row's interval and evaluation size, the plain schemes
  ranked with each step real or within noise, pairs that differ in one setting, within-noise marks in the fixes,
  causal-check and mitigations tables, and the spread over the training seeds of one recipe (seeds.py). Rows of
  different evaluation settings (limit, context, BOS, task data) are never set side by side.
- training curves (curves.py): for models evaluated at several steps of one run (`tune400:...@step100`), each
  measure against the step, one plot per measure with every run on it.
"""

from __future__ import annotations

import html
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from qharness.data.results import SCAN_TASK, Row, layer_errors_dir, read_rows, scan_dir, write_atomic
from qharness.report.costs import cost_markdown, cost_points
from qharness.report.curves import build_curves, curves_markdown
from qharness.report.degradation import Degradation, degradations, number, percent
from qharness.report.families import REFERENCE, model_families, with_references
from qharness.report.fixes import fixes_markdown, fixes_table
from qharness.report.noise import (
    Noise,
    paired_differences,
    paired_markdown,
    ranked_markdown,
    ranked_schemes,
    within_noise,
)
from qharness.report.plots import (
    plot_against_activation,
    plot_cost_quality,
    plot_curves,
    plot_heatmap,
    plot_layer_errors,
    plot_training,
)
from qharness.report.predictors import (
    predictor_points,
    predictors,
    predictors_markdown,
    profile_extras,
    rho_interval,
)
from qharness.report.seeds import seed_groups, seeds_markdown
from qharness.stats.rankstats import bootstrap_interval, spearman

PROFILE_MEASURES = ("massive_max", "massive_ratio")  # correlated with degradation
SCAN_MEASURES = (*PROFILE_MEASURES, "bos_holds_max", "first_massive_layer")  # read from the scan rows
HEADLINE_SCHEMES = ("int8-w8a8-tensor", "int8-w8a8-tensor-static", "int8-w8a8-token", "int4-weight-g128", "nf4",
                    "fp8-e4m3-w8a8-tensor", "fp8-e5m2-w8a8-tensor")
MODEL_COLUMNS = ("arch", "mitigation", "family")


def with_model_columns(rows: list[Row]) -> list[Row]:
    """Rows written before the arch / mitigation / family columns existed get what their model's name says (only
    the zoo's names say anything); rows that have them keep theirs."""
    from qharness.models.sources import name_columns

    known: dict[str, dict[str, str]] = {}
    out = []
    for row in rows:
        if any(row.get(column) for column in MODEL_COLUMNS):
            out.append(row)
            continue
        if row["model"] not in known:
            known[row["model"]] = name_columns(row["model"])
        out.append({**row, **known[row["model"]]})
    return out


def _rel_text(d: Degradation) -> str:
    if d.ci is None:
        return f"{d.rel:+.2%}"
    return f"{d.rel:+.2%} [{d.ci[0] * 100:+.2f}, {d.ci[1] * 100:+.2f}]"


def recovered_text(recovered: float | None) -> str:
    return "no loss to recover" if recovered is None else f"{recovered:.0%}"


def causal_checks(items: list[Degradation], noise: Noise | None = None) -> list[dict[str, Any]]:
    """For each scheme run both plain and with kept positions (on the same evaluation setting): the share of its
    loss that keeping recovers, and with `noise` the paired interval of kept - plain (is the recovery real?)."""
    plain = {(d.model, d.quant, d.task, d.metric, d.setting): d for d in items if d.plain}
    checks = []
    for kept in (d for d in items if d.keep and not (d.transform or d.kv)):
        base = plain.get((kept.model, kept.quant, kept.task, kept.metric, kept.setting))
        if base is None:
            continue
        recovered = (base.loss - kept.loss) / base.loss if base.loss > 0 else None  # nothing lost to recover
        interval = noise.difference(kept, base) if noise is not None else None
        checks.append({"model": kept.model, "quant": kept.quant, "task": kept.task, "metric": kept.metric,
                       "keep": kept.keep, "fp": base.fp_value, "plain": base.value, "kept": kept.value,
                       "recovered": recovered, "evaluated": kept.evaluated,
                       "difference": None if interval is None else (interval.low, interval.high),
                       "within_noise": within_noise(interval)})
    return checks


def _difference_text(check: dict[str, Any]) -> str:
    if check["difference"] is None:
        return ""
    low, high = check["difference"]
    return f"[{low * 100:+.1f}, {high * 100:+.1f}]" + (" within noise" if check["within_noise"] else "")


def profile_measures(rows: list[Row]) -> dict[str, dict[str, float]]:
    """model -> {massive_max, massive_ratio, bos_holds_max} from the scan rows (BOS on) in the leaderboard."""
    measures: dict[str, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row.get("task") == SCAN_TASK and row["metric"] in SCAN_MEASURES and row["value"] and row["bos"] == "True":
            measures[row["model"]][row["metric"]] = float(row["value"])
    return dict(measures)


def correlations(items: list[Degradation], measures: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    by_scheme: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for d in items:
        if d.plain and d.model in measures:
            by_scheme[(d.quant, d.task, d.metric)][d.model] = d.rel
    out = []
    for (quant, task, metric), per_model in sorted(by_scheme.items()):
        models = sorted(per_model)
        for measure in PROFILE_MEASURES:
            usable = [m for m in models if measure in measures[m]]
            x, y = [measures[m][measure] for m in usable], [per_model[m] for m in usable]
            rho = spearman(x, y) if len(usable) >= 3 else None
            # the models are the sample: resampling them gives the interval (seeded, as the pooled predictors' is)
            low, high = bootstrap_interval(x, y) if rho is not None and rho == rho else (None, None)
            out.append({"quant": quant, "task": task, "metric": metric, "measure": measure, "models": len(usable),
                        "spearman": rho, "low": low, "high": high})
    return out


def mitigation_table(measures: dict[str, dict[str, float]], items: list[Degradation],
                     families: dict[str, tuple[str, str]], noise: Noise | None = None) -> dict[str, Any]:
    """One row per model of a family on one perplexity task (kjv-heldout when present) and one evaluation setting
    (the one most models were run at: rows of other settings are not comparable): activation measures, fp
    quality against its family's baseline (mitigation none), and the ppl change per headline scheme present. A
    family's reference (the model it was trained from) comes first. With `noise`, the fp change and each scheme's
    change carry whether they are within noise of the family's control (paired on the same tokens)."""
    plain = [d for d in items if d.model in families and d.metric == "ppl" and d.plain]
    tasks = sorted({d.task for d in plain}, key=lambda t: (t != "kjv-heldout", t))
    if not tasks:
        return {"task": None, "schemes": [], "rows": []}
    task = tasks[0]
    settings = Counter(d.setting for d in plain if d.task == task)
    setting = max(settings, key=lambda s: (len({d.model for d in plain if d.task == task and d.setting == s}),
                                           settings[s]))
    chosen = [d for d in plain if d.task == task and d.setting == setting]
    fp = {d.model: d.fp_value for d in chosen}
    by_scheme = {(d.model, d.quant): d for d in chosen}
    rel = {k: d.rel for k, d in by_scheme.items()}
    schemes = [s for s in HEADLINE_SCHEMES if any(q == s for _, q in rel)]
    controls = {family: model for model, (family, mitigation) in families.items()
                if mitigation == "none" and model in fp}
    baselines = {family: fp[model] for family, model in controls.items()}
    table = []
    rank = {REFERENCE: 0, "none": 1}
    order = {model: (family, rank.get(mitigation, 2), mitigation) for model, (family, mitigation) in families.items()}
    for model in sorted(fp, key=order.__getitem__):
        base = baselines.get(families[model][0])
        control = controls.get(families[model][0])
        label = f"{model} (trained from)" if families[model][1] == REFERENCE else model
        noisy = _noisy_against(model, control, schemes, by_scheme, noise)
        table.append({"model": label, "bos_holds_max": None, **measures.get(model, {}),
                      "fp_ppl": fp[model], "fp_vs_base": fp[model] / base - 1 if base else None,
                      **{scheme: rel.get((model, scheme)) for scheme in schemes}, **noisy})
    others = sorted({d.model for d in plain if d.task == task and d.setting != setting} - set(fp))
    return {"task": task, "schemes": schemes, "rows": table, "evaluated": chosen[0].evaluated,
            "other_settings": others}


def _noisy_against(model: str, control: str | None, schemes: list[str], by_scheme: dict[tuple[str, str], Degradation],
                   noise: Noise | None) -> dict[str, Any]:
    """Which of a member's numbers are within noise of its control's: the fp perplexity ('fp_vs_base') and each
    scheme's change, each a paired interval on the same tokens; empty without units or for the control itself."""
    if noise is None or control is None or model == control:
        return {"within_noise": []}
    out = []
    anyone = next((by_scheme[(model, s)] for s in schemes if (model, s) in by_scheme), None)
    reference = next((by_scheme[(control, s)] for s in schemes if (control, s) in by_scheme), None)
    if anyone is not None and reference is not None:
        cost = noise.fp_change(anyone, reference)
        if cost is not None and cost.covers(0.0):
            out.append("fp_vs_base")
    out += [s for s in schemes if (model, s) in by_scheme and (control, s) in by_scheme
            and noise.tied(by_scheme[(model, s)], by_scheme[(control, s)])]
    return {"within_noise": out}


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _massive(row: dict[str, Any]) -> str:
    """The massive criterion (|h| > 100 and >= 1000 x median) as the scan found it: from which layer, or none."""
    if row.get("first_massive_layer") is not None:
        return f"from layer {row['first_massive_layer']:.0f}"
    return "none" if row.get("massive_max") is not None else ""


def mitigation_markdown(mitigations: dict[str, Any]) -> list[str]:
    parts = ["", "## Mitigations: activations, quality and quantizability (models trained here)", ""]
    if not mitigations["rows"]:
        return parts + ["No model of a family (zoo:<arch>-<mitigation>, tune:<model>-<mitigation>) has results yet; "
                        "see `qharness list models`."]
    schemes = mitigations["schemes"]
    evaluated = f" ({mitigations['evaluated']})" if mitigations.get("evaluated") else ""
    noise_note = (" ≈: within noise of the family's control (the paired interval of the difference covers 0)."
                  if any(r.get("within_noise") for r in mitigations["rows"]) else "")
    parts.append(f"Task {mitigations['task']}{evaluated}; max |h|, max/median, the massive criterion, the share of "
                 "maxima on BOS and the attention on position 0 (mean over layers) from `qharness scan`; fp vs base is "
                 "the full-precision perplexity against the family's member without a mitigation; the scheme columns "
                 "are the relative perplexity change under each scheme." + noise_note)
    parts.append("")
    header = ["model", "max abs", "max/median", "massive", "BOS holds max", "attn@0", "fp ppl", "fp vs base", *schemes]
    parts.append(_table(header, [[r["model"], _fmt(r.get("massive_max"), ".1f"), _fmt(r.get("massive_ratio"), ".0f"),
                                  _massive(r), _fmt(r["bos_holds_max"], ".0%"), _fmt(r.get("attention_on_first"),
                                                                                    ".2f"),
                                  number(r["fp_ppl"]), _marked(r, "fp_vs_base"),
                                  *[_marked(r, s) for s in schemes]]
                                 for r in mitigations["rows"]]))
    if mitigations.get("other_settings"):
        parts += ["", f"Not in this table (measured at another evaluation setting, so not comparable with these "
                      f"rows; see the degradation table): {', '.join(mitigations['other_settings'])}."]
    return parts


def _marked(row: dict[str, Any], column: str) -> str:
    return percent(row[column]) + (" ≈" if column in row.get("within_noise", ()) else "")


def load_layer_errors(folder: Path) -> list[dict[str, Any]]:
    """The per-layer error files `qharness run --layer-errors` writes next to the leaderboard."""
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def layer_error_summary(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for entry in entries:
        layers = entry["layers"]
        worst = max(layers, key=lambda layer: layer["rel_error"])
        peak = max(layers, key=lambda layer: layer["fp_max"])
        out.append({"model": entry["model"], "quant": entry["quant"], "keep": entry.get("keep", ""),
                    "worst_layer": worst["layer"], "worst_error": worst["rel_error"], "peak_layer": peak["layer"],
                    "spearman": spearman([layer["fp_max"] for layer in layers],
                                         [layer["rel_error"] for layer in layers]) if len(layers) >= 3 else None})
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(items: list[Degradation], checks: list[dict[str, Any]], corr: list[dict[str, Any]],
                    plots: list[str], layers: list[dict[str, Any]] | None = None,
                    mitigations: dict[str, Any] | None = None, fixes: dict[str, Any] | None = None,
                    predicted: list[dict[str, Any]] | None = None,
                    pairs: list[dict[str, Any]] | None = None, seeds: list[dict[str, Any]] | None = None,
                    ranked: list[dict[str, Any]] | None = None, sections: list[str] | None = None) -> str:
    parts = ["# qharness report", "",
             "Generated by `qharness compare` from the leaderboard. Perplexity is token-level (lower is better); "
             "zero-shot scores are accuracies (higher is better).", "", "## Degradation per scheme", ""]
    sized = any(d.evaluated for d in items)  # leaderboards from before `n` was kept have no size to show
    rows = [[d.model, d.label, d.backend, d.task, *([d.evaluated] if sized else []), d.metric,
             f"{d.fp_value:.4g}", f"{d.value:.4g}", f"{d.delta:+.4g}", _rel_text(d)]
            for d in sorted(items, key=lambda d: (d.model, d.task, d.setting, d.metric, d.rel))]
    if sized:
        parts += ["`evaluated`: the tokens (items) each number averages and the `--limit` it ran with; rel carries "
                  "its 95% paired block-bootstrap interval in points of percent where the row has one.", ""]
    parts.append(_table(["model", "scheme", "backend", "task", *(["evaluated"] if sized else []), "metric", "fp",
                         "quantized", "delta", "rel"], rows))
    if ranked:
        parts += ranked_markdown(ranked, _table)
    if mitigations is not None:
        parts += mitigation_markdown(mitigations)
    if fixes is not None:
        parts += fixes_markdown(fixes, _table)
    if pairs:
        parts += paired_markdown(pairs, _table)
    if seeds:
        parts += seeds_markdown(seeds, _table)
    parts += sections or []  # whole sections of their own modules: training curves, quality against cost
    parts += ["", "## Causal check: keep the massive-activation positions in full precision", ""]
    paired = any(c.get("difference") for c in checks)
    sized = any(c.get("evaluated") for c in checks)
    if paired:
        parts += ["kept - plain: the paired 95% interval of the difference in relative change (points of percent, "
                  "same tokens); a recovery whose interval covers 0 is within noise.", ""]
    if checks:
        parts.append(_table(["model", "scheme", "task", *(["evaluated"] if sized else []), "metric", "kept", "fp",
                             "plain", "kept value", "recovered", *(["kept - plain"] if paired else [])],
                            [[c["model"], c["quant"], c["task"], *([c["evaluated"]] if sized else []), c["metric"],
                              c["keep"], f"{c['fp']:.4g}", f"{c['plain']:.4g}", f"{c['kept']:.4g}",
                              recovered_text(c["recovered"]), *([_difference_text(c)] if paired else [])]
                             for c in checks]))
    else:
        parts.append("No scheme was run with `--keep-positions` yet.")
    parts += ["", "## Rank correlation: massive activations vs degradation across models", ""]
    measured = [c for c in corr if c["spearman"] is not None]
    if measured:
        parts.append("Spearman's rho over the models with both (a scan and the scheme's row); 95% percentile "
                     "bootstrap interval over the models (seed 0; few models give a wide one).")
        parts.append("")
        parts.append(_table(["scheme", "task", "metric", "measure", "models", "Spearman rho", "95% interval"],
                            [[c["quant"], c["task"], c["metric"], c["measure"], str(c["models"]),
                              f"{c['spearman']:+.2f}", rho_interval(c["low"], c["high"])] for c in measured]))
    else:
        parts.append("Needs at least 3 scanned models with results for the same scheme and task "
                     f"({max((c['models'] for c in corr), default=0)} so far).")
    if predicted is not None:
        parts += predictors_markdown(predicted, _table)
    parts += ["", "## Per layer: output error against activation magnitude", ""]
    if layers:
        parts.append(_table(["model", "scheme", "kept", "worst layer", "its error", "layer of the max activation",
                             "Spearman(max, error) over layers"],
                            [[e["model"], e["quant"], e["keep"], str(e["worst_layer"]), f"{e['worst_error']:.3g}",
                              str(e["peak_layer"]), "" if e["spearman"] is None else f"{e['spearman']:+.2f}"]
                             for e in layers]))
    else:
        parts.append("Run `qharness run --layer-errors` to measure it.")
    parts += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(parts) + "\n"


def html_report(markdown: str) -> str:
    """A self-contained page of the same content (tables and images), no markdown library needed."""
    body, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set(line) <= {"|", "-"}:
                continue
            tag = "th" if not in_table else "td"
            body.append(("<table>" if not in_table else "") + "<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells)
                        + "</tr>")
            in_table = True
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1 : -1]
            body.append(f'<img src="{html.escape(src)}" alt="{html.escape(src)}">')
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;font-size:13px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>qharness report</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"


def compare(results: Path, out_dir: Path) -> dict[str, Any]:
    """Write report.md, report.html and the plots into `out_dir`; return what they contain."""
    rows = with_model_columns(read_rows(results))
    items = degradations(rows)
    measures = profile_measures(rows)
    for model, extras in profile_extras(scan_dir(results)).items():
        measures.setdefault(model, {}).update(extras)
    noise = Noise(results)
    checks = causal_checks(items, noise)
    corr = correlations(items, measures)
    out_dir.mkdir(parents=True, exist_ok=True)
    layer_entries = load_layer_errors(layer_errors_dir(results))
    plots = [str(p) for p in (plot_heatmap(items, out_dir / "degradation_heatmap.png"),
                              plot_against_activation(items, measures, out_dir / "degradation_vs_activation.png"),
                              plot_layer_errors(layer_entries, out_dir / "layer_error_vs_activation.png"),
                              plot_training(model_families(rows), out_dir / "max_activation_in_training.png"))
             if p is not None]
    points = cost_points(rows, items)
    cost_plot = plot_cost_quality(points, out_dir / "quality_vs_cost.png")
    plots += [str(cost_plot)] if cost_plot is not None else []
    curves, curve_task = build_curves(rows, items)
    plots += [str(p) for p in plot_curves(curves, out_dir)]
    layers = layer_error_summary(layer_entries)
    families = with_references(model_families(rows))
    mitigations = mitigation_table(measures, items, families, noise)
    fixes = fixes_table(items, families, noise)
    pairs = paired_differences(items, noise)
    seeds = seed_groups(rows)
    ranked = ranked_schemes(items, noise)
    predicted = predictors(predictor_points(items, measures, layer_entries))
    markdown = markdown_report(items, checks, corr, plots, layers, mitigations, fixes, predicted, pairs, seeds,
                               ranked, curves_markdown(curves, curve_task, _table) + cost_markdown(points, _table))
    write_atomic(out_dir / "report.md", markdown)
    write_atomic(out_dir / "report.html", html_report(markdown))
    summary = {"degradations": len(items), "causal_checks": checks, "correlations": corr, "plots": plots,
               "layer_errors": layers, "mitigations": mitigations, "fixes": fixes, "predictors": predicted,
               "paired_differences": pairs, "seeds": seeds, "ranked_schemes": ranked,
               "costs": [p.__dict__ for p in points],
               "curves": [{"run": c.run, "mitigation": c.mitigation, "base": c.base, "points": c.points}
                          for c in curves]}
    write_atomic(out_dir / "report.json", json.dumps(summary, indent=1, default=str) + "\n")
    return summary
