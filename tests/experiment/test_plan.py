"""plan resolves every name once, before any weights load; execute takes the plan and resolves none again."""

from __future__ import annotations

import pytest

from qharness.core.errors import ConfigError
from qharness.data.results import read_rows
from qharness.experiment import execute as executor
from qharness.experiment import plan as planner
from qharness.experiment.execute import execute
from qharness.experiment.plan import plan
from qharness.experiment.settings import RunSettings
from qharness.experiment.shapes import model_shapes, shapes_of


def settings_for(model_dir, task_dir, results, **kwargs) -> RunSettings:
    return RunSettings(model=str(model_dir), tasks=(str(task_dir / "short.yaml"),), results=results, **kwargs)


def test_execute_resolves_no_name_again(tiny_model_dir, tiny_task_dir, tmp_path, monkeypatch):
    """Every resolver the plan calls raises once the plan is made (looked up wherever execute could reach it);
    execute still runs the baseline, a KV-quantized scheme and a transform, and writes their rows."""
    import qharness.quant.backends as backend
    import qharness.quant.kv as kv
    import qharness.quant.schemes as schemes
    import qharness.quant.transforms as transforms
    import qharness.tasks.spec as task_spec

    made = plan(settings_for(tiny_model_dir, tiny_task_dir, tmp_path / "lb.csv", quants=("int8-w8a8-tensor",),
                             kv="int8-token", transform="smoothquant", keep_positions=(0,)))

    def resolver(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"execute called the resolver {name}")
        return refuse

    for module, name in [(planner, "get_scheme"), (schemes, "get_scheme"), (planner, "select_backend"),
                         (backend, "select_backend"), (planner, "load_backends"), (backend, "load_backends"),
                         (planner, "get_kv"), (kv, "get_kv"), (planner, "split_quants"), (kv, "split_quants"),
                         (planner, "parse_transform"), (transforms, "parse_transform"), (planner, "get_task"),
                         (task_spec, "get_task"), (planner, "plan"), (planner, "model_shapes")]:
        monkeypatch.setattr(module, name, resolver(f"{module.__name__}.{name}"))
    monkeypatch.setattr(schemes.SCHEMES, "resolve", resolver("SCHEMES.resolve"))
    monkeypatch.setattr(schemes.SCHEMES, "get", resolver("SCHEMES.get"))
    report = execute(made, say=lambda m: None, progress=False)
    assert report.computed == 2
    fp, quantized = read_rows(tmp_path / "lb.csv")
    assert (quantized["quant"], quantized["kv"], quantized["transform"], quantized["keep"]) == (
        "int8-w8a8-tensor", "int8-token", "smoothquant:0.5", "pos:0")
    assert float(quantized["value"]) != float(fp["value"])


def test_the_plan_reads_the_model_shapes_from_its_config_as_loading_would_find_them(tiny_model_dir):
    from qharness.models.sources import ModelSpec, load_model
    from qharness.quant.apply import convert_conv1d_

    planned = model_shapes(str(tiny_model_dir))
    loaded = load_model(ModelSpec(str(tiny_model_dir)), progress=False).model
    convert_conv1d_(loaded)
    assert planned == shapes_of(loaded)
    assert planned.hidden_size == 64 and planned.max_positions == 256 and len(planned.linears) == 2 * 7


def test_gpt2_shapes_come_from_a_meta_skeleton_with_conv1d_as_linears(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(folder)
    shapes = model_shapes(str(folder))
    assert shapes.hidden_size == 32 and shapes.max_positions == 64
    assert shapes.linears["transformer.h.0.attn.c_attn"] == (96, 32)  # Conv1D's (in, out) read as Linear's (out, in)
    assert len(shapes.linears) == 2 * 4


def test_a_zoo_model_not_trained_yet_has_the_shapes_its_recipe_will_give(monkeypatch, tmp_path):
    from qharness.models.sources import zoo

    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path))
    shapes = model_shapes("zoo:gpt2-kv_bias")
    recipe = zoo.recipe_for("zoo:gpt2-kv_bias")
    assert shapes.hidden_size == recipe.arch.d_model and shapes.max_positions == recipe.arch.context
    assert len(shapes.linears) == recipe.arch.layers * 4
    assert not any(tmp_path.iterdir())  # nothing trained, fetched or written


def test_the_backend_is_chosen_once_for_the_model_widths(tiny_model_dir, tiny_task_dir, tmp_path, monkeypatch):
    seen = []
    real = planner.select_backend

    def select(scheme, device, requested="auto", dtype=None, targets=None):
        seen.append(None if targets is None else len(targets))
        return real(scheme, device, requested, dtype=dtype, targets=targets)

    monkeypatch.setattr(planner, "select_backend", select)
    made = plan(settings_for(tiny_model_dir, tiny_task_dir, tmp_path / "lb.csv", quants=("int8", "fp8")))
    assert seen == [14, 14]
    assert {name: b.name for name, b in made.backends.items()} == {"int8-w8a8-token": "sim",
                                                                   "fp8-e4m3-w8a8-tensor": "sim"}
    assert [c.backend for c in made.cells] == ["", "sim", "sim"]


def test_a_device_map_runs_every_scheme_under_sim_and_names_the_setting_as_written(tiny_model_dir, tiny_task_dir,
                                                                                  tmp_path):
    """With --device-map, auto means sim (a kernel would pack weights the map keeps off the GPU), and a named kernel
    backend is refused, spelled as the sweep file spells it."""
    made = plan(settings_for(tiny_model_dir, tiny_task_dir, tmp_path / "lb.csv", device_map="auto", quants=("int8",)))
    assert [b.name for b in made.backends.values()] == ["sim"]
    with pytest.raises(ConfigError, match="^backend bnb packs weights in GPU memory, .* by device_map"):
        plan(settings_for(tiny_model_dir, tiny_task_dir, tmp_path / "lb.csv", device_map="auto", backend="bnb"),
             "sweep")


def test_a_model_whose_shapes_are_unknown_before_loading_is_checked_once_loaded(tiny_model_dir, tiny_task_dir,
                                                                                tmp_path, monkeypatch):
    """A hub id not in the local cache has no config to read: the same checks then run on the loaded model."""
    monkeypatch.setattr(planner, "model_shapes", lambda name: None)
    made = plan(settings_for(tiny_model_dir, tiny_task_dir, tmp_path / "lb.csv", keep_channels=(64,)))
    assert made.shapes is None
    monkeypatch.setattr(executor, "evaluate", lambda *a: pytest.fail("evaluated a run that should be refused"))
    with pytest.raises(ConfigError, match="--keep-channels 64 is past the model's hidden size 64"):
        execute(made, say=lambda m: None, progress=False)
    assert not (tmp_path / "lb.csv").exists()


@pytest.mark.slow
def test_the_builtin_model_shapes_from_its_converted_folder_and_its_gguf_header_match_the_loaded_model(monkeypatch,
                                                                                                       tmp_path):
    """SmolLM2 before loading: from the converted folder's config.json and, before conversion, from the GGUF header
    alone; both are what the loaded model has (576 wide, 8,192 positions, 30 layers x 7 Linears)."""
    from qharness.models import shipped as builtin
    from qharness.models.sources import ModelSpec, context_limit, load_model

    loaded = load_model(ModelSpec("smollm2-135m"), progress=False).model
    from_folder = model_shapes("smollm2-135m")
    assert from_folder == shapes_of(loaded)
    assert (from_folder.hidden_size, from_folder.max_positions, len(from_folder.linears)) == (576, 8192, 30 * 7)
    assert context_limit("smollm2-135m") == from_folder.max_positions  # what train --from checks --context against
    builtin.smollm2_gguf()  # fetched (it is, where the model loaded) and verified
    monkeypatch.setattr(builtin, "_smollm2_folder", lambda: tmp_path / "not-converted")
    assert builtin.local_smollm2().suffix == ".gguf"
    assert model_shapes("smollm2-135m") == from_folder


def test_a_plan_travels_to_a_ray_worker_whole(tiny_model_dir, tiny_task_dir, tmp_path):
    """engine: ray ships plans, not settings, so workers resolve nothing either: a plan survives pickling."""
    import pickle

    made = plan(settings_for(tiny_model_dir, tiny_task_dir, tmp_path / "lb.csv", quants=("int8", "int4-weight-g128"),
                             kv="int4-kivi+keep0", transform="smoothquant"))
    copied = pickle.loads(pickle.dumps(made))
    assert copied.keys == made.keys and copied.shapes == made.shapes and copied.kv == made.kv
    assert {name: b.name for name, b in copied.backends.items()} == {name: b.name for name, b in made.backends.items()}
