"""Continued training (`train --from`, `tune:` names) and the outlier penalty, on the tiny model and shipped text."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from qharness.cli import main
from qharness.core.errors import DataError, UnknownName
from qharness.data.recipe import TUNE_TRAIN
from qharness.models.mitigations import build_
from qharness.models.mitigations.outlier_penalty import OutlierPenalty
from qharness.models.sources import ModelSpec, classify, load_model
from qharness.models.sources import tune as tune_names
from qharness.tasks.spec import tasks_dir
from qharness.training.continued import read_documents, retrofit_
from qharness.training.ensure import ensure

CALIBRATION = str(tasks_dir() / "data" / "calibration.txt")  # training-split text, shipped


def test_the_penalty_is_the_formula_and_only_while_training():
    layer = torch.nn.Linear(4, 4)
    penalty = OutlierPenalty(threshold=2.0, strength=0.5)
    hidden = torch.tensor([[1.0, -3.0, 6.0, 0.5]])
    penalty._record(layer, (), hidden)
    expected = 0.5 * torch.tensor([0.0, 0.5**2, 2.0**2, 0.0]).mean()
    assert penalty.take().item() == pytest.approx(expected.item())
    assert penalty.take() is None  # taken once
    with torch.no_grad():  # the activation probe's forward passes are not penalized
        penalty._record(layer, (), hidden)
    assert penalty.take() is None


def test_adding_the_penalty_keeps_the_function(tiny_model_dir):
    """A mitigation added to a trained model must leave its logits as they were before any step."""
    model = load_model(ModelSpec(str(tiny_model_dir), device="cpu")).model
    ids = torch.arange(2, 30).unsqueeze(0)
    with torch.no_grad():
        before = model(ids).logits
        build_(model, "outlier_penalty")
        with OutlierPenalty().attached(model):
            after = model(ids).logits
    assert torch.equal(before, after)


def test_names_parse_and_say_what_is_supported():
    assert classify("tune:smollm2-135m-none") == "tune"
    assert tune_names.parse("tune:smollm2-135m-outlier_penalty") == ("smollm2-135m", "outlier_penalty")
    assert tune_names.family("tune:smollm2-135m-none") == "tune:smollm2-135m"
    assert classify("tune:smollm2-135m-outlier_penalty+kv_bias") == "tune"
    assert classify("tune:smollm2-135m-dyt") == "tune"  # every registered mitigation has a retrofit
    with pytest.raises(Exception, match="unknown model 'nope'"):
        classify("tune:nope-none")
    with pytest.raises(UnknownName, match="write tune:<model>-<mitigation>"):
        classify("tune:smollm2")


def test_data_files_folders_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n\n{"text": "fourth"}\n')
    assert read_documents((str(tmp_path),)) == ["first doc", "second doc", "third", "fourth"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="line 1 is not a JSON object with a 'text' field"):
        read_documents((str(tmp_path / "bad.jsonl"),))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_documents((str(tmp_path / "bin.txt"),))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        read_documents((str(tmp_path / "empty.txt"),))
    with pytest.raises(DataError, match="no such file or folder"):
        read_documents((str(tmp_path / "missing.txt"),))


def test_local_data_is_checked_before_a_model_loads(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A missing file or a broken parquet file is found before the base model loads (SmolLM2 takes seconds, a zoo
    base is trained first for minutes), not after."""
    from qharness.cli import main
    from qharness.training import continued as tune

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the data was checked")

    monkeypatch.setattr(tune, "load_model", no_load)
    (tmp_path / "junk.parquet").write_text("not parquet")
    for data, message in (("missing.txt", "no such file or folder"), ("junk.parquet", "not a readable parquet")):
        code = main(["train", "--from", str(tiny_model_dir), "--data", str(tmp_path / data), "--out",
                     str(tmp_path / "run"), "--quiet"])
        assert code == 2 and message in capsys.readouterr().err


def _train_from(tmp_path, model_dir, mitigation: str, out: str, *extra: str) -> list[dict]:
    code = main(["train", "--from", str(model_dir), "--mitigation", mitigation, "--steps", "12", "--context", "32",
                 "--batch-size", "4", "--lr", "3e-3", "--data", CALIBRATION, "--out", str(tmp_path / out), "--quiet",
                 *extra])
    assert code == 0
    return [json.loads(line) for line in (tmp_path / out / "train_log.jsonl").read_text().splitlines()]


def test_the_penalty_shrinks_activations_that_plain_continued_training_keeps(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    plain = _train_from(tmp_path, tiny_model_dir, "none", "plain")
    penalized = _train_from(tmp_path, tiny_model_dir, "outlier_penalty", "pen", "--penalty-threshold", "0.02",
                            "--penalty-strength", "50")
    assert "penalty" not in plain[-1] and penalized[0]["penalty"] > 0
    assert penalized[-1]["max_abs"] < 0.8 * plain[-1]["max_abs"]
    reloaded = load_model(ModelSpec(str(tmp_path / "pen" / "model"), device="cpu"))
    assert reloaded.mitigation == "outlier_penalty"
    info = json.loads((tmp_path / "pen" / "model" / "training.json").read_text())
    assert info["recipe"]["penalty"] == [["strength", 50.0], ["threshold", 0.02]] and info["final"]["step"] == 12


def test_a_tune_name_is_trained_on_first_use_then_read(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tune_names, "RECIPE", replace(
        tune_names.RECIPE, data=(CALIBRATION,), train=replace(TUNE_TRAIN, steps=2, context=32, log_every=1)))
    name = f"tune:{tiny_model_dir}-none"
    with pytest.raises(Exception, match="is not trained yet"):
        load_model(ModelSpec(name, device="cpu"))
    path = ensure(name, progress=False)
    assert ensure(name, progress=False) == path  # the second call finds it
    loaded = load_model(ModelSpec(name, device="cpu"))
    assert (loaded.mitigation, loaded.family) == ("none", f"tune:{tiny_model_dir}")


def test_train_from_refuses_what_it_cannot_do(capsys, tmp_path, tiny_model_dir, monkeypatch):
    from qharness.models.mitigations import MITIGATIONS, Mitigation, load_mitigations

    load_mitigations()
    monkeypatch.setitem(MITIGATIONS._entries, "newnorm", replace(MITIGATIONS.entry("dyt"), name="newnorm",
                                                                 obj=Mitigation("newnorm", "a norm", "-")))
    assert main(["train", "--from", str(tiny_model_dir), "--mitigation", "newnorm", "--out", str(tmp_path / "x")]) == 2
    assert "'newnorm' cannot yet be added to a trained model" in capsys.readouterr().err
    assert main(["train", "--from", str(tiny_model_dir)]) == 2
    assert "needs --out FOLDER" in capsys.readouterr().err
    assert main(["train", "--from", "no-such-model", "--out", str(tmp_path / "y")]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_training_sequences_past_the_base_models_positions_are_refused(capsys, tmp_path, tiny_tokenizer):
    """A GPT-2 with 64 learned positions: tune: names (256-token sequences) and --context 128 are refused when named,
    before any model loads (they failed mid-run with an IndexError, leaving a run folder behind)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from qharness.core.errors import ConfigError

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                               bos_token_id=0, eos_token_id=1)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    with pytest.raises(ConfigError, match=f"{folder} takes at most 64 positions, but this training reads 256-token"):
        classify(f"tune:{folder}-none")
    assert main(["train", "--from", str(folder), "--context", "128", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "train it with --from" in capsys.readouterr().err and not (tmp_path / "run").exists()
    recipe = replace(tune_names.RECIPE, base=str(folder), train=replace(TUNE_TRAIN, context=64))
    tune_names.check_context(recipe)  # its own length fits


def test_a_tune_name_without_its_mitigation_says_so():
    with pytest.raises(UnknownName, match="'tune:smollm2-135m' names no mitigation: write tune:smollm2-135m-<mitig"):
        classify("tune:smollm2-135m")


def test_kv_bias_is_retrofitted_with_a_silent_sink_and_its_cost_recorded(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    _train_from(tmp_path, tiny_model_dir, "kv_bias", "kv")
    info = json.loads((tmp_path / "kv" / "model" / "training.json").read_text())
    assert 0 < info["retrofit_logit_change"] < 1  # the sink takes some softmax share, and it is measured
    reloaded = load_model(ModelSpec(str(tmp_path / "kv" / "model"), device="cpu")).model
    assert reloaded.config.qharness_mitigation == "kv_bias"
    biases = [m.kv_bias for m in reloaded.modules() if hasattr(m, "kv_bias")]
    assert biases and all(b.k.abs().max() > 0 for b in biases)  # they started at zero and trained


def test_retrofit_zeroes_the_sink(tiny_model_dir):
    model, tokenizer = _tiny(tiny_model_dir)
    assert 0 < retrofit_(model, "kv_bias", tokenizer) < 1
    biases = [m.kv_bias for m in model.modules() if hasattr(m, "kv_bias")]
    assert len(biases) == 2 and all(not b.k.any() and not b.v.any() for b in biases)


def _tiny(folder):
    loaded = load_model(ModelSpec(str(folder), device="cpu", dtype="fp32"))
    return loaded.model, loaded.tokenizer


# Exact in principle (a gate of 1.0, a clip that is the identity, no weight touched); what is left is fp32 rounding
# of the same sums in another order (our explicit attention instead of SDPA: ~1e-7 relative per layer).
EXACT = 1e-5


@pytest.mark.parametrize("spec", ["gated_attention", "clipped_softmax", "tvr", "outlier_penalty",
                                  "gated_attention+clipped_softmax+tvr"])
def test_retrofits_keep_the_function(tiny_model_dir, spec):
    model, tokenizer = _tiny(tiny_model_dir)
    assert retrofit_(model, spec, tokenizer) <= EXACT
    assert model.config.qharness_mitigation == spec


def test_a_retrofitted_gate_passes_through_learns_and_reloads(tiny_model_dir, tmp_path):
    model, tokenizer = _tiny(tiny_model_dir)
    retrofit_(model, "gated_attention", tokenizer)
    gate = model.model.layers[0].self_attn.gate
    assert gate.scale == 2.0 and not gate.proj.weight.any()
    ids = torch.arange(2, 30).unsqueeze(0)
    model(ids, labels=ids).loss.backward()
    assert gate.proj.bias.grad.abs().max() > 0  # not saturated: the gate learns from its first step
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "m")
    reloaded = load_model(ModelSpec(str(tmp_path / "m"), device="cpu")).model
    assert reloaded.model.layers[0].self_attn.gate.scale == 2.0
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)


def test_a_retrofitted_clip_ramps_from_softmax_to_its_gamma(tiny_model_dir):
    from qharness.models.attention import CLIP_GAMMA
    from qharness.models.mitigations.clipped_softmax import RETROFIT_RAMP_STEPS, ramp_clips

    model, tokenizer = _tiny(tiny_model_dir)
    retrofit_(model, "clipped_softmax", tokenizer)
    clip = model.model.layers[1].self_attn.softmax_clip
    assert clip.gamma == 0.0
    ramp_clips(model, RETROFIT_RAMP_STEPS // 2)
    assert clip.gamma == pytest.approx(CLIP_GAMMA / 2)
    ramp_clips(model, RETROFIT_RAMP_STEPS * 3)
    assert clip.gamma == CLIP_GAMMA


def test_retrofitted_tvr_pulls_weights_back_to_their_own_starting_std(tiny_model_dir):
    from qharness.models.mitigations.tvr import RETROFIT_INTERVAL, decoder_matrices, tvr_after_step

    model, tokenizer = _tiny(tiny_model_dir)
    retrofit_(model, "tvr", tokenizer)
    (_, first), (_, second) = decoder_matrices(model)[:2]
    start_first, start_second = float(first.detach().std()), float(second.detach().std())
    with torch.no_grad():
        first.mul_(3.0)  # grew past 1.2x its own std: pulled back
        second.mul_(1.1)  # within 1.2x: left alone
    assert tvr_after_step(model, RETROFIT_INTERVAL - 1) == 0  # only every RETROFIT_INTERVAL steps
    assert tvr_after_step(model, RETROFIT_INTERVAL) == 1
    assert float(first.detach().std()) == pytest.approx(start_first, rel=1e-5)
    assert float(second.detach().std()) == pytest.approx(1.1 * start_second, rel=1e-5)


def test_dyt_is_fitted_to_the_norms_it_replaces(tiny_model_dir):
    """No DyT equals a norm; the fitted one moves the logits less than DyT's own initialization does."""
    from qharness.models.mitigations.dyt import DyT, fit_dyt_
    from qharness.quant.calibrate import calibration_batches, calibration_text

    model, tokenizer = _tiny(tiny_model_dir)
    fitted = retrofit_(model, "dyt", tokenizer)
    reference, _ = _tiny(tiny_model_dir)
    plain, _ = _tiny(tiny_model_dir)
    build_(plain, "dyt")  # DyT as it starts from scratch: alpha 1 / 0.5, gamma 1, beta 0
    with torch.no_grad():
        naive = max(float((plain(ids).logits - reference(ids).logits).abs().max() / reference(ids).logits.abs().max())
                    for ids in calibration_batches(tokenizer, calibration_text(), n=2, length=128))
    assert 0 < fitted < naive
    # the fit itself: a DyT fitted to outputs it can produce exactly recovers its parameters
    x = torch.randn(512, 8) * 3
    target = DyT(8, 0.25)
    with torch.no_grad():
        target.weight.copy_(torch.linspace(0.5, 2.0, 8))
        target.bias.copy_(torch.linspace(-1.0, 1.0, 8))
        y = target(x)
    fresh = DyT(8)
    residual = fit_dyt_(fresh, x, y)
    assert residual < 0.05 and fresh.alpha.item() == pytest.approx(0.25, rel=0.1)


def test_attention_mitigations_refuse_a_model_that_computes_attention_its_own_way(capsys, tmp_path, tiny_tokenizer):
    """Falcon takes an attention implementation's name and ignores it: KV bias would be attached and never used."""
    from transformers import FalconConfig, FalconForCausalLM

    folder = tmp_path / "falcon"
    FalconForCausalLM(FalconConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2)).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    capsys.readouterr()  # the save's progress bar
    for mitigation in ("kv_bias", "gated_attention", "clipped_softmax"):
        assert main(["train", "--from", str(folder), "--mitigation", mitigation, "--out", str(tmp_path / "x"),
                     "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "FalconForCausalLM computes attention its own way" in err
        assert "they work on Llama, Mistral, Qwen, GPT-2" in err
    assert not (tmp_path / "x" / "model").exists()


@pytest.mark.gpu
def test_on_cuda_every_retrofit_trains_in_bf16_with_accumulation_and_reloads(tmp_path, tiny_model_dir, monkeypatch):
    """`train --from` on a CUDA machine loads the model onto the GPU before the retrofit: DyT's fit, the gates and
    the sink are made there (new parameters are born fp32 on the CPU and must follow the model), then trained under
    bf16 autocast with gradient accumulation. Not yet run on a GPU."""
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    spec = "dyt+gated_attention+kv_bias+clipped_softmax+tvr"
    log = _train_from(tmp_path, tiny_model_dir, spec, "gpu", "--precision", "bf16", "--grad-accum", "2")
    assert log[-1]["step"] == 12 and all(math.isfinite(entry["loss"]) for entry in log)
    info = json.loads((tmp_path / "gpu" / "model" / "training.json").read_text())
    assert info["device"].startswith("cuda") and info["retrofit_logit_change"] > 0
    reloaded = load_model(ModelSpec(str(tmp_path / "gpu" / "model"), device="cuda", dtype="bf16"))
    assert reloaded.mitigation == spec
    assert {(p.device.type, p.dtype) for p in reloaded.model.parameters()} == {("cuda", torch.bfloat16)}
    ids = torch.arange(2, 30, device="cuda").unsqueeze(0)
    with torch.no_grad():
        assert torch.isfinite(reloaded.model(ids).logits).all()


def _kill_at(stop: int):
    def hook(model, step):
        if step == stop:
            raise KeyboardInterrupt

    return hook


def test_the_long_recipe_resumes_its_schedule_and_snapshots_exactly(tmp_path, tiny_model_dir, monkeypatch):
    """Killed mid-run and resumed, the warmup + cosine recipe ends on the unbroken run's weights bit for bit, with the
    same bf16 snapshots and the same logged lr and loss at every step."""
    from qharness.data.recipe import TUNE400_TRAIN
    from qharness.training import continued as tune_training
    from qharness.training.continued import continue_training

    recipe = replace(tune_names.LONG_RECIPE, base=str(tiny_model_dir), mitigation="lp_penalty+gated_attention",
                     data=(CALIBRATION,), snapshots=(4, 10),
                     train=replace(TUNE400_TRAIN, steps=10, warmup=2, context=32, log_every=2, checkpoint_every=3))
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    assert continue_training(recipe, tmp_path / "a", progress=False).finished
    real = tune_training.train
    monkeypatch.setattr(tune_training, "train", lambda model, tokens, cfg, out, bos, hooks, progress, penalty=None:
                        real(model, tokens, cfg, out, bos, [*hooks, _kill_at(7)], progress, penalty=penalty))
    with pytest.raises(KeyboardInterrupt):
        continue_training(recipe, tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 6
    assert (tmp_path / "b" / "snapshots" / "step4").is_dir() and not (tmp_path / "b" / "snapshots" / "step10").exists()
    monkeypatch.setattr(tune_training, "train", real)
    assert continue_training(recipe, tmp_path / "b", progress=False).finished

    from safetensors.torch import load_file

    for part in ("model", "snapshots/step4", "snapshots/step10"):
        unbroken, resumed = (load_file(tmp_path / run / part / "model.safetensors") for run in "ab")
        assert unbroken.keys() == resumed.keys()
        for name in unbroken:
            assert torch.equal(unbroken[name], resumed[name]), (part, name)
    final = load_file(tmp_path / "a" / "model" / "model.safetensors")
    last = load_file(tmp_path / "a" / "snapshots" / "step10" / "model.safetensors")
    assert all(last[k].dtype == torch.bfloat16 and torch.equal(last[k], final[k].to(torch.bfloat16)) for k in last)
    logs = [[json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
            for run in "ab"]
    assert [(e["step"], e["lr"], e["loss"]) for e in logs[0]] == [(e["step"], e["lr"], e["loss"]) for e in logs[1]]
    assert logs[0][-1]["lr"] < logs[0][1]["lr"] and all(e["tokens_per_s"] > 0 for e in logs[0])


def test_seeds_of_a_tune_recipe_train_apart_and_group_together(tmp_path, tiny_model_dir, monkeypatch):
    """`:seed=N` trains the same recipe with another seed: its own folder, family and weights, the seed recorded, and
    the recipe digest without the seed shared (what report/seeds.py groups rows by)."""
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tune_names, "RECIPE", replace(
        tune_names.RECIPE, data=(CALIBRATION,), train=replace(TUNE_TRAIN, steps=2, context=32, log_every=1)))
    names = [f"tune:{tiny_model_dir}-none", f"tune:{tiny_model_dir}-none:seed=1"]
    assert tune_names.parse_name(f"tune:{tiny_model_dir}-none:seed=0").run == names[0]  # 0 is the default
    assert tune_names.folder_for(names[0]) != tune_names.folder_for(names[1])
    assert tune_names.recipe_for(names[1]).train.seed == 1
    for name in names:
        ensure(name, progress=False)
    loaded = [load_model(ModelSpec(name, device="cpu")) for name in names]
    assert [m.train_seed for m in loaded] == [0, 1]
    assert loaded[0].train_recipe and loaded[0].train_recipe == loaded[1].train_recipe
    assert [m.family for m in loaded] == [f"tune:{tiny_model_dir}", f"tune:{tiny_model_dir}:seed=1"]
    weights = [m.model.model.layers[0].mlp.up_proj.weight for m in loaded]
    assert not torch.equal(*weights)  # another seed, other batches: other weights
    for bad, shown in (("1.5", "1.5"), ("inf", "inf"), ("nan", "nan"), ("-1", "-1")):
        with pytest.raises(UnknownName, match=f":seed= takes an integer in 0..4294967295, got {shown}$"):
            classify(f"tune400:smollm2-135m-none:seed={bad}")
    with pytest.raises(UnknownName, match="the base of a tuned model cannot carry a seed; a seed goes after the"):
        classify("tune:zoo:llama-base:seed=1-none")


def test_long_names_carry_settings_and_steps():
    name = "tune400:smollm2-135m-lp_penalty:strength=1:power=8@step100"
    parsed = tune_names.parse_name(name)
    assert (parsed.base, parsed.mitigation, parsed.penalty, parsed.step) == (
        "smollm2-135m", "lp_penalty", (("power", 8.0), ("strength", 1.0)), 100)
    assert parsed.run == "tune400:smollm2-135m-lp_penalty:power=8:strength=1"
    assert tune_names.family(name) == "tune400:smollm2-135m@step100"
    assert tune_names.family("tune400:smollm2-135m-none") == "tune400:smollm2-135m"
    recipe = tune_names.recipe_for(name)
    assert (recipe.train.steps, recipe.train.warmup, recipe.train.min_lr_ratio, recipe.snapshots) == (
        400, 20, 0.1, (40, 100, 200, 400))
    assert tune_names.folder_for(name) == tune_names.folder_for(parsed.run)  # every step reads one run
    # the name's settings are the recipe `train --from --penalty-*` makes: the same digest
    assert recipe.digest() == replace(tune_names.LONG_RECIPE, base="smollm2-135m", mitigation="lp_penalty",
                                      penalty=(("power", 8.0), ("strength", 1.0))).digest()
    assert tune_names.recipe_for("tune:smollm2-135m-none").digest() == replace(
        tune_names.RECIPE, base="smollm2-135m").digest()  # the 40-step names keep their folders
    assert parse_ok("tune:zoo:llama-base-outlier_penalty:strength=10") == ("zoo:llama-base", "outlier_penalty")
    assert tune_names.parse_name("tune400:smollm2-135m-lp_penalty:strength=1e-3").penalty == (("strength", 0.001),)


def parse_ok(name):
    parsed = tune_names.parse_name(name)
    return parsed.base, parsed.mitigation


@pytest.mark.parametrize(("name", "message"), [
    ("tune400:smollm2-135m-none@step50", "keeps no weights at step 50; its snapshots: @step40, @step100"),
    ("tune:smollm2-135m-none@step40", "keeps no weights at step 40"),
    ("tune400:smollm2-135m-kv_bias:strength=10", "set a loss penalty but mitigation 'kv_bias' has none"),
    ("tune400:smollm2-135m-outlier_penalty:power=8", "outlier_penalty takes --penalty-threshold, --penalty-strength"),
    ("tune400:smollm2-135m-lp_penalty:power=high", "penalty settings are :NAME=NUMBER each"),
])
def test_bad_long_names_are_one_line_errors(name, message):
    with pytest.raises(Exception, match=message):
        classify(name)


def test_a_snapshot_name_trains_its_run_then_reads_that_step(tmp_path, tiny_model_dir, monkeypatch):
    from qharness.data.recipe import TUNE400_TRAIN

    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tune_names, "LONG_RECIPE", replace(
        tune_names.LONG_RECIPE, data=(CALIBRATION,), snapshots=(2, 4),
        train=replace(TUNE400_TRAIN, steps=4, warmup=1, context=32, log_every=1, checkpoint_every=2)))
    name = f"tune400:{tiny_model_dir}-none@step2"
    with pytest.raises(Exception, match="is not trained yet"):
        load_model(ModelSpec(name, device="cpu"))
    ensure(name, progress=False)
    loaded = load_model(ModelSpec(name, device="cpu"))
    assert loaded.family == f"tune400:{tiny_model_dir}@step2" and loaded.dtype == torch.float32
    assert "at step 2" in loaded.source
    import shutil

    shutil.rmtree(tune_names.snapshot_folder(tune_names.folder_for(name), 2))
    with pytest.raises(Exception, match="were deleted once evaluated"):
        load_model(ModelSpec(name, device="cpu"))


def test_each_dyt_is_fitted_on_what_the_converted_layers_below_it_produce(tiny_model_dir, monkeypatch):
    """The sequential fit: the inputs each DyT was fitted on are exactly what it receives in the finished model (every
    norm before it already a DyT), and its targets are the original norm's outputs in the original model."""
    from qharness.models.layers import norm_modules
    from qharness.models.mitigations import dyt
    from qharness.quant.calibrate import calibration_batches, calibration_text

    model, tokenizer = _tiny(tiny_model_dir)
    batches = calibration_batches(tokenizer, calibration_text(), n=2, length=128)
    with torch.no_grad():
        originals = dyt.norm_inputs_and_outputs(model, batches)
    fitted = []
    real_fit = dyt.fit_dyt_
    monkeypatch.setattr(dyt, "fit_dyt_", lambda module, x, y: fitted.append((x, y)) or real_fit(module, x, y))
    names = list(norm_modules(model))
    dyt.retrofit_dyt_(model, batches)
    assert list(originals) == names and len(fitted) == 5 and not norm_modules(model)  # in forward order, all replaced
    with torch.no_grad():
        seen = {name: dyt.input_of(model, name, batches) for name in names}
    for (x, y), name in zip(fitted, names, strict=True):
        assert torch.equal(x, seen[name]), name  # what the converted model feeds it
        assert torch.equal(y, originals[name][1]), name  # what the original norm gave
    assert not torch.equal(fitted[-1][0], originals[names[-1]][0])  # the drift below reaches the last one


def test_a_changed_retrofit_gets_a_recipe_of_its_own():
    """Models continued with the earlier DyT retrofit keep their folder name and are not read as the new way's."""
    new = tune_names.recipe_for("tune:smollm2-135m-dyt")
    assert new.retrofit == "dyt=sequential"
    assert new.digest() != replace(new, retrofit="").digest()
    assert tune_names.recipe_for("tune:smollm2-135m-kv_bias").retrofit == ""
