"""models/placement.py: a model spread by accelerate over devices and disk computes the numbers it computes whole.

On the CPU, `max_memory={"cpu": ...}` small enough sends the second decoder layer (and the head) to disk: its weights
sit on `meta` and load for each forward, which is the path a model larger than its GPUs takes too.
"""

from __future__ import annotations

import math

import pytest

from qharness.core.errors import ConfigError
from qharness.experiment.runner import run
from qharness.experiment.settings import RunSettings
from qharness.models.sources import ModelSpec, load_model

OFF_DISK = {"cpu": "400KB"}  # the tiny Llama: embeddings and layer 0 fit, layer 1 and the head go to disk


def test_max_memory_sends_a_decoder_layer_to_disk(tiny_model_dir):
    loaded = load_model(ModelSpec(str(tiny_model_dir), device="cpu", device_map="auto", max_memory=OFF_DISK),
                        progress=False)
    assert loaded.placement.device_map["model.layers.1"] == "disk"
    assert loaded.model.model.layers[1].mlp.up_proj.weight.device.type == "meta"
    assert loaded.device.type == "cpu"


def test_a_checkpoint_is_read_straight_onto_its_devices(tiny_model_dir, monkeypatch):
    """A folder's weights go from their safetensors file to the device the map gives them: the whole model is never
    read into CPU memory first (dispatch_, the read-then-spread path, is not called), so a model larger than CPU
    memory loads; the map is the one planned for the model read whole."""
    import torch

    from qharness.models import placement
    from qharness.models.loading import load_pretrained

    whole, _ = load_pretrained(str(tiny_model_dir), torch.float32)
    planned = placement.device_map_for(whole, "auto", OFF_DISK, torch.device("cpu"), torch.float32)

    def whole_first(*args, **kwargs):
        raise AssertionError("the checkpoint was read whole, then spread")

    monkeypatch.setattr(placement, "dispatch_", whole_first)
    loaded = load_model(ModelSpec(str(tiny_model_dir), device="cpu", device_map="auto", max_memory=OFF_DISK),
                        progress=False)
    assert loaded.placement.device_map == planned and planned["model.layers.1"] == "disk"
    assert loaded.model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    assert loaded.source == f"local:{tiny_model_dir.resolve()}"


def _values(settings: RunSettings) -> dict[tuple[str, str, str], float]:
    report = run(settings, say=lambda m: None, progress=False)
    assert report.computed == len(report.rows)
    return {(row["quant"], row["kv"], row["metric"]): float(row["value"]) for row in report.rows}


@pytest.mark.parametrize("extra", [
    {"quants": ("int8-w8a8-token", "int8-w8a8-tensor-static", "int4-weight-g128")},
    {"quants": ("int8-w8a8-tensor",), "kv": "int4-token"},
    {"quants": ("int8-w8a8-tensor",), "keep_positions": (0,)},
], ids=["dynamic-static-weight", "kv", "keep-positions"])
def test_run_with_a_device_map_gives_the_same_numbers(tiny_model_dir, tiny_task_dir, tmp_path, extra):
    """fp, a dynamic and a static (calibrated) sim scheme, a weight-only one, a quantized KV cache and a kept BOS:
    every row equal to the run on one device, while a decoder layer was on disk."""
    common = {"model": str(tiny_model_dir), "tasks": (str(tiny_task_dir / "short.yaml"),), "device": "cpu",
              "limit": 3, **extra}
    whole = _values(RunSettings(results=tmp_path / "whole.csv", **common))
    placed = _values(RunSettings(results=tmp_path / "placed.csv", device_map="auto", max_memory=OFF_DISK, **common))
    assert whole.keys() == placed.keys() and len(whole) == 1 + len(extra["quants"])
    for cell, value in whole.items():
        assert math.isfinite(value)
        assert placed[cell] == pytest.approx(value, rel=1e-6, abs=0), cell
    assert len(set(whole.values())) == len(whole)  # each scheme moved the number: the comparison has teeth


@pytest.mark.gpu
def test_a_model_over_the_gpu_cpu_and_disk_gives_the_numbers_of_one_gpu(tiny_model_dir, tiny_task_dir, tmp_path):
    """On CUDA: the model spread over the GPU and CPU memory or disk (every forward computes on the GPU, offloaded
    weights moved in by their hooks), read straight onto those devices: each row equal to the whole model on the
    GPU, dynamic, static and weight-only sim schemes. (The map accelerate makes on a GPU could not be planned on a
    machine without one; the test asserts it spans more than the GPU.)"""
    common = {"model": str(tiny_model_dir), "tasks": (str(tiny_task_dir / "short.yaml"),), "device": "cuda",
              "limit": 3, "quants": ("int8-w8a8-token", "int8-w8a8-tensor-static", "int4-weight-g128")}
    whole = _values(RunSettings(results=tmp_path / "whole.csv", **common))
    spread = {"0": "300KB", "cpu": "400KB"}
    loaded = load_model(ModelSpec(str(tiny_model_dir), device="cuda", device_map="auto", max_memory=spread),
                        progress=False)
    assert len(set(loaded.placement.device_map.values())) > 1, loaded.placement.device_map
    assert loaded.device.type == "cuda"
    placed = _values(RunSettings(results=tmp_path / "placed.csv", device_map="auto", max_memory=spread, **common))
    assert whole.keys() == placed.keys()
    for cell, value in whole.items():
        assert placed[cell] == pytest.approx(value, rel=1e-5, abs=0), cell


def test_scan_with_a_device_map_gives_the_same_profile(tiny_model_dir, tmp_path):
    from qharness.activations.scan import ScanConfig
    from qharness.experiment.scanning import ScanSpec, run_scan

    def profile(**placement):
        spec = ScanSpec(model=ModelSpec(str(tiny_model_dir), device="cpu", **placement),
                        config=ScanConfig(sequences=2, length=32), intervention_task=None,
                        out_dir=tmp_path / str(bool(placement)), results=tmp_path / f"{bool(placement)}.csv",
                        progress=False)
        return run_scan(spec, say=lambda m: None)

    whole, placed = profile(), profile(device_map="auto", max_memory=OFF_DISK)
    assert [e.max for e in placed.layers] == pytest.approx([e.max for e in whole.layers], rel=1e-6)
    assert [e.kurtosis for e in placed.layers] == pytest.approx([e.kurtosis for e in whole.layers], rel=1e-5)
    assert placed.summary.max == pytest.approx(whole.summary.max, rel=1e-6)


def test_an_offloaded_model_is_restored_after_each_scheme(tiny_model_dir, tiny_task_dir, tmp_path):
    """After a run, the placed model's Linears are its own again, still hooked and on `meta` where offloaded: the
    fp row of a second run over the same loaded model would be the first's."""
    from qharness.experiment.execute import load_checked
    from qharness.experiment.plan import plan

    settings = RunSettings(model=str(tiny_model_dir), tasks=(str(tiny_task_dir / "short.yaml"),), device="cpu",
                           limit=2, device_map="auto", max_memory=OFF_DISK, results=tmp_path / "lb.csv")
    loaded, _ = load_checked(plan(settings), say=lambda m: None, progress=False)
    up = loaded.model.model.layers[1].mlp.up_proj
    from qharness.experiment.execute import execute

    execute(plan(settings), say=lambda m: None, progress=False, loaded=loaded)
    assert loaded.model.model.layers[1].mlp.up_proj is up and hasattr(up, "_hf_hook")
    assert up.weight.device.type == "meta"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device_map": "everywhere"}, "^device map 'everywhere' is not a device map; valid: auto, balanced"),
    ({"max_memory": {"cpu": "1GiB"}}, "^max memory limits each device .* it needs device map auto"),
    ({"device_map": "auto", "max_memory": {"gpu0": "1GiB"}}, "^max memory device 'gpu0' is not one accelerate"),
    ({"device_map": "auto", "max_memory": {"cpu": "lots"}}, "^max memory cpu=lots is not an amount"),
    ({"device_map": "auto", "layer_errors": True}, "^--layer-errors compares with a second copy"),
    ({"device_map": "auto", "transform": "rotate"}, "^--transform rewrites a second copy"),
])
def test_bad_placement_is_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RunSettings(**kwargs)


def test_plan_refuses_a_gpu_that_is_not_there_and_a_kernel_backend(tiny_model_dir, tiny_task_dir, tmp_path):
    from qharness.experiment.plan import plan

    common = {"model": str(tiny_model_dir), "tasks": (str(tiny_task_dir / "short.yaml"),), "device": "cpu",
              "results": tmp_path / "lb.csv", "device_map": "auto"}
    with pytest.raises(ConfigError, match="^--max-memory names GPU 0, but there is no GPU in use"):
        plan(RunSettings(max_memory={"0": "1GiB", "cpu": "1GiB"}, **common))
    with pytest.raises(ConfigError, match="^--backend torchao packs weights in GPU memory"):
        plan(RunSettings(backend="torchao", **common))
    assert {b.name for b in plan(RunSettings(**common)).backends.values()} == {"sim"}
