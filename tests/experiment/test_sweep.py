import dataclasses
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qharness.core.errors import BackendUnavailable, ConfigError
from qharness.data.results import key, read_rows
from qharness.experiment.sweep import SweepConfig, gpus_per_task, sweep
from qharness.quant.backends import backends_for
from qharness.quant.schemes import SCHEMES

ROOT = Path(__file__).resolve().parents[2]
SIM_SCHEMES = [name for name in SCHEMES.names() if "sim" in backends_for(SCHEMES.get(name))]


def write_config(tmp_path, model_dir, task_dir, quants, **extra) -> SweepConfig:
    lines = [f"models: [{model_dir}]", f"quants: [{', '.join(quants)}]", f"tasks: [{task_dir / 'short.yaml'}]",
             f"results: {tmp_path / 'lb.csv'}"] + [f"{k}: {v}" for k, v in extra.items()]
    (tmp_path / "sweep.yaml").write_text("\n".join(lines) + "\n")
    return SweepConfig.from_file(tmp_path / "sweep.yaml")


def test_sweep_runs_the_grid_once_and_skips_it_after(tiny_model_dir, tiny_task_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, tiny_task_dir, ["int8", "int8-w8a8-tensor"],
                          keep_positions="[[], [0]]")
    first = sweep(config, say=lambda m: None)
    rows = read_rows(tmp_path / "lb.csv")
    assert len(rows) == 1 + 2 + 2  # one baseline, two schemes, two schemes with BOS kept
    assert first.computed == 5
    assert sweep(config, say=lambda m: None).computed == 0


def test_sweep_keeps_named_linears_in_a_run_of_their_own(tiny_model_dir, tiny_task_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, tiny_task_dir, ["int8"], keep_linears="[[], [q_proj, down_proj]]")
    assert sweep(config, say=lambda m: None).computed == 3
    rows = read_rows(tmp_path / "lb.csv")
    assert [(r["quant"], r["keep"]) for r in rows] == [
        ("none", ""), ("int8-w8a8-token", ""), ("int8-w8a8-token", "lin:q_proj,down_proj")]
    assert rows[1]["value"] != rows[2]["value"]  # the kept Linears changed the result
    with pytest.raises(ConfigError, match="kept Linears are parts of module names"):
        write_config(tmp_path, tiny_model_dir, tiny_task_dir, ["int8"], keep_linears="[['q-proj']]")


def test_sweep_transforms_each_scheme_against_one_untransformed_baseline(tiny_model_dir, tiny_task_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, tiny_task_dir, ["int8"], transforms="['', smoothquant]")
    assert sweep(config, say=lambda m: None).computed == 3
    rows = read_rows(tmp_path / "lb.csv")
    assert [(r["quant"], r["transform"]) for r in rows] == [
        ("none", ""), ("int8-w8a8-token", ""), ("int8-w8a8-token", "smoothquant:0.5")]
    assert rows[2]["fp_value"] == rows[0]["value"]


def test_killed_sweep_resumes_without_losing_or_duplicating_rows(tiny_model_dir, tiny_task_dir, tmp_path):
    write_config(tmp_path, tiny_model_dir, tiny_task_dir, SIM_SCHEMES)
    results = tmp_path / "lb.csv"
    command = [sys.executable, "-m", "qharness", "sweep", str(tmp_path / "sweep.yaml"), "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(read_rows(results)) < 3:
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_rows(results)
    assert 3 <= len(partial) < 1 + len(SIM_SCHEMES)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = read_rows(results)
    assert len(rows) == 1 + len(SIM_SCHEMES) and len({key(r) for r in rows}) == len(rows)
    assert {r["quant"] for r in rows} == {"none", *SIM_SCHEMES}
    before = {key(r): r["run_id"] for r in partial}
    assert all(before[key(r)] == r["run_id"] for r in rows if key(r) in before)  # finished cells were kept
    assert f"computed {len(SIM_SCHEMES) + 1 - len(partial)} of" in done.stdout


def test_bad_sweep_configs_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="sweep config not found"):
        SweepConfig.from_file(tmp_path / "nope.yaml")
    (tmp_path / "s.yaml").write_text("models: [m]\nquants: [int8]\nengines: ray\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['engines'\]; valid keys"):
        SweepConfig.from_file(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("models: [m]\nquants: [int8]\nengine: spark\n")
    with pytest.raises(ConfigError, match="unknown sweep engine 'spark'; valid: local, ray"):
        SweepConfig.from_file(tmp_path / "s.yaml")


@pytest.mark.parametrize(("device", "cluster_gpus", "wanted"), [
    ("cuda", 1, 1), ("cuda", 8, 1),  # one GPU per model: the others queue rather than share it
    ("auto", 1, 1), ("auto", 0, 0),  # auto means CUDA exactly when the cluster has a GPU
    ("cpu", 0, 0), ("cpu", 4, 0),  # a CPU sweep never holds a GPU
])
def test_ray_tasks_ask_for_a_gpu_exactly_when_the_device_is_cuda(device, cluster_gpus, wanted):
    assert gpus_per_task(device, cluster_gpus) == wanted


def test_ray_refuses_cuda_on_a_cluster_without_gpus():
    with pytest.raises(BackendUnavailable, match="sweep device 'cuda' but the Ray cluster has no GPU; set device"):
        gpus_per_task("cuda", 0)


@pytest.mark.needs("ray")
def test_ray_engine_fans_out_and_writes_the_same_rows(tiny_model_dir, tiny_task_dir, tmp_path):
    import ray

    config = write_config(tmp_path, tiny_model_dir, tiny_task_dir, ["int8", "fp8"], engine="ray",
                          keep_positions="[[], [0]]")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        report = sweep(config, say=lambda m: None)
    finally:
        ray.shutdown()
    rows = read_rows(tmp_path / "lb.csv")
    assert len(report.reports) == 2 and len(rows) == 1 + 2 + 2
    assert len({key(r) for r in rows}) == len(rows)


def test_sweep_with_scan_profiles_each_model_once(tiny_model_dir, tiny_task_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, tiny_task_dir, ["int8"], keep_positions="[[], [0]]",
                          scan="true")
    said = []
    sweep(config, say=said.append)
    scan_rows = [r for r in read_rows(tmp_path / "lb.csv") if r["task"] == "scan"]
    assert {r["metric"] for r in scan_rows} >= {"massive_max", "massive_ratio"}
    assert len(list((tmp_path / "scan").glob("*/profile.json"))) == 1
    assert sum(m.startswith("scan ") for m in said) == 1
    said.clear()
    sweep(config, say=said.append)
    assert not any(m.startswith("scan ") for m in said)  # the profile is there: not scanned again
    # a second leaderboard in the same folder shares the profiles, but needs the scan rows of its own
    (tmp_path / "sweep.yaml").write_text((tmp_path / "sweep.yaml").read_text().replace("lb.csv", "other.csv"))
    sweep(SweepConfig.from_file(tmp_path / "sweep.yaml"), say=said.append)
    other = [r for r in read_rows(tmp_path / "other.csv") if r["task"] == "scan"]
    assert {r["metric"] for r in other} == {r["metric"] for r in scan_rows}


def test_the_shipped_default_sweep_covers_the_zoo_and_plans_without_training():
    from pathlib import Path

    from qharness.experiment.plan import plan_all
    from qharness.models.sources import zoo

    config = SweepConfig.from_file(Path(__file__).resolve().parents[2] / "sweeps" / "default.yaml")
    assert set(zoo.GRID) <= set(config.models) and "smollm2-135m" in config.models and config.scan
    for plan in plan_all(config.cells()):  # every name resolves; nothing is trained or loaded
        tasks = config.tasks_for.get(plan.settings.model, config.tasks)
        assert len(plan.cells) == (1 + len(config.quants)) * len(tasks)


def test_tasks_for_gives_one_model_its_own_tasks(tiny_model_dir, tiny_task_dir, tmp_path):
    short = (tiny_task_dir / "short.yaml").read_text()
    (tiny_task_dir / "other.yaml").write_text(short.replace("name: short", "name: other"))
    config = write_config(tmp_path, tiny_model_dir, tiny_task_dir, ["int8"],
                          tasks_for=f"{{{tiny_model_dir}: [{tiny_task_dir / 'other.yaml'}]}}")
    (settings,) = config.cells()
    assert settings.tasks == (str(tiny_task_dir / "other.yaml"),)
    with pytest.raises(ConfigError, match="not in the sweep's models"):
        write_config(tmp_path, tiny_model_dir, tiny_task_dir, ["int8"], tasks_for="{elsewhere: [x]}")


def test_the_shipped_tune_sweep_sets_each_mitigation_against_the_continued_control(monkeypatch, tmp_path):
    from pathlib import Path

    from qharness.experiment.plan import plan_all
    from qharness.models.sources import source_for

    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path))  # planning must not need (or make) a trained model
    config = SweepConfig.from_file(Path(__file__).resolve().parents[2] / "sweeps" / "tune.yaml")
    tuned = [m for m in config.models if m.startswith("tune:")]
    assert "smollm2-135m" in config.models and "tune:smollm2-135m-none" in tuned and len(tuned) >= 2
    assert {source_for(m).family(m) for m in tuned} == {"tune:smollm2-135m"}
    assert all(plan.cells for plan in plan_all(config.cells()))
    assert not any(tmp_path.iterdir())


def test_sweep_kv_settings_are_runs_of_their_own_sharing_the_baseline(tiny_model_dir, tiny_task_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, tiny_task_dir, ["int8"], kv="[none, int8-token+keep0]")
    assert sweep(config, say=lambda m: None).computed == 3  # one baseline, int8, int8 with the KV cache
    assert [(r["quant"], r["kv"]) for r in read_rows(tmp_path / "lb.csv")] == [
        ("none", ""), ("int8-w8a8-token", ""), ("int8-w8a8-token", "int8-token+keep0")]
    assert sweep(config, say=lambda m: None).computed == 0


def test_none_among_the_quants_of_a_grid_with_and_without_a_kv_cache(tiny_model_dir, tiny_task_dir, tmp_path):
    """quants [none, int8] x kv [none, X]: without a cache to quantize none is the baseline the run computes anyway,
    not a mistake that refuses the whole grid."""
    config = write_config(tmp_path, tiny_model_dir, tiny_task_dir, ["none", "int8"], kv="[none, int8-token]")
    assert sweep(config, say=lambda m: None).computed == 4  # the baseline, int8, none and int8 with the cache
    assert sorted((r["quant"], r["kv"]) for r in read_rows(tmp_path / "lb.csv")) == [
        ("int8-w8a8-token", ""), ("int8-w8a8-token", "int8-token"), ("none", ""), ("none", "int8-token")]


def test_the_shipped_outliers_sweep_plans_every_kv_setting_and_transform():
    """sweeps/outliers.yaml: every (kv, transform, keep) run plans without loading; rotate needs torchao for its
    Hadamard matrices, so its runs are planned only where torchao is installed."""
    from importlib.util import find_spec
    from pathlib import Path

    from qharness.experiment.plan import plan_all

    config = SweepConfig.from_file(Path(__file__).resolve().parents[2] / "sweeps" / "outliers.yaml")
    assert {"int4-token+keep0", "int4-kivi"} <= set(config.kv) and {"smoothquant", "rotate"} <= set(config.transforms)
    planned = set()
    cells = [s for s in config.cells() if not (s.transform == "rotate" and find_spec("torchao") is None)]
    for plan in plan_all(cells):
        planned |= {(c.quant, c.kv, c.transform) for c in plan.cells}
    assert ("int4-w4a4-token", "int4-kivi", "smoothquant:0.5") in planned
    assert ("int8-w8a8-tensor", "int4-token+keep0", "") in planned


def test_a_sweep_loads_each_model_once_for_all_its_schemes_tasks_and_scan(tiny_model_dir, tiny_task_dir, tmp_path,
                                                                          monkeypatch):
    """Kept positions, KV settings and transforms are runs of their own, all on the one loaded model (each scheme
    undone after its cells): one load, and every row what a run of that cell alone, on a fresh model, computes."""
    import qharness.experiment.execute as execute_module
    import qharness.experiment.scanning as scanning
    from qharness.experiment.runner import run

    (tiny_task_dir / "second.yaml").write_text("name: second\nkind: perplexity\ndata: data/short.txt\n"
                                               "context_length: 32\n", encoding="utf-8")
    loads = []
    real = execute_module.load_model

    def counted(spec, progress=True):
        loads.append(spec.name)
        return real(spec, progress=progress)

    monkeypatch.setattr(execute_module, "load_model", counted)
    monkeypatch.setattr(scanning, "load_model", counted)
    config = write_config(tmp_path, tiny_model_dir, tiny_task_dir, ["int8", "int8-w8a8-tensor-static"],
                          tasks=f"[{tiny_task_dir / 'short.yaml'}, {tiny_task_dir / 'second.yaml'}]",
                          keep_positions="[[], [0]]", kv="[none, int8-token]", transforms="['', smoothquant]",
                          limit=2, scan="true")
    report = sweep(config, say=lambda m: None)
    assert loads == [str(tiny_model_dir)]
    assert report.computed == 2 * (1 + 2 * 2 * 2 * 2)  # per task: the baseline, 2 schemes x 2 keeps x 2 kv x 2 tf
    swept = {key(r): float(r["value"]) for r in read_rows(tmp_path / "lb.csv") if r["task"] != "scan"}
    alone = {}
    for cell in config.cells():
        fresh = run(dataclasses.replace(cell, results=tmp_path / "alone.csv"), say=lambda m: None, progress=False)
        alone.update({key(r): float(r["value"]) for r in fresh.rows})
    assert len(loads) == 1 + len(config.cells())
    assert swept == alone and len(set(swept.values())) > len(swept) / 2
    loads.clear()
    assert sweep(config, say=lambda m: None).computed == 0 and loads == []  # all there: nothing loaded at all


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_sweep_file_reads_and_names_models_that_parse(path):
    """A shipped sweep that fails to read (a typo in a key, a model name the sources refuse) is found here, not an
    hour into someone's run. A model it names as a folder under results/runs/ is one the sweep's own comment says
    how to train (`qharness train ... --out FOLDER`): it exists only after that, so the comment is what is checked."""
    from qharness.models.sources import source_for

    config = SweepConfig.from_file(path)
    assert config.models and list(config.cells())
    text = path.read_text(encoding="utf-8")
    for name in config.models:  # resolved and described from the name alone: nothing loads or trains
        if name.startswith("results/runs/") and not (ROOT / name).exists():
            folder = name.removesuffix("/model")
            assert re.search(rf"#.*qharness train .*--out {re.escape(folder)}\b", text), \
                f"{path.name} names {name}, which it does not say how to train"
            continue
        source = source_for(name)
        if source.describe_name is not None:
            assert source.describe_name(name)["mitigation"]
