"""`execute(plan)`: load the model once, compute the fp baseline, quantize and evaluate each scheme, and write each
cell's rows as soon as they exist, so an interrupted run loses at most the cell in flight and a rerun resumes.

It takes a `Plan` and resolves no name: schemes, backends, the KV setting, the transform, the tasks and the row keys
all come from the plan. What it still checks is what only the loaded model can answer: that the model's attention
takes the KV quantizer, that a transform kept the logits, and (where the plan could not read the model's shapes
before loading) that kept channels and Linears exist and the chosen backends take its widths.
"""

from __future__ import annotations

import copy
import functools
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

from qharness.core import provenance
from qharness.core.errors import QHarnessError
from qharness.data.results import BASELINE, Row, append_rows, existing_keys, make_row, write_atomic
from qharness.data.units import interval_columns, read_units, store_units, units_of
from qharness.experiment.plan import Cell, Plan, check_backends, check_shapes, key_fields
from qharness.experiment.settings import RunSettings
from qharness.experiment.shapes import shapes_of
from qharness.models.sources import LoadedModel, dtype_name, load_model
from qharness.quant import (
    FpWeights,
    QuantContext,
    QuantScheme,
    TransformSpec,
    apply_backend_,
    calibration_batches,
    calibration_text,
    check_kv_model,
    convert_conv1d_,
    kv_quantized,
    target_linears,
    transform_,
    weight_bytes,
)
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
        train_seed=loaded.train_seed, train_recipe=loaded.train_recipe,
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


@functools.cache
def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim_host_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim), between the phases of a run. A forward
    frees its activations into malloc's arenas, which keep them; the next phase (a calibration's short sequences,
    another scheme's forward) then often allocates beside them instead of in them, and the peak RSS grew by up to
    470 MB on SmolLM2 from one run to the next (measured). A no-op where the C library is not glibc."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


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


class Execution:
    """One plan being executed: the loaded fp model, the rows so far (read back or computed), each task's fp value."""

    def __init__(self, plan: Plan, loaded: LoadedModel, targets: dict[str, Any], done: dict[tuple[str, ...], Row],
                 say: Callable[[str], None], progress: bool) -> None:
        self.plan, self.loaded, self.targets, self.say, self.progress = plan, loaded, targets, say, progress
        self.done = done
        self.run_id = uuid.uuid4().hex[:12]
        self.rows: dict[tuple[str, ...], Row] = dict(done)
        self.fp_values = {(c.task.name, m): float(done[k]["value"])  # baselines already measured: read, not rerun
                          for c in plan.cells if c.is_baseline for m, k in c.row_keys.items() if k in done}
        # from the shapes before any scheme runs: a scheme applied in place releases its Linears' fp weights
        self.weight_bytes = {quant: weight_bytes(targets, plan.schemes.get(quant))
                             for quant in (BASELINE, *plan.schemes)}
        self.fp_units = {(c.task.name, m): read_units(plan.settings.results, k)  # and their per-unit results
                         for c in plan.cells if c.is_baseline for m, k in c.row_keys.items() if k in done}

    def calibration(self) -> list[torch.Tensor]:
        return calibration_batches(self.loaded.tokenizer, calibration_text(), length=self.plan.calibration_length,
                                   bos=self.plan.settings.bos, device=self.loaded.device)

    def compute(self, model: LoadedModel, cell: Cell) -> None:
        """Evaluate one cell on `model` (the fp model or a quantized copy) and write its rows at once."""
        self.say(f"evaluating {cell.task.name} [{cell.label}]")
        start = time.perf_counter()
        metrics = evaluate(model, cell.task, self.plan.settings, self.progress)
        seconds = time.perf_counter() - start
        for metric in metrics:
            check_finite(metric, cell, dtype_name(model.dtype))
        scheme = self.plan.schemes.get(cell.quant)
        new_rows = []
        for metric in metrics:
            if cell.is_baseline:
                self.fp_values[(cell.task.name, metric.name)] = metric.value
                self.fp_units[(cell.task.name, metric.name)] = units_of(metric)
            row = result_row(self.plan, model, cell, metric, self.fp_values[(cell.task.name, metric.name)], scheme,
                             seconds, self.run_id, self.weight_bytes[cell.quant])
            row.update(interval_columns(metric, self.fp_units.get((cell.task.name, metric.name)), cell.is_baseline,
                                        self.plan.settings.seed, interval=self.plan.settings.intervals))
            # written before its row, so a row never exists without its units
            store_units(self.plan.settings.results, cell.row_keys[metric.name], units_of(metric))
            new_rows.append(row)
            self.rows[cell.row_keys[metric.name]] = row
        append_rows(self.plan.settings.results, new_rows)
        trim_host_memory()

    def baselines(self, todo: list[Cell]) -> None:
        """The missing fp rows, first: every other row of their task is measured against them."""
        for cell in todo:
            if cell.is_baseline:
                self.compute(self.loaded, cell)

    def kv_only(self, todo: list[Cell]) -> None:
        """`--quant none --kv X`: fp weights with a quantized cache, on the fp model itself (undone after)."""
        cells = [c for c in todo if c.quant == BASELINE and c.kv]
        if cells:
            self.say(f"quantizing the KV cache only ({self.plan.kv.name}) ...")
            with kv_quantized(self.loaded.model, self.plan.kv):
                for cell in cells:
                    self.compute(self.loaded, cell)

    def scheme(self, quant: str, base: Any, todo: list[Cell], fp: FpWeights | None = None) -> None:
        """One scheme's cells: `base` (the fp model, transformed if the plan says so) quantized by the backend the
        plan chose, its layer errors if asked, then each task with the plan's KV setting. With `fp` (its Linears'
        fp weights kept on disk) the scheme is applied to `base` itself and undone after; without, to a copy (layer
        errors compare the two, so they need both at once)."""
        cells = [c for c in todo if c.quant == quant]
        if not cells and not self.plan.needs_layer_errors(quant):
            return
        backend = self.plan.backends[quant]
        self.say(f"quantizing with {quant} [{backend.name}] ...")
        if quant in self.plan.notes:  # a kernel built at first use, or sim standing in for a kernel on CUDA
            self.say(self.plan.notes[quant])
        in_place = fp is not None and not self.plan.needs_layer_errors(quant)
        qmodel = base if in_place else copy.deepcopy(base)
        context = QuantContext(self.loaded.device, calibration=self.calibration, tokenizer=self.loaded.tokenizer,
                               consume=in_place)
        try:
            apply_backend_(qmodel, self.plan.schemes[quant], backend, keep=self.plan.keep, context=context,
                           announce=False)
            if in_place:
                fp.release_()
            trim_host_memory()  # what calibrating and quantizing freed, before the evaluation's peak
            quantized = self.loaded.with_model(qmodel)
            if self.plan.needs_layer_errors(quant):
                write_layer_errors(self.plan, self.loaded, qmodel, quant, context)
            with kv_quantized(qmodel, self.plan.kv):
                for cell in cells:
                    self.compute(quantized, cell)
        finally:
            if in_place:
                fp.restore_()
        del qmodel
        trim_host_memory()

    def report(self) -> RunReport:
        keys = self.plan.keys
        return RunReport([self.rows[k] for k in keys if k in self.rows], sum(1 for k in keys if k not in self.done),
                         self.plan.settings.model)


def load_fp(plan: Plan, say: Callable[[str], None], progress: bool) -> LoadedModel:
    """The plan's fp model, trained first if it is a zoo or tune model not trained yet."""
    ensure(plan.settings.model, progress=progress)
    say(f"loading {plan.settings.model} ...")
    return load_model(plan.settings.model_spec, progress=progress)


def load_checked(plan: Plan, say: Callable[[str], None], progress: bool,
                 loaded: LoadedModel | None = None) -> tuple[LoadedModel, dict[str, Any]]:
    """The plan's model, trained first if it is a zoo or tune model not trained yet, loaded once (or `loaded`, the
    same model loaded for an earlier plan and given back in its fp state), its Conv1D turned into Linears, and
    checked (`check_loaded`); with its target Linears."""
    loaded = loaded if loaded is not None else load_fp(plan, say, progress)
    convert_conv1d_(loaded.model)  # GPT-2: Linears from here on, as every backend sees them
    targets = target_linears(loaded.model)
    check_loaded(plan, loaded, targets)
    return loaded, targets


def needs_model(plan: Plan) -> bool:
    """Whether executing `plan` computes anything now (a sweep loads a model only for plans that do)."""
    done = {} if plan.settings.force else existing_keys(plan.settings.results)
    return bool(plan.todo(done)) or any(plan.needs_layer_errors(quant) for quant in plan.schemes)


def execute(plan: Plan, say: Callable[[str], None] = print, progress: bool = True,
            loaded: LoadedModel | None = None) -> RunReport:
    """Run `plan`. `loaded`: its model already loaded (by `load_model(plan.settings.model_spec)`, for another plan
    of a sweep); it is used and given back in its fp state, as every scheme is undone after its cells."""
    settings = plan.settings
    # read again, not taken from the plan: a sweep's earlier cells (or another writer) may have added rows since
    done = {} if settings.force else existing_keys(settings.results)
    todo = plan.todo(done)
    if not todo and not any(plan.needs_layer_errors(quant) for quant in plan.schemes):
        say(f"all {len(plan.keys)} rows are already in {settings.results}; pass --force to recompute")
        return RunReport([done[k] for k in plan.keys], 0, settings.model)
    loaded, targets = load_checked(plan, say, progress, loaded)
    run = Execution(plan, loaded, targets, done, say, progress)
    # transformed before anything is computed, so a model the transform refuses leaves the leaderboard untouched
    quantized_todo = any(c.quant in plan.schemes for c in todo)
    base = transformed(plan.transform, loaded.model, run.calibration, say) if quantized_todo else loaded.model
    run.baselines(todo)
    run.kv_only(todo)
    # one model in memory: each scheme is applied to `base` and undone from its Linears' fp weights kept on disk
    fp = FpWeights(base, target_linears(base)) if quantized_todo else None  # in $TMPDIR
    try:
        for quant in plan.schemes:
            run.scheme(quant, base, todo, fp)
    finally:
        if fp is not None:
            fp.close()
    return run.report()
