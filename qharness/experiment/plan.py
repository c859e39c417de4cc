"""`plan(settings) -> Plan`: the one place a run's names are resolved and its values checked, before any weights load.

It resolves the model's source, the schemes, the KV setting, the transform, the tasks (shortened to the model's
context), the device and dtype, and the backend of each scheme (chosen once, for this device, dtype and the model's
Linear widths); it checks kept positions, channels and Linears against the tasks and the model's shapes (read from
its config, `shapes.py`), computes each cell's leaderboard key and notes which are there already. A bad name or
value raises here, so nothing is loaded or written. `execute` takes the Plan and resolves nothing again.

A sweep plans all its cells with `plan_all` before the first one runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qharness.core.errors import BackendUnavailable, ConfigError, ModelLoadError
from qharness.data.results import (
    BASELINE,
    check_writable,
    existing_keys,
    is_full_precision,
    key,
    layer_errors_path,
    make_row,
)
from qharness.experiment.settings import Origin, RunSettings, spelled
from qharness.experiment.shapes import ModelShapes, model_shapes
from qharness.models.placement import check_devices
from qharness.models.sources import classify, context_limit, dtype_name, resolve_device, resolve_dtype
from qharness.quant import (
    CALIBRATION_LENGTH,
    SCHEMES,
    Backend,
    Keep,
    KVSetting,
    QuantScheme,
    TransformSpec,
    backend_note,
    check_transform,
    get_kv,
    get_scheme,
    load_backends,
    parse_transform,
    select_backend,
    split_quants,
)
from qharness.tasks import TaskSpec, get_task
from qharness.tasks.spec import within_context

if TYPE_CHECKING:
    import torch


@dataclass
class Cell:
    """One (model state, task) evaluation; it yields one row per metric of the task."""

    quant: str  # canonical scheme name, or BASELINE
    backend: str  # the backend that runs it ("" for the baseline)
    task: TaskSpec
    task_hash: str
    transform: str = ""  # the transform's label ('' for none, and for the baseline: it is never transformed)
    row_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)  # metric -> leaderboard key
    kv: str = ""  # the KV setting's name, "" for a full-precision cache

    @property
    def is_baseline(self) -> bool:
        """The fp row every other row of the task is measured against (fp weights *and* an fp cache)."""
        return is_full_precision(self.quant, self.kv)

    @property
    def label(self) -> str:
        return self.quant + (f" kv {self.kv}" if self.kv else "")


@dataclass(frozen=True)
class Plan:
    """Everything `execute` needs, resolved: it looks up no name and checks no setting again."""

    settings: RunSettings
    device: torch.device
    dtype: torch.dtype
    keep: Keep
    schemes: dict[str, QuantScheme]  # canonical name -> scheme, in the order given
    backends: dict[str, Backend]  # canonical scheme name -> the backend that runs it, chosen once
    notes: dict[str, str]  # scheme -> a line to say before it runs (a kernel build; sim standing in on CUDA)
    kv: KVSetting | None  # None: a full-precision cache
    transform: TransformSpec | None  # None: no transform
    cells: tuple[Cell, ...]  # baseline first, then KV-only, then each scheme; each task in order
    calibration_length: int  # tokens per calibration sequence (the model's context when shorter)
    shapes: ModelShapes | None  # None: not known before loading (then checked on the loaded model)
    layer_error_files: dict[str, Path] = field(default_factory=dict)  # scheme -> its --layer-errors file
    done: frozenset[tuple[str, ...]] = frozenset()  # keys of this plan already in the leaderboard when planned
    origin: Origin = "cli"  # how messages spell a setting (a flag, or a sweep file's key)

    @property
    def keys(self) -> list[tuple[str, ...]]:
        return [k for cell in self.cells for k in cell.row_keys.values()]

    def todo(self, done: dict[tuple[str, ...], Any] | frozenset[tuple[str, ...]]) -> list[Cell]:
        """The cells with some row not in `done` (what the leaderboard holds when execution starts)."""
        return [c for c in self.cells if any(k not in done for k in c.row_keys.values())]

    def needs_layer_errors(self, quant: str) -> bool:
        path = self.layer_error_files.get(quant)
        return path is not None and (self.settings.force or not path.is_file())


def check_positions(keep: Keep, tasks: list[TaskSpec], origin: Origin) -> None:
    """A kept position past the end of every window would keep nothing while the row says it did."""
    longest = max((t.context_length for t in tasks if t.kind == "perplexity"), default=None)
    far = [p for p in keep.positions if longest is not None and p >= longest]
    if far:
        raise ConfigError(f"{spelled('keep_positions', origin)} {','.join(map(str, far))} is past the end of every "
                          f"window (the longest is {longest} tokens); valid positions are 0..{longest - 1}, 0 being "
                          "BOS")


def check_shapes(keep: Keep, shapes: ModelShapes, origin: Origin) -> None:
    """Kept channels and Linears must exist in the model, and kept Linears must leave some Linear to quantize."""
    hidden = shapes.hidden_size
    wide = [c for c in keep.channels if hidden is not None and c >= hidden]
    if wide:
        raise ConfigError(f"{spelled('keep_channels', origin)} {','.join(map(str, wide))} is past the model's hidden "
                          f"size {hidden}; valid channels are 0..{hidden - 1} (`qharness scan` names the massive ones)")
    flag = spelled("keep_linears", origin)
    examples = ", ".join(sorted({name.rpartition(".")[2] for name in shapes.linears})[:8])
    unmatched = keep.linears_matching_none(shapes.linears)
    if unmatched:
        raise ConfigError(f"{flag} {','.join(unmatched)} names no Linear that a scheme quantizes; this model's are "
                          f"e.g. {examples}")
    if keep.linears and shapes.linears and all(keep.keeps_linear(name) for name in shapes.linears):
        raise ConfigError(f"{flag} {','.join(keep.linears)} keeps all {len(shapes.linears)} Linears a scheme "
                          "quantizes, so every quantized row would be the fp model under a scheme's name; name "
                          f"fewer (this model's are e.g. {examples})")


def check_backends(plan: Plan, targets: dict[str, Any] | None) -> None:
    """Each chosen backend takes the model's Linears (widths, groups; None: not known yet, not checked): a kernel
    that skipped a ragged one would report fp numbers under its scheme's name. And a backend that cannot keep
    activations in full precision is not asked to."""
    for name, scheme in plan.schemes.items():
        backend = plan.backends[name]
        backend.check(plan.device, scheme, plan.dtype, targets)
        if plan.keep.in_activations and not backend.supports_keep:
            raise BackendUnavailable(f"backend '{backend.name}' cannot keep token positions or channels in full "
                                     "precision; use --backend sim")


def _cells(settings: RunSettings, schemes: dict[str, QuantScheme], backends: dict[str, Backend],
           kv: KVSetting | None, kv_only: bool, transform: TransformSpec | None, tasks: list[TaskSpec],
           key_of: Callable[[Cell, str], tuple[str, ...]]) -> tuple[Cell, ...]:
    hashes = {task.name: task.content_hash() for task in tasks}
    states = ([(BASELINE, "")] + ([(BASELINE, kv.name)] if kv_only else [])  # `--quant none --kv X`: fp weights,
              + [(q, kv.name if kv else "") for q in schemes])  # a quantized cache, against the true fp row
    cells = []
    for quant, kv_name in states:
        for task in tasks:
            label = transform.label if transform is not None and quant != BASELINE else ""
            backend = backends[quant].name if quant in backends else ""
            cell = Cell(quant, backend, task, hashes[task.name], label, kv=kv_name)
            cell.row_keys = {metric: key_of(cell, metric) for metric in task.metrics}
            cells.append(cell)
    return tuple(cells)


def key_fields(settings: RunSettings, keep: Keep, cell: Cell, metric: str, device_type: str,
               dtype: str) -> dict[str, object]:
    """The columns that name the experiment a row answers (results.KEY_COLUMNS)."""
    task = cell.task
    return {
        "model": settings.model, "quant": cell.quant, "backend": cell.backend,
        "keep": "" if cell.quant == BASELINE else keep.label, "kv": cell.kv, "transform": cell.transform,
        "task": task.name, "task_hash": cell.task_hash, "metric": metric, "bos": settings.bos,
        "context_length": task.context_length if task.kind == "perplexity" else None,
        "limit": settings.limit, "dtype": dtype, "device_type": device_type,
    }


HUB_PROBE_SECONDS = 3.0


def check_hub_reachable(name: str, kind: str) -> None:
    """A hub model whose config is not in the local hub cache must be fetched: with the hub switched off or out of
    reach, say so now instead of after transformers' 30-50 s of retries."""
    if kind not in ("hub", "pairs"):
        return
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline:
        raise ModelLoadError(f"model '{name}' is on the Hugging Face hub and not in the local hub cache, but "
                             "HF_HUB_OFFLINE is set; unset it to download the model, or pass a local folder or "
                             ".gguf file")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # the hub is reached through a proxy: a direct connection says nothing about it
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        raise ModelLoadError(f"model '{name}' is on the Hugging Face hub and not in the local hub cache, and {host} "
                             f"cannot be reached within {HUB_PROBE_SECONDS:g} s ({exc.strerror or type(exc).__name__}"
                             "); connect to the internet, or pass a local folder or .gguf file") from None


def placed_backend(settings: RunSettings, origin: Origin) -> str:
    """The backend asked for, or sim with --device-map: a library kernel packs weights in GPU memory when it
    quantizes, and weights accelerate offloaded to CPU memory or disk have none to pack; sim quantizes them as they
    load for each forward (quant/sim.py)."""
    if settings.device_map is None or settings.backend in ("auto", "sim"):
        return "sim" if settings.device_map is not None else settings.backend
    raise ConfigError(f"{spelled('backend', origin)} {settings.backend} packs weights in GPU memory, which a model "
                      f"spread by {spelled('device_map', origin)} does not hold whole; use --backend sim (or auto) "
                      f"with {spelled('device_map', origin)}")


def plan(settings: RunSettings, origin: Origin = "cli",
         shapes_of_model: Callable[[str], ModelShapes | None] | None = None) -> Plan:
    """Resolve and check `settings` (see the module). `origin` is how messages spell a setting (a flag or a sweep
    key); `shapes_of_model` (default `model_shapes`) lets a sweep read each model's shapes once."""
    kind = classify(settings.model)
    check_writable(settings.results)
    keep = settings.keep
    kv = get_kv(settings.kv)
    quants, kv_only = split_quants(settings.quants, kv, bool(keep))
    schemes = {SCHEMES.resolve(q): get_scheme(q) for q in quants}
    shapes = (shapes_of_model or model_shapes)(settings.model)
    if shapes is None:  # its config is not cached: loading would fetch it
        check_hub_reachable(settings.model, kind)
    limit = context_limit(settings.model) or (shapes.max_positions if shapes else None)
    tasks = [within_context(get_task(name), limit) for name in settings.tasks]
    check_positions(keep, tasks, origin)
    if shapes is not None:
        check_shapes(keep, shapes, origin)
    device = resolve_device(settings.device)  # type: ignore[arg-type]
    dtype = resolve_dtype(settings.dtype, device)  # type: ignore[arg-type]
    check_devices(settings.max_memory, device, spelled("max_memory", origin))
    chosen = placed_backend(settings, origin)
    targets = shapes.meta_linears() if shapes is not None else None  # None: widths checked once loaded
    registry = load_backends()
    backends = {name: registry.get(select_backend(scheme, device, chosen, dtype=dtype, targets=targets))
                for name, scheme in schemes.items()}
    transform = parse_transform(settings.transform)
    if transform is not None and not schemes:  # the KV-only cell runs on the untransformed model
        raise ConfigError(f"{spelled('transform', origin)} {transform.label} rewrites the model before its Linears "
                          f"are quantized, but {spelled('quants', origin)} {BASELINE} quantizes none, so no row "
                          "would be transformed; name a scheme too (e.g. --quant none,int8) or drop --transform")
    if transform is not None:
        check_transform(transform, keep.channels, {name: b.name for name, b in backends.items()})

    def key_of(cell: Cell, metric: str) -> tuple[str, ...]:
        return key(make_row(**key_fields(settings, keep, cell, metric, device.type, dtype_name(dtype))))

    cells = _cells(settings, schemes, backends, kv, kv_only, transform, tasks, key_of)
    layer_files = ({name: layer_errors_path(settings.results, settings.model, name, keep.label) for name in schemes}
                   if settings.layer_errors else {})
    present = {} if settings.force else existing_keys(settings.results)
    notes = {name: note for name, scheme in schemes.items()
             if (note := backend_note(backends[name].name, scheme, device, chosen))}
    result = Plan(settings, device, dtype, keep, schemes, backends, notes, kv, transform, cells,
                  calibration_length=min(CALIBRATION_LENGTH, limit or CALIBRATION_LENGTH), shapes=shapes,
                  layer_error_files=layer_files,
                  done=frozenset(k for cell in cells for k in cell.row_keys.values() if k in present), origin=origin)
    check_backends(result, targets)
    return result


def plan_all(cells: list[RunSettings], origin: Origin = "sweep") -> list[Plan]:
    """Every cell planned before any runs: a bad one anywhere refuses the whole list, nothing loaded or written.
    Each model's shapes are read once."""
    shapes: dict[str, ModelShapes | None] = {}

    def cached(name: str) -> ModelShapes | None:
        if name not in shapes:
            shapes[name] = model_shapes(name)
        return shapes[name]

    return [plan(settings, origin, cached) for settings in cells]
