"""One run: a model, its fp baseline and each quantized variant, evaluated on each task, appended to the results.

`run(spec)` validates every name before it loads anything, skips cells already in the leaderboard (unless
`force`), computes the fp baseline once per task, and writes each cell's rows as soon as they exist, so an
interrupted run loses at most the cell in flight and a rerun resumes where it stopped.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qharness import provenance
from qharness.errors import ConfigError, QHarnessError
from qharness.models.sources import (
    LoadedModel,
    ModelSpec,
    classify,
    context_limit,
    dtype_name,
    load_model,
    resolve_device,
    resolve_dtype,
)
from qharness.quant.apply import quantize_, target_linears
from qharness.quant.backend import QuantContext, select_backend
from qharness.quant.calibrate import CALIBRATION_LENGTH, calibration_batches, calibration_text
from qharness.quant.footprint import weight_bytes
from qharness.quant.kv import check_kv_model, get_kv, kv_quantized, split_quants
from qharness.quant.schemes import SCHEMES, Keep, QuantScheme, get_scheme
from qharness.quant.transforms import check_transform, names_a_transform, parse_transform, transform_
from qharness.recipe import check_seed
from qharness.results import (
    BASELINE,
    Row,
    append_rows,
    check_writable,
    existing_keys,
    key,
    layer_errors_path,
    make_row,
    write_atomic,
)
from qharness.tasks import TaskSpec, get_task, load_task_text
from qharness.tasks.metrics import Metric
from qharness.tasks.perplexity import perplexity
from qharness.tasks.spec import within_context
from qharness.training.ensure import ensure
from qharness.units import interval_columns, read_units, store_units, units_of

FP = BASELINE
DEFAULT_TASKS = ("kjv-heldout", "wordnet-heldout")


@dataclass(frozen=True)
class RunSpec:
    model: ModelSpec = field(default_factory=ModelSpec)
    quants: tuple[str, ...] = ("int8-w8a8-token",)  # scheme names or aliases; the fp baseline is implied
    backend: str = "auto"  # auto: real kernels on CUDA, sim on CPU; or a backend name for every scheme
    keep: Keep = field(default_factory=Keep)  # token positions left in full precision (the causal check)
    tasks: tuple[str, ...] = DEFAULT_TASKS
    bos: bool = True  # prepend BOS to every window (the paper's setting)
    limit: int | None = None  # evaluate only the first N windows of each task
    batch_size: int = 1
    seed: int = 0
    results: Path = Path("results/leaderboard.csv")
    force: bool = False  # recompute cells that are already in the leaderboard
    progress: bool = True
    layer_errors: bool = False  # also write each scheme's per-layer output error (results/layers/) for compare
    kv: str = "none"  # KV-cache setting of every quantized cell (`qharness list kv`); none: a full-precision cache
    transform: str = ""  # applied to the fp model before each scheme: '' (none), 'smoothquant:0.5', 'rotate'

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1 window, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1 window per forward pass, got {self.batch_size}")
        check_seed(self.seed, "run")
        if not self.tasks:
            raise ConfigError("no task given; pass --task with at least one task name")
        if self.layer_errors and names_a_transform(self.transform):
            raise ConfigError("--layer-errors compares each layer with the untransformed fp model, whose layers a "
                              "transform changes by design (only the logits are kept); drop one of --layer-errors "
                              "and --transform")


@dataclass
class Cell:
    """One (model state, task) evaluation; it yields one row per metric of the task."""

    quant: str  # canonical scheme name, or FP
    backend: str  # the backend that runs it ("" for FP)
    task: TaskSpec
    task_hash: str
    transform: str = ""  # the transform's label ('' for none, and for FP: the baseline is never transformed)
    row_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)  # metric -> leaderboard key
    kv: str = ""  # the KV setting's name, "" for a full-precision cache

    @property
    def is_baseline(self) -> bool:
        """The fp row every other row of the task is measured against (fp weights *and* an fp cache)."""
        return self.quant == FP and not self.kv

    @property
    def label(self) -> str:
        return self.quant + (f" kv {self.kv}" if self.kv else "")


@dataclass
class RunReport:
    rows: list[Row]  # one per (cell, metric), in (quant, task, metric) order: computed now or read back
    computed: int  # how many of them this run computed
    model: str


def _key_fields(spec: RunSpec, cell: Cell, metric: str, device_type: str, dtype: str) -> dict[str, object]:
    task = cell.task
    return {
        "model": spec.model.name, "quant": cell.quant, "backend": cell.backend,
        "keep": "" if cell.quant == FP else spec.keep.label, "kv": cell.kv, "transform": cell.transform,
        "task": task.name,
        "task_hash": cell.task_hash,
        "metric": metric, "bos": spec.bos, "context_length": task.context_length if task.kind == "perplexity" else None,
        "limit": spec.limit, "dtype": dtype, "device_type": device_type,
    }


def plan_cells(spec: RunSpec) -> tuple[list[Cell], dict[str, QuantScheme]]:
    """Resolve every name and check the leaderboard (failing before any model loads); list the cells to run."""
    classify(spec.model.name)
    check_writable(spec.results)
    kv = get_kv(spec.kv)
    quants, kv_only = split_quants(spec.quants, kv, bool(spec.keep))
    schemes = {SCHEMES.resolve(q): get_scheme(q) for q in quants}
    limit = context_limit(spec.model.name)
    tasks = [within_context(get_task(name), limit) for name in spec.tasks]
    device = resolve_device(spec.model.device)
    torch_dtype = resolve_dtype(spec.model.dtype, device)
    backends = {name: select_backend(scheme, device, spec.backend, dtype=torch_dtype)
                for name, scheme in schemes.items()}
    hashes = {task.name: task.content_hash() for task in tasks}
    transform = parse_transform(spec.transform)
    if transform is not None and not schemes:  # the KV-only cell runs on the untransformed model
        raise ConfigError(f"--transform {transform.label} rewrites the model before its Linears are quantized, but "
                          f"--quant {FP} quantizes none, so no row would be transformed; name a scheme too "
                          "(e.g. --quant none,int8) or drop --transform")
    if transform is not None:
        check_transform(transform, spec.keep.channels, backends)
    cells = []
    kv_cells = [(FP, "")] + ([(FP, kv.name)] if kv_only else []) + [(q, kv.name if kv else "") for q in schemes]
    for quant, kv_name in kv_cells:  # `--quant none --kv X`: fp weights, quantized cache, against the true fp row
        for task in tasks:
            label = transform.label if transform is not None and quant != FP else ""
            cell = Cell(quant, backends.get(quant, ""), task, hashes[task.name], label, kv=kv_name)
            _key_cell(spec, cell, device.type, dtype_name(torch_dtype))
            cells.append(cell)
    return cells, schemes


def _key_cell(spec: RunSpec, cell: Cell, device_type: str, dtype: str) -> None:
    cell.row_keys = {m: key(make_row(**_key_fields(spec, cell, m, device_type, dtype))) for m in cell.task.metrics}


def reselect_backends(spec: RunSpec, cells: list[Cell], schemes: dict[str, QuantScheme], loaded: LoadedModel,
                      targets: dict[str, Any]) -> None:
    """Once the model is loaded its Linears' widths are known: `auto` moves a scheme off a backend that cannot take
    them (torchao int4 on widths that are not whole groups) to the next one, and the cells' keys follow, since the
    backend is part of a row's key. A backend asked for by name that cannot take them raises here, before compute."""
    for quant, scheme in schemes.items():
        chosen = select_backend(scheme, loaded.device, spec.backend, dtype=loaded.dtype, targets=targets)
        for cell in (c for c in cells if c.quant == quant and c.backend != chosen):
            cell.backend = chosen
            _key_cell(spec, cell, loaded.device.type, dtype_name(loaded.dtype))


def check_keep(keep: Keep, loaded: LoadedModel, targets: dict[str, Any], tasks: list[TaskSpec]) -> None:
    """Kept positions, channels and Linears must exist: one past the end would keep nothing while the row says it
    did."""
    hidden = getattr(loaded.model.config, "hidden_size", None) or getattr(loaded.model.config, "n_embd", None)
    wide = [c for c in keep.channels if hidden is not None and c >= hidden]
    if wide:
        raise ConfigError(f"--keep-channels {','.join(map(str, wide))} is past the model's hidden size {hidden}; "
                          f"valid channels are 0..{hidden - 1} (`qharness scan` names the massive ones)")
    unmatched = keep.linears_matching_none(targets)
    if unmatched:
        examples = sorted({name.rpartition(".")[2] for name in targets})[:8]
        raise ConfigError(f"--keep-linears {','.join(unmatched)} names no Linear that a scheme quantizes; this "
                          f"model's are e.g. {', '.join(examples)}")
    windows = [task.context_length for task in tasks if task.kind == "perplexity"]
    longest = max(windows, default=None)
    far = [p for p in keep.positions if longest is not None and p >= longest]
    if far:
        raise ConfigError(f"--keep-positions {','.join(map(str, far))} is past the end of every window (the longest "
                          f"is {longest} tokens); valid positions are 0..{longest - 1}, 0 being BOS")


def check_finite(metric: Metric, cell: Cell, dtype: str) -> None:
    """A NaN or inf metric is an overflow, not a result: say so and store nothing (a rerun would skip it)."""
    if math.isfinite(metric.value):
        return
    hint = ("fp16 overflows past 65504, where massive activations live: use --dtype bf16 or fp32"
            if dtype == "fp16" else "the model's activations or the scheme's arithmetic overflowed; try --dtype fp32")
    raise QHarnessError(f"{cell.task.name} [{cell.label}]: {metric.name} came out {metric.value} in {dtype}, not "
                        f"stored; {hint}")


def _evaluate(loaded: LoadedModel, task: TaskSpec, spec: RunSpec) -> list[Metric]:
    torch.manual_seed(spec.seed)
    if task.kind == "zero-shot":
        from qharness.tasks.zeroshot import zero_shot

        return zero_shot(loaded.model, loaded.tokenizer, task, limit=spec.limit, batch_size=spec.batch_size,
                         bos=spec.bos, progress=spec.progress)
    return [perplexity(loaded.model, loaded.tokenizer, load_task_text(task), task.context_length, bos=spec.bos,
                       batch_size=spec.batch_size, limit=spec.limit, progress=spec.progress)]


def _result_row(spec: RunSpec, loaded: LoadedModel, cell: Cell, metric: Metric, fp_value: float,
                scheme: QuantScheme | None, seconds: float, run_id: str, weights: int) -> Row:
    return make_row(
        metric.value, fp_value, **_key_fields(spec, cell, metric.name, loaded.device.type, dtype_name(loaded.dtype)),
        higher_is_better=metric.higher_is_better, metric_kind=metric.kind, n=metric.n, chance=metric.chance,
        weight_bytes=weights, arch=loaded.arch, mitigation=loaded.mitigation, family=loaded.family,
        train_seed=loaded.train_seed, train_recipe=loaded.train_recipe,
        model_source=loaded.source, scheme=scheme.to_dict() if scheme else None, seed=spec.seed, run_id=run_id,
        seconds=f"{seconds:.1f}", **provenance.row_fields(loaded.device),
    )


def _layer_errors_file(spec: RunSpec, quant: str) -> Path:
    return layer_errors_path(spec.results, spec.model.name, quant, spec.keep.label)


def needs_layer_errors(spec: RunSpec, quant: str) -> bool:
    return spec.layer_errors and (spec.force or not _layer_errors_file(spec, quant).is_file())


def write_layer_errors(spec: RunSpec, loaded: LoadedModel, qmodel: Any, quant: str, context: QuantContext) -> Path:
    from qharness.activations.layer_error import layer_errors

    batches = context.calibration_batches(quant)[:4]
    entry = {"model": spec.model.name, "quant": quant, "keep": spec.keep.label,
             "layers": layer_errors(loaded.model, qmodel, batches), **provenance.row_fields(loaded.device)}
    path = _layer_errors_file(spec, quant)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(entry, indent=1) + "\n")
    return path


def transformed(spec: RunSpec, model: Any, calibration: Callable[[], list[torch.Tensor]],
                say: Callable[[str], None]) -> Any:
    """A transformed copy of the fp model (the model itself when there is no transform), checked to compute the
    same logits."""
    transform = parse_transform(spec.transform)
    if transform is None:
        return model
    say(f"transforming with {transform.label} ...")
    copied = copy.deepcopy(model)
    drift = transform_(copied, transform, calibration())
    say(f"{transform.label}: fp logits moved by {drift:.1e} of their largest magnitude")
    return copied


def run(spec: RunSpec, say: Callable[[str], None] = print) -> RunReport:
    cells, schemes = plan_cells(spec)
    done = {} if spec.force else existing_keys(spec.results)
    keys = [k for cell in cells for k in cell.row_keys.values()]
    todo = [c for c in cells if any(k not in done for k in c.row_keys.values())]
    if not todo and not any(needs_layer_errors(spec, quant) for quant in schemes):
        say(f"all {len(keys)} rows are already in {spec.results}; pass --force to recompute")
        return RunReport([done[k] for k in keys], 0, spec.model.name)

    ensure(spec.model.name, progress=spec.progress)
    say(f"loading {spec.model.name} ...")
    loaded = load_model(spec.model, progress=spec.progress)
    targets = target_linears(loaded.model)
    check_keep(spec.keep, loaded, targets, [cell.task for cell in cells])
    kv = get_kv(spec.kv)
    check_kv_model(loaded.model, kv)
    reselect_backends(spec, cells, schemes, loaded, targets)
    keys = [k for cell in cells for k in cell.row_keys.values()]
    todo = [c for c in cells if any(k not in done for k in c.row_keys.values())]
    run_id = uuid.uuid4().hex[:12]
    rows: dict[tuple[str, ...], Row] = dict(done)
    fp_values = {(c.task.name, m): float(done[k]["value"])  # baselines already measured are read, not recomputed
                 for c in cells if c.is_baseline for m, k in c.row_keys.items() if k in done}
    fp_units = {(c.task.name, m): read_units(spec.results, k)  # and so are their per-unit results (None if absent)
                for c in cells if c.is_baseline for m, k in c.row_keys.items() if k in done}

    def compute(model: LoadedModel, cell: Cell) -> None:
        say(f"evaluating {cell.task.name} [{cell.label}]")
        start = time.perf_counter()
        metrics = _evaluate(model, cell.task, spec)
        seconds = time.perf_counter() - start
        for metric in metrics:
            check_finite(metric, cell, dtype_name(model.dtype))
        scheme = schemes.get(cell.quant)
        new_rows = []
        for metric in metrics:
            if cell.is_baseline:
                fp_values[(cell.task.name, metric.name)] = metric.value
                fp_units[(cell.task.name, metric.name)] = units_of(metric)
            row = _result_row(spec, model, cell, metric, fp_values[(cell.task.name, metric.name)], scheme,
                              seconds, run_id, weight_bytes(targets, scheme))
            row.update(interval_columns(metric, fp_units.get((cell.task.name, metric.name)), cell.is_baseline,
                                        spec.seed))
            store_units(spec.results, cell.row_keys[metric.name], units_of(metric))  # before the row is written
            new_rows.append(row)
            rows[cell.row_keys[metric.name]] = row
        append_rows(spec.results, new_rows)

    length = min(CALIBRATION_LENGTH, context_limit(spec.model.name) or CALIBRATION_LENGTH)

    def calibration() -> list[torch.Tensor]:
        return calibration_batches(loaded.tokenizer, calibration_text(), length=length, bos=spec.bos,
                                   device=loaded.device)

    # transformed before anything is computed, so a model the transform refuses leaves the leaderboard untouched
    base = transformed(spec, loaded.model, calibration, say) if any(c.quant != FP for c in todo) else loaded.model
    for cell in todo:  # a missing baseline is computed first; a present one was read into fp_values above
        if cell.is_baseline:
            compute(loaded, cell)
    kv_only = [c for c in todo if c.quant == FP and c.kv]
    if kv_only:
        say(f"quantizing the KV cache only ({kv.name}) ...")
        with kv_quantized(loaded.model, kv):
            for cell in kv_only:
                compute(loaded, cell)
    for quant, scheme in schemes.items():
        quant_cells = [c for c in todo if c.quant == quant]
        if not quant_cells and not needs_layer_errors(spec, quant):
            continue
        backend = next(c.backend for c in cells if c.quant == quant)
        say(f"quantizing with {quant} [{backend}] ...")
        qmodel = copy.deepcopy(base)
        context = QuantContext(loaded.device, calibration=calibration, tokenizer=loaded.tokenizer)
        quantize_(qmodel, scheme, backend=backend, keep=spec.keep, context=context)
        quantized = loaded.with_model(qmodel)
        if needs_layer_errors(spec, quant):
            write_layer_errors(spec, loaded, qmodel, quant, context)
        with kv_quantized(qmodel, kv):
            for cell in quant_cells:
                compute(quantized, cell)
        del qmodel, quantized
        gc.collect()
    return RunReport([rows[k] for k in keys if k in rows], sum(1 for k in keys if k not in done), spec.model.name)
