"""`qharness sweep CONFIG.yaml`: a grid of models x schemes x tasks (x kept positions), resumable.

Each combination of the axes is one `RunSettings`, and every one is planned (`experiment.plan_all`) before the first
runs, so a bad cell anywhere refuses the whole grid with nothing written. Then each is executed, each model loaded
once for all its cells and its scan (every scheme is undone after its cells): a model's fp baseline is computed
once, cells already in the leaderboard are skipped, and every finished cell is written at once, so a crash or Ctrl-C
loses at most the cell in flight. `engine: local` (default) runs them one after another in this process; `engine:
ray` fans each model's runs out as a Ray task (a local Ray instance, or the cluster `ray.init` finds), safe because
leaderboard writes are atomic and locked.

    models: [smollm2-135m, path/to/other]
    quants: [int8, int8-w8a8-tensor, fp8, int4]
    tasks: [kjv-heldout, wordnet-heldout]
    tasks_for: {smollm2-135m: [kjv-heldout]}   # optional: other tasks for the models named
    keep_positions: [[], [0]]     # optional: also each scheme with BOS in full precision
    keep_channels: [[], [507]]    # optional: also each scheme with these hidden channels in full precision
    keep_linears: [[], [q_proj, k_proj, v_proj]]  # optional: also each scheme with these Linears in fp
    kv: [none, int4-kivi+keep0]   # optional: also each scheme with a quantized KV cache (`qharness list kv`)
    transforms: ['', rotate]      # optional: also each scheme after a transform (`qharness list transforms`)
    limit: 2                      # optional: windows / items per task
    # optional, the same in every cell, as the `qharness run` flags of the same name: backend, bos, batch_size,
    # seed, dtype, device, device_map, max_memory, layer_errors, force, intervals
    results: results/leaderboard.csv
    engine: local                 # or ray
    scan: true                    # optional: also `qharness scan` each model (profile next to the results),
                                  # skipped when its profile exists; `qharness compare` correlates with these
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qharness.core.errors import BackendUnavailable, ConfigError
from qharness.core.typecheck import from_mapping, read_yaml_mapping
from qharness.data.results import SCAN_TASK, read_rows, scan_dir
from qharness.experiment.execute import RunReport, execute, load_fp, needs_model
from qharness.experiment.plan import Plan, plan_all
from qharness.experiment.settings import DEFAULT_TASKS, RunSettings
from qharness.models.sources import LoadedModel

ENGINES = ("local", "ray")
_DEFAULT = RunSettings()


@dataclass(frozen=True)
class SweepConfig:
    """A grid of runs. The plural keys are its axes (every combination is one `RunSettings`); the others are the
    same in every cell and mean what the `RunSettings` field of their name means."""

    models: tuple[str, ...]
    quants: tuple[str, ...]
    tasks: tuple[str, ...] = DEFAULT_TASKS
    tasks_for: dict[str, tuple[str, ...]] = field(default_factory=dict)  # model -> its own task list
    keep_positions: tuple[tuple[int, ...], ...] = ((),)
    keep_channels: tuple[tuple[int, ...], ...] = ((),)  # each a list of hidden channels kept, as --keep-channels
    keep_linears: tuple[tuple[str, ...], ...] = ((),)  # each a list of Linear names left in fp, as --keep-linears
    kv: tuple[str, ...] = ("none",)  # KV-cache settings, each a run of its own
    transforms: tuple[str, ...] = ("",)  # '' for none, or a --transform value
    backend: str = _DEFAULT.backend
    bos: bool = _DEFAULT.bos
    limit: int | None = _DEFAULT.limit
    batch_size: int = _DEFAULT.batch_size
    seed: int = _DEFAULT.seed
    dtype: str = _DEFAULT.dtype
    device: str = _DEFAULT.device
    device_map: str | None = _DEFAULT.device_map
    max_memory: dict[str, str] | None = _DEFAULT.max_memory
    intervals: bool = _DEFAULT.intervals
    results: str = str(_DEFAULT.results)
    force: bool = _DEFAULT.force
    layer_errors: bool = _DEFAULT.layer_errors
    engine: str = "local"
    scan: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown sweep engine '{self.engine}'; valid: {', '.join(ENGINES)}")
        if not self.models or not self.quants:
            raise ConfigError("a sweep needs at least one model and one quant")
        for axis, empty in (("kv", "none: a full-precision cache"), ("transforms", "'' or none: no transform"),
                            ("keep_positions", "[]: no position kept"), ("keep_channels", "[]: no channel kept"),
                            ("keep_linears", "[]: every Linear quantized")):
            if not getattr(self, axis):  # the grid would hold no run at all
                raise ConfigError(f"sweep {axis} is an empty list; give at least one ({empty})")
        strays = sorted(set(self.tasks_for) - set(self.models))
        if strays:
            raise ConfigError(f"tasks_for names {strays}, which are not in the sweep's models")
        self.cells()  # each cell's values checked here (limit, batch size, kept names...): written once, in RunSettings

    @classmethod
    def from_file(cls, path: Path) -> SweepConfig:
        """Read and check the whole file (syntax, keys, every value's type) before anything loads."""
        if not path.is_file():
            raise ConfigError(f"sweep config not found: {path}")
        raw = read_yaml_mapping(path, "a sweep config is a mapping of keys (models, quants, tasks, ...)")
        return cls(**from_mapping(cls, raw, str(path)))

    def cells(self) -> list[RunSettings]:
        """One `RunSettings` per combination of the axes, each model's runs together (its baseline first)."""
        same = {name: getattr(self, name) for name in ("quants", "backend", "bos", "limit", "batch_size", "seed",
                                                       "dtype", "device", "device_map", "max_memory", "intervals",
                                                       "force", "layer_errors")}
        try:
            return [
                RunSettings(model=model, tasks=self.tasks_for.get(model, self.tasks), keep_positions=positions,
                            keep_channels=channels, keep_linears=linears, kv=kv, transform=transform,
                            results=Path(self.results), **same)
                for model in self.models for positions in self.keep_positions for channels in self.keep_channels
                for linears in self.keep_linears for kv in self.kv for transform in self.transforms
            ]
        except ConfigError as exc:
            raise ConfigError(f"sweep: {exc}") from None


@dataclass
class SweepReport:
    reports: list[RunReport] = field(default_factory=list)

    @property
    def computed(self) -> int:
        return sum(r.computed for r in self.reports)


def _scan_once(settings: RunSettings, say: Callable[[str], Any], loaded: LoadedModel | None = None) -> None:
    """The model's activation profile for the report, unless it is there with its rows in this leaderboard (two
    leaderboards in one folder share the profiles: the second still needs the rows); on `loaded` when the model's
    runs loaded it."""
    from qharness.experiment.scanning import ScanSpec, profile_dir, run_scan

    scan_spec = ScanSpec(model=settings.model_spec, out_dir=scan_dir(settings.results), results=settings.results,
                         progress=False)
    rows = read_rows(settings.results) if settings.results.exists() else []
    has_rows = any(r["model"] == settings.model and r["task"] == SCAN_TASK
                   and r.get("bos", "") == str(scan_spec.config.bos) for r in rows)
    if has_rows and (profile_dir(scan_spec) / "profile.json").exists():
        return
    say(f"scan {settings.model}")
    run_scan(scan_spec, say=lambda m: None, loaded=loaded)


def run_model(plans: list[Plan], scan: bool, say: Callable[[str], Any] = lambda m: None,
              first: int = 1, total: int | None = None) -> list[RunReport]:
    """One model's runs, in order, on the model loaded once for all of them (each scheme is undone after its cells,
    so every run finds it in its fp state): its fp baseline is computed by the first and read back by the others.
    Loaded only when some run has cells to compute (or the scan has no profile or no rows here yet)."""
    loaded: LoadedModel | None = None
    reports = []
    for i, p in enumerate(plans, first):
        say(f"[{i}/{total or len(plans)}] {_cell_label(p.settings)}")
        if loaded is None and needs_model(p):
            loaded = load_fp(p, say, progress=False)
        reports.append(execute(p, say=say, progress=False, loaded=loaded))
    if scan:
        _scan_once(plans[0].settings, say, loaded)
    return reports


def _by_model(plans: list[Plan]) -> list[list[Plan]]:
    """The plans of each model together, in the order the grid lists them (cells() keeps a model's runs together)."""
    groups: dict[str, list[Plan]] = {}
    for p in plans:
        groups.setdefault(p.settings.model, []).append(p)
    return list(groups.values())


def gpus_per_task(device: str, cluster_gpus: float) -> int:
    """The GPUs one Ray task asks for: 1 when the run's device is CUDA ('cuda', or 'auto' on a cluster with GPUs),
    else 0. Ray hides every GPU from a task that asks for none (an empty CUDA_VISIBLE_DEVICES), so without this a
    sweep on a GPU machine silently ran on the CPU ('auto') or failed ('cuda'). One GPU per task also means one
    model per GPU at a time, the others queue, instead of all of them sharing (and running out of) one GPU."""
    if device == "cpu":
        return 0
    if cluster_gpus >= 1:
        return 1
    if device == "cuda":  # asking Ray for a GPU it does not have would leave the task pending forever
        raise BackendUnavailable("sweep device 'cuda' but the Ray cluster has no GPU; set device: cpu or auto, "
                                 "or start Ray where GPUs are visible (ray.init(num_gpus=...))")
    return 0


def _run_ray(plans: list[Plan], scan: bool) -> list[RunReport]:
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailable("sweep engine 'ray' needs ray: pip install -c constraints.txt 'ray[default]'") from exc
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    remote_group = ray.remote(run_model)
    futures = [remote_group.options(num_gpus=gpus_per_task(group[0].settings.device, cluster_gpus)).remote(group, scan)
               for group in _by_model(plans)]
    return [report for reports in ray.get(futures) for report in reports]


def _cell_label(settings: RunSettings) -> str:
    keep = settings.keep
    return (settings.model + (f" keep {keep.label}" if keep else "")
            + (f" kv {settings.kv}" if settings.kv != "none" else "")
            + (f" transform {settings.transform}" if settings.transform else ""))


def sweep(config: SweepConfig, say: Callable[[str], Any] = print) -> SweepReport:
    plans = plan_all(config.cells())  # every cell resolved and checked before the first one runs
    if config.engine == "ray":
        return SweepReport(_run_ray(plans, config.scan))
    report = SweepReport()
    done = 0
    for group in _by_model(plans):
        report.reports.extend(run_model(group, config.scan, say, first=done + 1, total=len(plans)))
        done += len(group)
    return report
