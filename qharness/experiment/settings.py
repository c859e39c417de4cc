"""The settings of one run, declared once. `qharness run` builds a `RunSettings` from its flags and a sweep builds one
per cell of its grid; `plan` resolves it and `execute` runs the plan.

A setting is one field here, with its comment. The command line names it in `CLI_FLAGS` (and
cli.run.add_arguments adds the flag), a sweep file in `SWEEP_KEYS` (and sweep.SweepConfig has the key);
tests/experiment/test_settings.py sets every field through both and fails for one that either cannot reach. Checks
of a value alone live in `__post_init__`; checks that need a registry, the leaderboard or the model's shapes live in
the plan. Lists of kept positions, channels and Linears are normalised here (duplicates dropped, first order kept),
so `0,0` and `0` are one row key.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from qharness.core.errors import ConfigError
from qharness.data.recipe import check_seed

if TYPE_CHECKING:
    from qharness.models.sources import ModelSpec
    from qharness.quant.schemes import Keep

DEFAULT_TASKS = ("kjv-heldout", "wordnet-heldout")
DEFAULT_RESULTS = Path("results/leaderboard.csv")
Origin = Literal["cli", "sweep"]


def _unique(values: tuple) -> tuple:
    """`values` without repeats, in first-seen order (the order is part of the keep label old rows were keyed by)."""
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class RunSettings:
    model: str = "smollm2-135m"  # built-in | zoo:<arch>-<mitigation> | tune: | pair: | folder | file.gguf | hub id
    quants: tuple[str, ...] = ("int8-w8a8-token",)  # scheme names or aliases; the fp baseline is implied
    backend: str = "auto"  # auto: real kernels on CUDA, sim on CPU; or a backend name for every scheme
    tasks: tuple[str, ...] = DEFAULT_TASKS
    keep_positions: tuple[int, ...] = ()  # token positions left in full precision (the causal check; 0 is BOS)
    keep_channels: tuple[int, ...] = ()  # hidden channels left in full precision in the Linears reading them
    keep_linears: tuple[str, ...] = ()  # Linears left unquantized, by a part of their name (q_proj)
    kv: str = "none"  # KV-cache setting of every quantized cell (`qharness list kv`); none: a full-precision cache
    transform: str = ""  # applied to the fp model before each scheme: '' (none), 'smoothquant:0.5', 'rotate'
    bos: bool = True  # prepend BOS to every window (the paper's setting)
    limit: int | None = None  # evaluate only the first N windows (or items) of each task
    batch_size: int = 1  # windows per forward pass (the numbers do not change)
    seed: int = 0  # the evaluation seed (zero-shot sampling, calibration order)
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on CUDA) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    device_map: str | None = None  # accelerate's device map ("auto"): a model larger than one device spread over
    # GPUs, CPU memory and disk (models/placement.py); the numbers are the same as on one device
    max_memory: dict[str, str] | None = None  # per device ("0": "20GiB", "cpu": "64GiB", "disk") with device_map
    intervals: bool = True  # the ci_* columns (units.py): each fp row's interval, each quantized row's paired one
    results: Path = DEFAULT_RESULTS  # the leaderboard CSV the rows are appended to
    force: bool = False  # recompute cells that are already in the leaderboard
    layer_errors: bool = False  # also write each scheme's per-layer output error (results/layers/) for compare

    def __post_init__(self) -> None:
        for name in ("keep_positions", "keep_channels", "keep_linears"):
            object.__setattr__(self, name, _unique(tuple(getattr(self, name))))
        object.__setattr__(self, "results", Path(self.results))
        self.keep  # noqa: B018 - Keep checks its own values (negative positions, names that are no module name)
        self.model_spec  # noqa: B018 - and ModelSpec the dtype and device names
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1 window, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1 window per forward pass, got {self.batch_size}")
        check_seed(self.seed, "run")
        if not self.tasks:
            raise ConfigError("no task given; name at least one task (`qharness list tasks`)")
        if not self.quants:
            raise ConfigError("no scheme given; name at least one (`qharness list quants`), or none for the baseline")
        if self.layer_errors and self.transform.strip() not in ("", "none"):
            raise ConfigError("--layer-errors compares each layer with the untransformed fp model, whose layers a "
                              "transform changes by design (only the logits are kept); drop one of --layer-errors "
                              "and --transform")
        if self.device_map is not None and (self.layer_errors or self.transform.strip() not in ("", "none")):
            what = "--layer-errors compares with" if self.layer_errors else "--transform rewrites"
            raise ConfigError(f"{what} a second copy of the model, which a model spread by --device-map has no room "
                              "for; drop --device-map or that setting")

    @property
    def keep(self) -> Keep:
        from qharness.quant.schemes import Keep

        return Keep(self.keep_positions, self.keep_channels, self.keep_linears)

    @property
    def model_spec(self) -> ModelSpec:
        from qharness.models.sources import ModelSpec

        return ModelSpec(self.model, dtype=self.dtype, device=self.device,  # type: ignore[arg-type]
                         device_map=self.device_map, max_memory=self.max_memory)


# How each origin spells a setting, for messages that name what the user wrote.
CLI_FLAGS: dict[str, str] = {
    "model": "--model", "quants": "--quant", "backend": "--backend", "tasks": "--task",
    "keep_positions": "--keep-positions", "keep_channels": "--keep-channels", "keep_linears": "--keep-linears",
    "kv": "--kv", "transform": "--transform", "bos": "--no-bos", "limit": "--limit", "batch_size": "--batch-size",
    "seed": "--seed", "dtype": "--dtype", "device": "--device", "device_map": "--device-map",
    "max_memory": "--max-memory", "intervals": "--no-intervals", "results": "--results", "force": "--force",
    "layer_errors": "--layer-errors",
}
SWEEP_KEYS: dict[str, str] = {  # grid axes are plural lists in a sweep file (models, transforms, keep_positions)
    **{name: name for name in CLI_FLAGS}, "model": "models", "transform": "transforms",
}


def spelled(name: str, origin: Origin) -> str:
    """How the user wrote setting `name`: `--keep-linears` on the command line, `keep_linears` in a sweep file."""
    return (CLI_FLAGS if origin == "cli" else SWEEP_KEYS)[name]


def setting_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(RunSettings))

