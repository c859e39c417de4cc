"""Shared fixtures: a tiny random Llama with a real (tiny, trained-here) BPE tokenizer, saved as a local folder.

It plays the role lm-eval's DummyLM plays: the whole pipeline runs on it in a second, offline.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from qharness.tasks.spec import tasks_dir
from qharness.training.text import train_tokenizer

TINY_LAYERS = 2


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # "optimum.quanto" without optimum
        return False


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--needs", action="append", default=[], metavar="PACKAGE",
                     help="run only the tests marked needs(PACKAGE), wherever they live (a library's tox env)")


def needed_packages(item: pytest.Item) -> set[str]:
    return {mark.args[0] for mark in item.iter_markers("needs")}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`--needs PKG`: keep the tests that need PKG, deselect the rest (they run in the env without it)."""
    wanted = set(config.getoption("--needs"))
    if not wanted:
        return
    kept = [item for item in items if needed_packages(item) & wanted]
    config.hook.pytest_deselected(items=[item for item in items if not needed_packages(item) & wanted])
    items[:] = kept


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`needs(pkg)` skips with a reason when pkg is missing, unless the tox env lists it in QHARNESS_REQUIRE: there a
    missing library is an error, so a backend env can never pass by skipping. `gpu` skips without CUDA."""
    required = set(filter(None, os.environ.get("QHARNESS_REQUIRE", "").split(",")))
    for mark in item.iter_markers("needs"):
        package = mark.args[0]
        if not installed(package):
            if package in required:
                pytest.fail(f"{package} is required in this environment (QHARNESS_REQUIRE) but not installed")
            pytest.skip(f"needs {package}: pip install -c constraints.txt {package}")
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def heldout_text() -> str:
    return (tasks_dir() / "data" / "kjv-heldout.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_tokenizer(heldout_text):
    return train_tokenizer([heldout_text[:20000]], vocab_size=400)


@pytest.fixture(scope="session")
def training_tokens(tiny_tokenizer) -> torch.Tensor:
    """A token stream of training-split text (the shipped calibration file: Proverbs and training glosses)."""
    from qharness.training.text import encode_stream

    text = (tasks_dir() / "data" / "calibration.txt").read_text(encoding="utf-8")[:60000]
    return torch.from_numpy(encode_stream(tiny_tokenizer, text.split("\n\n")).astype("int64"))


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return tiny_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A local Hugging Face folder (safetensors + tokenizer): what `--model path/to/folder` reads."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(tiny_tokenizer)).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_task_dir(tmp_path, heldout_text) -> Path:
    """A task folder with one short perplexity task, for runs that must finish in a second."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "short.txt").write_text(heldout_text[:3000], encoding="utf-8")
    (tmp_path / "short.yaml").write_text(
        "name: short\nkind: perplexity\ndata: data/short.txt\ncontext_length: 64\n", encoding="utf-8"
    )
    return tmp_path
