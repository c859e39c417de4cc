"""One settings type: every field of `RunSettings` can be set from the command line and from a sweep file, and both
build it the same way (the checks of a value are written once, in RunSettings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qharness.cli import build_parser
from qharness.cli.run import run_settings
from qharness.core.errors import ConfigError
from qharness.experiment.settings import CLI_FLAGS, SWEEP_KEYS, RunSettings, setting_names
from qharness.experiment.sweep import SweepConfig

# field -> (a value other than the default, the argv that sets it, the sweep YAML line that sets it)
NON_DEFAULT: dict[str, tuple[object, list[str], str]] = {
    "model": ("zoo:llama-base", ["--model", "zoo:llama-base"], "models: [zoo:llama-base]"),
    "quants": (("fp8", "int4"), ["--quant", "fp8,int4"], "quants: [fp8, int4]"),
    "backend": ("torchao", ["--backend", "torchao"], "backend: torchao"),
    "tasks": (("c4",), ["--task", "c4"], "tasks: [c4]"),
    "keep_positions": ((0, 3), ["--keep-positions", "0,3"], "keep_positions: [[0, 3]]"),
    "keep_channels": ((507,), ["--keep-channels", "507"], "keep_channels: [[507]]"),
    "keep_linears": (("q_proj",), ["--keep-linears", "q_proj"], "keep_linears: [[q_proj]]"),
    "kv": ("int4-token", ["--kv", "int4-token"], "kv: [int4-token]"),
    "transform": ("rotate", ["--transform", "rotate"], "transforms: [rotate]"),
    "bos": (False, ["--no-bos"], "bos: false"),
    "limit": (3, ["--limit", "3"], "limit: 3"),
    "batch_size": (4, ["--batch-size", "4"], "batch_size: 4"),
    "seed": (7, ["--seed", "7"], "seed: 7"),
    "dtype": ("bf16", ["--dtype", "bf16"], "dtype: bf16"),
    "device": ("cpu", ["--device", "cpu"], "device: cpu"),
    "device_map": ("auto", ["--device-map", "auto"], "device_map: auto"),
    "max_memory": ({"0": "20GiB", "cpu": "64GiB"}, ["--max-memory", "0=20GiB,cpu=64GiB", "--device-map", "auto"],
                   "max_memory: {'0': 20GiB, cpu: 64GiB}\ndevice_map: auto"),
    "intervals": (False, ["--no-intervals"], "intervals: false"),
    "results": (Path("elsewhere/lb.csv"), ["--results", "elsewhere/lb.csv"], "results: elsewhere/lb.csv"),
    "force": (True, ["--force"], "force: true"),
    "layer_errors": (True, ["--layer-errors"], "layer_errors: true"),
}
NEEDS = {"max_memory": "device_map"}  # a field that means nothing without another (set beside it above)


def test_the_table_covers_every_field_and_every_value_differs_from_its_default():
    assert set(NON_DEFAULT) == set(setting_names()) == set(CLI_FLAGS) == set(SWEEP_KEYS)
    default = RunSettings()
    assert all(getattr(default, name) != value for name, (value, _, _) in NON_DEFAULT.items())


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_every_field_is_reachable_from_the_command_line(name):
    value, argv, _ = NON_DEFAULT[name]
    assert CLI_FLAGS[name] in argv
    settings = run_settings(build_parser().parse_args(["run", *argv]))
    assert getattr(settings, name) == value
    assert all(getattr(settings, other) == getattr(RunSettings(), other) for other in setting_names()
               if other not in (name, NEEDS.get(name)))


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_every_field_is_reachable_from_a_sweep_file(name, tmp_path):
    value, _, line = NON_DEFAULT[name]
    assert line.startswith(SWEEP_KEYS[name] + ":")
    base = {"models": "models: [smollm2-135m]", "quants": "quants: [int8-w8a8-token]"}
    base[line.partition(":")[0]] = line
    (tmp_path / "grid.yaml").write_text("\n".join(base.values()) + "\n")
    (settings,) = SweepConfig.from_file(tmp_path / "grid.yaml").cells()
    assert getattr(settings, name) == value
    assert all(getattr(settings, other) == getattr(RunSettings(), other) for other in setting_names()
               if other not in (name, NEEDS.get(name)))


@pytest.mark.parametrize(("change", "message"), [
    (dict(limit=0), "limit must be >= 1 window, got 0"),
    (dict(batch_size=0), "batch size must be >= 1 window per forward pass, got 0"),
    (dict(seed=-1), "run seed must be in 0..4294967295, got -1"),
    (dict(keep_linears=("q-proj",)), "kept Linears are parts of module names"),
    (dict(dtype="fp64"), "unknown dtype 'fp64'"),
])
def test_a_value_is_checked_once_for_the_command_line_and_the_sweep_alike(change, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        RunSettings(**change)
    name, value = next(iter(change.items()))
    shown = f"[{list(value)}]".replace("'", "") if isinstance(value, tuple) else value
    (tmp_path / "grid.yaml").write_text(f"models: [m]\nquants: [int8]\n{name}: {shown}\n")
    with pytest.raises(ConfigError, match="^sweep: " + message):
        SweepConfig.from_file(tmp_path / "grid.yaml")


def test_repeated_kept_positions_channels_and_linears_are_one_setting():
    once = RunSettings(keep_positions=(0,), keep_channels=(507, 3), keep_linears=("q_proj", "k_proj"))
    twice = RunSettings(keep_positions=(0, 0), keep_channels=(507, 3, 507), keep_linears=("q_proj", "k_proj", "q_proj"))
    assert twice == once and twice.keep.label == once.keep.label == "pos:0;ch:507,3;lin:q_proj,k_proj"
