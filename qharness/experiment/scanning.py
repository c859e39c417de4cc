"""One scan: load a model, profile its massive activations on calibration text, run the paper's intervention,
write the JSON profile and plots under results/scan/, and add summary rows to the leaderboard."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qharness.activations.intervene import intervention
from qharness.activations.plots import plot_attention_sink, plot_magnitudes
from qharness.activations.profile import InterventionResult, Profile, ProfileSummary
from qharness.activations.scan import ScanConfig, scan
from qharness.core import provenance
from qharness.core.errors import ConfigError
from qharness.data.results import (
    BASELINE,
    SCAN_TASK,
    Row,
    append_rows,
    check_writable,
    check_writable_dir,
    make_row,
    slug,
    write_atomic,
)
from qharness.models.layers import decoder_layers, layers_at
from qharness.models.sources import LoadedModel, ModelSpec, classify, context_limit, dtype_name, load_model
from qharness.quant import calibration_batches, calibration_text
from qharness.stats.bootstrap import ppl_interval, rel_change_interval
from qharness.tasks import get_task, load_task_text
from qharness.tasks.perplexity import perplexity
from qharness.tasks.spec import within_context
from qharness.training.ensure import ensure

SUMMARY_METRICS = {  # leaderboard metric -> (ProfileSummary field, higher_is_better)
    "massive_max": ("max", False),
    "massive_ratio": ("max_ratio", False),
    "first_massive_layer": ("first_massive_layer", True),
    "bos_holds_max": ("bos_holds_max", False),
}


@dataclass(frozen=True)
class ScanSpec:
    model: ModelSpec = field(default_factory=ModelSpec)
    config: ScanConfig = field(default_factory=ScanConfig)
    layers: str | None = None  # dotted path to the decoder layer list, when detection fails
    intervention_task: str | None = "kjv-heldout"  # None: skip the intervention
    intervention_limit: int = 1  # windows of that task per condition
    out_dir: Path = Path("results/scan")
    results: Path = Path("results/leaderboard.csv")
    progress: bool = True

    def __post_init__(self) -> None:
        if self.intervention_limit < 1:
            raise ConfigError(f"intervention limit must be >= 1 window per condition, got {self.intervention_limit}; "
                              "pass --no-intervention to skip the intervention")


def intervention_table(loaded: LoadedModel, layers: Any, summary: ProfileSummary,
                       spec: ScanSpec) -> list[InterventionResult]:
    plan = summary.intervention
    task = within_context(get_task(spec.intervention_task), context_limit(spec.model.name))
    text = load_task_text(task)

    def nll() -> np.ndarray:
        return perplexity(loaded.model, loaded.tokenizer, text, task.context_length, bos=spec.config.bos,
                          limit=spec.intervention_limit, progress=spec.progress).units

    nlls = {"original": nll()}
    for mode in ("zero", "mean"):
        with intervention(layers[plan.layer], plan.channels, mode, plan.mean_first, plan.mean_rest):
            nlls[mode] = nll()
    return intervention_results(nlls, plan.layer, plan.channels, task.name)


def intervention_results(nlls: dict[str, np.ndarray], layer: int, channels: list[int],
                         task: str) -> list[InterventionResult]:
    """Each condition's perplexity from its per-token NLLs, with its interval: the original's own, the others'
    change against it paired on the same tokens (is mean-ablation's small change an effect or noise?)."""
    original = nlls["original"]
    original_ppl = math.exp(float(original.mean()))
    results = []
    for condition, units in nlls.items():
        ppl = math.exp(float(units.mean()))
        if condition == "original":
            change, interval = None, ppl_interval(units)
        else:
            change, interval = ppl / original_ppl - 1, rel_change_interval(original, units)
        results.append(InterventionResult(condition, ppl, layer, channels, task, change=change, ci_low=interval.low,
                                          ci_high=interval.high, tokens=len(units)))
    return results


def summary_rows(spec: ScanSpec, loaded: LoadedModel, summary: ProfileSummary, seconds: float) -> list[Row]:
    rows = []
    for metric, (name, higher) in SUMMARY_METRICS.items():
        value = getattr(summary, name)
        value = None if value is None else float(value)
        rows.append(make_row(
            value, value, model=spec.model.name, quant=BASELINE, task=SCAN_TASK, metric=metric, bos=spec.config.bos,
            context_length=spec.config.length, limit=spec.config.sequences, dtype=dtype_name(loaded.dtype),
            device_type=loaded.device.type, higher_is_better=higher, metric_kind="activation",
            n=spec.config.sequences, arch=loaded.arch, mitigation=loaded.mitigation, family=loaded.family,
            train_seed=loaded.train_seed, train_recipe=loaded.train_recipe, model_source=loaded.source, seed=0,
            seconds=f"{seconds:.1f}", **provenance.row_fields(loaded.device),
        ))
    return rows


def profile_dir(spec: ScanSpec) -> Path:
    """Where a scan writes profile.json and its plots."""
    return spec.out_dir / (slug(spec.model.name) + ("" if spec.config.bos else "-nobos"))


def run_scan(spec: ScanSpec, say: Callable[[str], None] = print, loaded: LoadedModel | None = None) -> Profile:
    """Scan `spec.model` (or `loaded`, that model already loaded in its fp state by a sweep's runs)."""
    classify(spec.model.name)
    check_writable(spec.results)
    check_writable_dir(spec.out_dir, "--out")
    limit = context_limit(spec.model.name)
    if limit is not None and spec.config.length > limit:
        say(f"{spec.model.name} takes at most {limit} tokens: scanning sequences of {limit}")
        spec = replace(spec, config=replace(spec.config, length=limit))
    if spec.intervention_task:
        get_task(spec.intervention_task)
    if loaded is None:
        ensure(spec.model.name, progress=spec.progress)
        say(f"loading {spec.model.name} ...")
        loaded = load_model(spec.model, progress=spec.progress)
    layers = layers_at(loaded.model, spec.layers) if spec.layers else decoder_layers(loaded.model)
    batches = calibration_batches(loaded.tokenizer, calibration_text(), spec.config.sequences, spec.config.length,
                                  spec.config.bos, loaded.device)
    say(f"scanning {len(layers)} layers over {len(batches)} sequences of {spec.config.length} tokens ...")
    start = time.perf_counter()
    profile = scan(loaded.model, loaded.tokenizer, batches, spec.config, layers)
    seconds = time.perf_counter() - start
    profile = replace(profile, model=spec.model.name, model_source=loaded.source, dtype=dtype_name(loaded.dtype),
                      device=provenance.device_description(loaded.device), git_rev=provenance.git_revision(),
                      versions=json.loads(provenance.versions()), time=provenance.utc_now())
    if spec.intervention_task and profile.summary.intervention:
        say("intervention: zero / mean of the outlier channels ...")
        profile.intervention_table = intervention_table(loaded, layers, profile.summary, spec)
    out = profile_dir(spec)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "profile.json", json.dumps(profile.to_json(), indent=1) + "\n")
    title = f"{spec.model.name} ({'BOS' if spec.config.bos else 'no BOS'})"
    plot_magnitudes(profile, out / "magnitudes.png", title)
    plot_attention_sink(profile, out / "attention_sink.png", title)
    append_rows(spec.results, summary_rows(spec, loaded, profile.summary, seconds))
    return profile
