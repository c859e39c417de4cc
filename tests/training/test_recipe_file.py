"""Recipe files (recipes/*.yaml): loading through the typed-YAML path, the 6NT estimate, and training one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qharness.cli import main
from qharness.core.errors import ConfigError
from qharness.data.recipe import Recipe
from qharness.training.recipe_file import compute_estimate, load_recipe_file

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TOY = ["--d-model", "32", "--layers", "2", "--heads", "2", "--context", "32", "--steps", "3", "--batch-size", "2",
       "--warmup", "1"]


@pytest.fixture()
def tiny_corpus(monkeypatch, tmp_path, tiny_tokenizer, training_tokens):
    """The built-in training text replaced by shipped training-split text and the tiny tokenizer."""
    from qharness.training import run

    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(run, "training_corpus", lambda progress=True: (tiny_tokenizer, training_tokens, {"test": 1}))
    return tmp_path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_load_and_name_their_data(path):
    recipe = load_recipe_file(path)
    assert recipe.name == path.stem and recipe.data.startswith("hf:") and recipe.source
    assert recipe.arch.context == recipe.train.context
    assert isinstance(recipe.recipe(), Recipe)


def test_the_estimate_is_6NT_of_the_published_runs():
    sun = compute_estimate(load_recipe_file(RECIPES / "gpt2-124m-sun2024.yaml"))
    assert sun["parameters"] == pytest.approx(124.4e6, rel=0.01)  # GPT-2 small, tied embeddings
    assert sun["tokens"] == 50_000 * 12 * 5 * 8 * 1024  # their released checkpoints: 50k steps of 491,520 tokens
    assert sun["flops"] == 6 * sun["parameters"] * sun["tokens"]
    assert sun["gpu_hours"] == pytest.approx(sun["flops"] / (989e12 * 0.4) / 3600)
    gu = compute_estimate(load_recipe_file(RECIPES / "llama-60m-gu2024.yaml"))
    assert gu["non_embedding"] == pytest.approx(59e6, rel=0.01)  # the "60M": 10 x (4 d^2 + 3 d 1536), d = 768
    assert gu["tokens"] == 20_000 * 512 * 2048


def test_dry_run_prints_the_cost_and_trains_nothing(capsys, tmp_path):
    assert main(["train", "--recipe", str(RECIPES / "gpt2-124m-sun2024.yaml"), "--dry-run",
                 "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "parameters N = 124.48 M" in out and "tokens T = 50,000 steps x 480 x 1024 = 24.58 B" in out
    assert "6NT = 1.84e+19 FLOPs" in out and "12.9 GPU-hours on H100/H200 at 40%" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("text", "message"), [
    ("name: x\ntrain: {grad_accum: two}\n", r"recipe.yaml: train: grad_accum is 'two' \(str\); expected an integer$"),
    ("name: x\ntrain: {precision: fp12}\n", r"train: precision is 'fp12' \(str\); expected 'fp32' or 'bf16'$"),
    ("name: x\ntrain: {grad_accum: 0}\n", r"train grad_accum must be >= 1, got 0$"),
    ("name: x\narch: {width: 3}\n", r"recipe.yaml: arch: unknown keys \['width'\]; valid keys: \[.*'mlp_hidden'.*\]$"),
    ("name: x\nepochs: 3\n", r"recipe.yaml: unknown keys \['epochs'\]; valid keys: \[.*'processes'.*\]$"),
    ("name: x\ndata: openwebtext\n", r"recipe x: data must be 'builtin' or 'hf:<dataset>', got 'openwebtext'$"),
    ("name: x\narch: {context: 64}\n", r"recipe x: arch context 64 differs from train context 128; .*under train$"),
    ("name: [x\n", r"recipe.yaml: not valid YAML at line 2"),
    ("- a list\n", r"recipe.yaml: a recipe is a mapping"),
    ("train: {steps: -1}\n", r"train steps must be >= 1, got -1$"),
    ("train: {lr: .inf}\n", r"train lr must be a finite number, got inf$"),
    ("train: {weight_decay: .nan}\n", r"train weight_decay must be a finite number, got nan$"),
    ("train: {seed: 99999999999999999999}\n", r"train seed must be in 0..4294967295, got 99999999999999999999$"),
    ("arch: {heads: 0}\n", r"arch heads must be >= 1, got 0$"),
    ("arch: {d_model: -128, heads: -4}\n", r"arch d_model must be >= 1, got -128$"),
    ("arch: {layers: 0}\n", r"arch layers must be >= 1, got 0$"),
    ("arch: {vocab_size: 0}\n", r"arch vocab_size must be >= 1, got 0$"),
])
def test_bad_recipe_files_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe_file(write(tmp_path, text))


def test_a_recipe_is_named_after_its_file_unless_it_says(tmp_path):
    assert load_recipe_file(write(tmp_path, "data: builtin\n")).name == "recipe"


def test_cli_bad_values_are_one_line_errors(capsys, tmp_path):
    assert main(["train", "--recipe", str(tmp_path / "none.yaml"), "--dry-run"]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert main(["train", "--grad-accum", "0", "--dry-run"]) == 2
    assert capsys.readouterr().err == "qharness: error: train grad_accum must be >= 1, got 0\n"
    assert main(["train", "--precision", "fp12", "--dry-run"]) == 2
    assert capsys.readouterr().err == "qharness: error: train precision must be one of fp32, bf16, got 'fp12'\n"


def test_a_recipe_of_a_hub_dataset_is_refused_for_training(capsys, tmp_path):
    code = main(["train", "--recipe", str(RECIPES / "llama-60m-gu2024.yaml"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "trains on hf:sail/regmix-data-sample" in err and "--dry-run" in err and "--data builtin" in err
    assert main(["train", "--recipe", str(RECIPES / "llama-60m-gu2024.yaml"), "--data", "corpus.txt",
                 "--out", str(tmp_path / "r")]) == 2
    assert "from-scratch training reads only the built-in text" in capsys.readouterr().err


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_before_training(capsys, tiny_corpus, tiny_tokenizer):
    path = write(tiny_corpus, "arch: {d_model: 32, layers: 1, heads: 2, vocab_size: 100}\n"
                              "train: {steps: 1, batch_size: 1, context: 16}\n")
    assert main(["train", "--recipe", str(path), "--out", str(tiny_corpus / "t"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"vocab_size 100 is smaller than the {len(tiny_tokenizer)} tokens" in err and err.count("\n") == 1, err
    assert not (tiny_corpus / "t").exists()


def test_a_published_recipe_trains_at_toy_size_with_overrides(capsys, tiny_corpus):
    out = tiny_corpus / "gpt2"
    assert main(["train", "--recipe", str(RECIPES / "gpt2-124m-sun2024.yaml"), "--data", "builtin", *TOY,
                 "--precision", "fp32", "--grad-accum", "2", "--out", str(out), "--quiet"]) == 0
    assert "trained gpt2 + none: 3 steps" in capsys.readouterr().out
    recipe = json.loads((out / "model" / "training.json").read_text())["recipe"]
    assert recipe["arch"]["d_model"] == 32 and recipe["arch"]["context"] == 32
    assert recipe["arch"]["vocab_size"] == 4096  # the built-in tokenizer's, not GPT-2's 50304
    assert recipe["train"]["grad_accum"] == 2 and recipe["train"]["lr"] == 6e-4  # flag, and the file's value


def test_a_tiny_recipe_file_trains_in_bf16_with_accumulation(capsys, tiny_corpus, tiny_tokenizer):
    path = write(tiny_corpus, f"""name: tiny
source: a test
arch: {{arch: llama, d_model: 32, layers: 2, heads: 2, vocab_size: {len(tiny_tokenizer)}}}
train: {{steps: 2, batch_size: 2, grad_accum: 2, context: 32, warmup: 1, precision: bf16, log_every: 1}}
""")
    assert main(["train", "--recipe", str(path), "--out", str(tiny_corpus / "t"), "--quiet"]) == 0
    info = json.loads((tiny_corpus / "t" / "model" / "training.json").read_text())
    assert info["recipe"]["train"]["precision"] == "bf16" and info["final"]["step"] == 2
    assert info["recipe"]["digest"] == load_recipe_file(path).recipe().digest()
