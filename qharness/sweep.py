"""`qharness sweep CONFIG.yaml`: a grid of models x schemes x tasks (x kept positions), resumable.

Each model (and kept-positions variant) is one `runner.run`: its fp baseline is computed once, cells already in the
leaderboard are skipped, and every finished cell is written at once, so a crash or Ctrl-C loses at most the cell
in flight. `engine: local` (default) runs the groups one after another in this process; `engine: ray` fans them
out as Ray tasks (a local Ray instance, or the cluster `ray.init` finds), safe because leaderboard writes are
atomic and locked.

    models: [smollm2-135m, path/to/other]
    quants: [int8, int8-w8a8-tensor, fp8, int4]
    tasks: [kjv-heldout, wordnet-heldout]
    tasks_for: {smollm2-135m: [kjv-heldout]}   # optional: other tasks for the models named
    keep_positions: [[], [0]]     # optional: also each scheme with BOS in full precision
    keep_linears: [[], [q_proj, k_proj, v_proj]]  # optional: also each scheme with these Linears in fp
    kv: [none, int4-kivi+keep0]   # optional: also each scheme with a quantized KV cache (`qharness list kv`)
    transforms: ['', rotate]      # optional: also each scheme after a transform (`qharness list transforms`)
    limit: 2                      # optional: windows / items per task
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

from qharness.errors import BackendUnavailable, ConfigError
from qharness.models.sources import ModelSpec
from qharness.quant.schemes import Keep
from qharness.results import scan_dir
from qharness.runner import DEFAULT_TASKS, RunReport, RunSpec, run
from qharness.typecheck import from_mapping, read_yaml_mapping

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class SweepConfig:
    models: tuple[str, ...]
    quants: tuple[str, ...]
    tasks: tuple[str, ...] = DEFAULT_TASKS
    tasks_for: dict[str, tuple[str, ...]] = field(default_factory=dict)  # model -> its own task list
    keep_positions: tuple[tuple[int, ...], ...] = ((),)
    keep_linears: tuple[tuple[str, ...], ...] = ((),)  # each a list of Linear names left in fp, as --keep-linears
    kv: tuple[str, ...] = ("none",)  # KV-cache settings, each a run of its own
    transforms: tuple[str, ...] = ("",)  # '' for none, or a --transform value
    limit: int | None = None
    batch_size: int = 1
    dtype: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    results: str = "results/leaderboard.csv"
    engine: str = "local"
    scan: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown sweep engine '{self.engine}'; valid: {', '.join(ENGINES)}")
        if not self.models or not self.quants:
            raise ConfigError("a sweep needs at least one model and one quant")
        if not self.kv:
            raise ConfigError("sweep kv is an empty list; give at least one setting (none: a full-precision cache)")
        if not self.transforms:  # the grid would hold no run at all
            raise ConfigError("sweep transforms is an empty list; give at least one ('' or none: no transform)")
        if not self.keep_positions:
            raise ConfigError("sweep keep_positions is an empty list; give at least one ([]: no position kept)")
        if not self.keep_linears:
            raise ConfigError("sweep keep_linears is an empty list; give at least one ([]: every Linear quantized)")
        Keep(linears=tuple(name for names in self.keep_linears for name in names))  # names checked before a model
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"sweep limit must be >= 1 window, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"sweep batch_size must be >= 1, got {self.batch_size}")
        strays = sorted(set(self.tasks_for) - set(self.models))
        if strays:
            raise ConfigError(f"tasks_for names {strays}, which are not in the sweep's models")

    @classmethod
    def from_file(cls, path: Path) -> SweepConfig:
        """Read and check the whole file (syntax, keys, every value's type) before anything loads."""
        if not path.is_file():
            raise ConfigError(f"sweep config not found: {path}")
        raw = read_yaml_mapping(path, "a sweep config is a mapping of keys (models, quants, tasks, ...)")
        return cls(**from_mapping(cls, raw, str(path)))

    def run_specs(self) -> list[RunSpec]:
        return [
            RunSpec(model=ModelSpec(model, dtype=self.dtype, device=self.device), quants=self.quants,
                    tasks=self.tasks_for.get(model, self.tasks), backend=self.backend,
                    keep=Keep(positions, linears=linears), limit=self.limit, batch_size=self.batch_size,
                    results=Path(self.results), progress=False, kv=kv, transform=transform)
            for model in self.models for positions in self.keep_positions for linears in self.keep_linears
            for kv in self.kv for transform in self.transforms
        ]


@dataclass
class SweepReport:
    reports: list[RunReport] = field(default_factory=list)

    @property
    def computed(self) -> int:
        return sum(r.computed for r in self.reports)


def _scan_once(spec: RunSpec, say: Callable[[str], Any]) -> None:
    """The model's activation profile for the report, unless one is already there."""
    from qharness.scanning import ScanSpec, profile_dir, run_scan

    scan_spec = ScanSpec(model=spec.model, out_dir=scan_dir(spec.results), results=spec.results, progress=False)
    if (profile_dir(scan_spec) / "profile.json").exists():
        return
    say(f"scan {spec.model.name}")
    run_scan(scan_spec, say=lambda m: None)


def _run_group(specs: list[RunSpec], scan: bool = False) -> list[RunReport]:
    """One model's runs, in order: its fp baseline is computed by the first and read back by the others."""
    reports = [run(spec, say=lambda message: None) for spec in specs]
    if scan:
        _scan_once(specs[0], say=lambda message: None)
    return reports


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


def _run_ray(specs: list[RunSpec], scan: bool) -> list[RunReport]:
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailable("sweep engine 'ray' needs ray: pip install -c constraints.txt 'ray[default]'") from exc
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)
    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.model.name, []).append(spec)
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    remote_group = ray.remote(_run_group)
    futures = [remote_group.options(num_gpus=gpus_per_task(group[0].model.device, cluster_gpus)).remote(group, scan)
               for group in groups.values()]
    return [report for reports in ray.get(futures) for report in reports]


def sweep(config: SweepConfig, say: Callable[[str], Any] = print) -> SweepReport:
    specs = config.run_specs()
    from qharness.runner import plan_cells

    for spec in specs:  # every name is checked before any work starts
        plan_cells(spec)
    if config.engine == "ray":
        return SweepReport(_run_ray(specs, config.scan))
    report = SweepReport()
    for i, spec in enumerate(specs, 1):
        say(f"[{i}/{len(specs)}] {spec.model.name}" + (f" keep {spec.keep.label}" if spec.keep else "")
            + (f" kv {spec.kv}" if spec.kv != "none" else "")
            + (f" transform {spec.transform}" if spec.transform else ""))
        report.reports.append(run(spec, say=say))
        last_of_model = i == len(specs) or specs[i].model.name != spec.model.name
        if config.scan and last_of_model:
            _scan_once(spec, say)
    return report
