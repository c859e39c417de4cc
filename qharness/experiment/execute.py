"""`execute(plan)`: load the model once, compute the fp baseline, quantize and evaluate each scheme, and write each
cell's rows as soon as they exist, so an interrupted run loses at most the cell in flight and a rerun resumes.

It takes a `Plan` and resolves no name: schemes, backends, the KV setting, the transform, the tasks and the row keys
all come from the plan. What it still checks is what only the loaded model can answer: that the model's attention
takes the KV quantizer, that a transform kept the logits, and (where the plan could not read the model's shapes
before loading) that kept channels and Linears exist and the chosen backends take its widths.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qharness import provenance
from qharness.errors import QHarnessError
from qharness.experiment.plan import Cell, Plan, check_backends, check_shapes, key_fields
from qharness.experiment.settings import RunSettings
from qharness.experiment.shapes import shapes_of
from qharness.models.sources import LoadedModel, dtype_name, load_model
from qharness.quant.apply import apply_backend_, convert_conv1d_, target_linears
from qharness.quant.calibrate import calibration_batches, calibration_text
from qharness.quant.footprint import weight_bytes
from qharness.quant.kv import check_kv_model, kv_quantized
from qharness.quant.schemes import QuantScheme
from qharness.quant.transforms import TransformSpec, transform_
from qharness.quant.types import QuantContext
from qharness.results import BASELINE, Row, append_rows, existing_keys, make_row, write_atomic
from qharness.tasks import TaskSpec, load_task_text
from qharness.tasks.metrics import Metric
from qharness.tasks.perplexity import perplexity
from qharness.training.ensure import ensure


@dataclass
class RunReport:
    rows: list[Row]  # one per (cell, metric), in (quant, task, metric) order: computed now or read back
    computed: int  # how many of them this run computed
    model: str


def check_finite(metric: Metric, cell: Cell, dtype: str) -> None:
    """A NaN or inf metric is an overflow, not a result: say so and store nothing (a rerun would skip it)."""
    if math.isfinite(metric.value):
        return
    hint = ("fp16 overflows past 65504, where massive activations live: use --dtype bf16 or fp32"
            if dtype == "fp16" else "the model's activations or the scheme's arithmetic overflowed; try --dtype fp32")
    raise QHarnessError(f"{cell.task.name} [{cell.label}]: {metric.name} came out {metric.value} in {dtype}, not "
                        f"stored; {hint}")


def evaluate(loaded: LoadedModel, task: TaskSpec, settings: RunSettings, progress: bool) -> list[Metric]:
    torch.manual_seed(settings.seed)
    if task.kind == "zero-shot":
        from qharness.tasks.zeroshot import zero_shot

        return zero_shot(loaded.model, loaded.tokenizer, task, limit=settings.limit, batch_size=settings.batch_size,
                         bos=settings.bos, progress=progress)
    return [perplexity(loaded.model, loaded.tokenizer, load_task_text(task), task.context_length, bos=settings.bos,
                       batch_size=settings.batch_size, limit=settings.limit, progress=progress)]


def result_row(plan: Plan, loaded: LoadedModel, cell: Cell, metric: Metric, fp_value: float,
               scheme: QuantScheme | None, seconds: float, run_id: str, weights: int) -> Row:
    fields = key_fields(plan.settings, plan.keep, cell, metric.name, loaded.device.type, dtype_name(loaded.dtype))
    return make_row(
        metric.value, fp_value, **fields,
        higher_is_better=metric.higher_is_better, metric_kind=metric.kind, n=metric.n, chance=metric.chance,
        weight_bytes=weights, arch=loaded.arch, mitigation=loaded.mitigation, family=loaded.family,
        model_source=loaded.source, scheme=scheme.to_dict() if scheme else None, seed=plan.settings.seed,
        run_id=run_id, seconds=f"{seconds:.1f}", **provenance.row_fields(loaded.device),
    )


def write_layer_errors(plan: Plan, loaded: LoadedModel, qmodel: Any, quant: str, context: QuantContext) -> Path:
    from qharness.activations.layer_error import layer_errors

    batches = context.calibration_batches(quant)[:4]
    entry = {"model": plan.settings.model, "quant": quant, "keep": plan.keep.label,
             "layers": layer_errors(loaded.model, qmodel, batches), **provenance.row_fields(loaded.device)}
    path = plan.layer_error_files[quant]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(entry, indent=1) + "\n")
    return path


def transformed(transform: TransformSpec | None, model: Any, calibration: Callable[[], list[torch.Tensor]],
                say: Callable[[str], None]) -> Any:
    """A transformed copy of the fp model (the model itself when there is no transform), checked to compute the
    same logits."""
    if transform is None:
        return model
    say(f"transforming with {transform.label} ...")
    copied = copy.deepcopy(model)
    drift = transform_(copied, transform, calibration())
    say(f"{transform.label}: fp logits moved by {drift:.1e} of their largest magnitude")
    return copied


def check_loaded(plan: Plan, loaded: LoadedModel, targets: dict[str, Any]) -> None:
    """What only the loaded model can answer, before anything is computed: its attention takes the KV quantizer;
    and where the plan had no shapes (or the loaded model's differ from its config's), kept channels and Linears
    exist and the chosen backends take its widths."""
    shapes = shapes_of(loaded.model)
    if shapes != plan.shapes:
        check_shapes(plan.keep, shapes, plan.origin)
        check_backends(plan, targets)
    check_kv_model(loaded.model, plan.kv)


def execute(plan: Plan, say: Callable[[str], None] = print, progress: bool = True) -> RunReport:
    settings = plan.settings
    # read again, not taken from the plan: a sweep's earlier cells (or another writer) may have added rows since
    done = {} if settings.force else existing_keys(settings.results)
    todo = plan.todo(done)
    if not todo and not any(plan.needs_layer_errors(quant) for quant in plan.schemes):
        say(f"all {len(plan.keys)} rows are already in {settings.results}; pass --force to recompute")
        return RunReport([done[k] for k in plan.keys], 0, settings.model)

    ensure(settings.model, progress=progress)
    say(f"loading {settings.model} ...")
    loaded = load_model(settings.model_spec, progress=progress)
    convert_conv1d_(loaded.model)  # GPT-2: Linears from here on, as every backend sees them
    targets = target_linears(loaded.model)
    check_loaded(plan, loaded, targets)
    run_id = uuid.uuid4().hex[:12]
    rows: dict[tuple[str, ...], Row] = dict(done)
    fp_values = {(c.task.name, m): float(done[k]["value"])  # baselines already measured are read, not recomputed
                 for c in plan.cells if c.is_baseline for m, k in c.row_keys.items() if k in done}

    def compute(model: LoadedModel, cell: Cell) -> None:
        say(f"evaluating {cell.task.name} [{cell.label}]")
        start = time.perf_counter()
        metrics = evaluate(model, cell.task, settings, progress)
        seconds = time.perf_counter() - start
        for metric in metrics:
            check_finite(metric, cell, dtype_name(model.dtype))
        scheme = plan.schemes.get(cell.quant)
        new_rows = []
        for metric in metrics:
            if cell.is_baseline:
                fp_values[(cell.task.name, metric.name)] = metric.value
            row = result_row(plan, model, cell, metric, fp_values[(cell.task.name, metric.name)], scheme,
                             seconds, run_id, weight_bytes(targets, scheme))
            new_rows.append(row)
            rows[cell.row_keys[metric.name]] = row
        append_rows(settings.results, new_rows)

    def calibration() -> list[torch.Tensor]:
        return calibration_batches(loaded.tokenizer, calibration_text(), length=plan.calibration_length,
                                   bos=settings.bos, device=loaded.device)

    # transformed before anything is computed, so a model the transform refuses leaves the leaderboard untouched
    quantized_todo = any(not c.is_baseline and c.quant in plan.schemes for c in todo)
    base = transformed(plan.transform, loaded.model, calibration, say) if quantized_todo else loaded.model
    for cell in todo:  # a missing baseline is computed first; a present one was read into fp_values above
        if cell.is_baseline:
            compute(loaded, cell)
    kv_only = [c for c in todo if c.quant == BASELINE and c.kv]
    if kv_only:
        say(f"quantizing the KV cache only ({plan.kv.name}) ...")
        with kv_quantized(loaded.model, plan.kv):
            for cell in kv_only:
                compute(loaded, cell)
    for quant, scheme in plan.schemes.items():
        quant_cells = [c for c in todo if c.quant == quant]
        if not quant_cells and not plan.needs_layer_errors(quant):
            continue
        backend = plan.backends[quant]
        say(f"quantizing with {quant} [{backend.name}] ...")
        qmodel = copy.deepcopy(base)
        context = QuantContext(loaded.device, calibration=calibration, tokenizer=loaded.tokenizer)
        apply_backend_(qmodel, scheme, backend, keep=plan.keep, context=context)
        quantized = loaded.with_model(qmodel)
        if plan.needs_layer_errors(quant):
            write_layer_errors(plan, loaded, qmodel, quant, context)
        with kv_quantized(qmodel, plan.kv):
            for cell in quant_cells:
                compute(quantized, cell)
        del qmodel, quantized
        gc.collect()
    return RunReport([rows[k] for k in plan.keys if k in rows], sum(1 for k in plan.keys if k not in done),
                     settings.model)
