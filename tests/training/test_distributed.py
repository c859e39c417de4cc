"""Data-parallel training as `accelerate launch` runs it, on the CPU: accelerate's debug_launcher forks 2 processes
joined by gloo. Only the main process builds the corpus and saves the model, the zoo's lock cannot deadlock the
ranks, a killed 2-process run resumes to the same weights, and a 1-process run refuses the 2-process checkpoint."""

import json
import os

import pytest
import torch

from qharness.core.errors import ConfigError
from qharness.data.recipe import ArchConfig, Recipe
from qharness.models import mitigations
from qharness.models.sources import zoo as zoo_names
from qharness.training import cached, run, text
from qharness.training.architectures import new_model
from qharness.training.loop import CHECKPOINT, LOG, TrainConfig, process_state, train

PROCESSES = 2
TEXT_VOCAB = 512  # the corpus's BPE: small, so the tiny model's embedding stays small


def in_fresh_interpreter(function, *args):
    """`function(*args)` in a new (spawned) interpreter, which then forks the ranks. debug_launcher forks the process
    it runs in, and a fork of this one hangs in its first MKL/OpenMP region once an earlier test here ran one
    (libgomp is not fork-safe: the child waits on the parent's thread team)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result(timeout=300)


def launch(function, *args) -> None:
    from accelerate import debug_launcher

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the forked ranks inherit a tokenizer that may have run
    debug_launcher(function, args=args, num_processes=PROCESSES)


def one_thread_per_rank() -> None:
    torch.set_num_threads(1)  # 2 ranks on 2 cores


def record(path, what: str) -> None:
    with path.open("a") as handle:
        handle.write(f"{what} {os.getpid()}\n")


def train_zoo_model_on_each_rank(name: str) -> None:
    one_thread_per_rank()
    assert cached.train_zoo_model(name, progress=False) is not None, "no budget: runs to the end"


def zoo_job(tmp_path, name: str) -> None:
    """`accelerate launch -m qharness train --model <name>` with a tiny recipe and the registries' text replaced by
    the shipped calibration text; every corpus build and model save is recorded in calls.txt with its rank."""
    from qharness.tasks.spec import tasks_dir

    documents = (tasks_dir() / "data" / "calibration.txt").read_text(encoding="utf-8")[:30000].split("\n\n")
    calls = tmp_path / "calls.txt"
    original_save, original_build = run.save_trained, text.build

    def fetch_texts():
        record(calls, f"fetch-rank{process_state().process_index}")
        return documents

    def save_trained(*args, **kwargs):
        record(calls, f"save-rank{process_state().process_index}")
        return original_save(*args, **kwargs)

    os.environ["QHARNESS_CACHE"] = str(tmp_path / "cache")
    text.training_texts, run.save_trained = fetch_texts, save_trained
    text.build = lambda folder, texts: original_build(folder, texts, TEXT_VOCAB)
    zoo_names.RECIPE = tiny_recipe()
    launch(train_zoo_model_on_each_rank, name)


def tiny_recipe() -> Recipe:
    return Recipe(arch=ArchConfig(d_model=32, layers=2, heads=2, context=32, vocab_size=TEXT_VOCAB),
                      train=TrainConfig(steps=6, batch_size=2, context=32, warmup=1, log_every=2, checkpoint_every=4))


def test_two_processes_train_a_zoo_model_into_one_folder(monkeypatch, tmp_path):
    name = "zoo:llama-kv_bias"
    in_fresh_interpreter(zoo_job, tmp_path, name)
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(zoo_names, "RECIPE", tiny_recipe())
    calls = tmp_path / "calls.txt"

    lines = calls.read_text().split()
    assert lines[0::2] == ["fetch-rank0", "save-rank0"]  # one corpus build, one save: the main process's
    folder = zoo_names.folder_for(name)
    # finished: the model and its log stay, the checkpoint (only for resuming) is gone
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted([LOG, "model"])
    info = json.loads((folder / "model" / "training.json").read_text())
    assert info["processes"] == PROCESSES and info["final"]["step"] == 6

    from qharness.models.sources import ModelSpec, load_model

    loaded = load_model(ModelSpec(name, device="cpu"), progress=False)  # trained: read back, not retrained
    assert calls.read_text().split()[0::2] == ["fetch-rank0", "save-rank0"]
    ids = loaded.tokenizer("In the beginning", return_tensors="pt")["input_ids"]
    assert torch.isfinite(loaded.model(ids).logits).all()


def tiny(tokenizer, seed: int = 0):
    model = new_model(ArchConfig(d_model=32, layers=2, heads=2, context=32, vocab_size=len(tokenizer)),
                      tokenizer.bos_token_id, tokenizer.eos_token_id, seed)
    applied = mitigations.build_(model, "tvr+kv_bias")  # a step hook (TVR) and extra parameters (KV bias)
    mitigations.initialize_(model, applied)
    return model, [m.after_step for m in applied if m.after_step is not None]


def train_on_each_rank(tokens, tokenizer, cfg, out_dir, seed, kill_at) -> None:
    one_thread_per_rank()

    def kill(model, step):
        if step == kill_at:
            raise RuntimeError(f"killed at step {step}")

    model, hooks = tiny(tokenizer, seed)
    train(model, tokens, cfg, out_dir, tokenizer.bos_token_id, [*hooks, kill], progress=False)


def resume_job(tokens, tokenizer, cfg, tmp_path) -> str:
    """An unbroken 2-process run in a/, one killed at step 3 in b/, then b/ resumed from another init; returns how
    the killed one ended."""
    from torch.multiprocessing import ProcessRaisedException

    launch(train_on_each_rank, tokens, tokenizer, cfg, tmp_path / "a", 0, None)
    try:
        launch(train_on_each_rank, tokens, tokenizer, cfg, tmp_path / "b", 0, 3)
        ended = "finished"
    except ProcessRaisedException as exc:
        ended = str(exc).strip().splitlines()[-1]
    step = json.loads((tmp_path / "b" / CHECKPOINT / "state.json").read_text())["step"]
    launch(train_on_each_rank, tokens, tokenizer, cfg, tmp_path / "b", 1, None)  # other init: overwritten
    return f"{ended}; checkpoint at step {step}"


def test_a_killed_two_process_run_resumes_to_the_same_weights(training_tokens, tiny_tokenizer, tmp_path):
    from safetensors.torch import load_file

    cfg = TrainConfig(steps=6, batch_size=2, context=32, warmup=2, log_every=2, checkpoint_every=2)
    ended = in_fresh_interpreter(resume_job, training_tokens, tiny_tokenizer, cfg, tmp_path)
    assert ended == "RuntimeError: killed at step 3; checkpoint at step 2"
    unbroken = load_file(tmp_path / "a" / CHECKPOINT / "model.safetensors")
    resumed = load_file(tmp_path / "b" / CHECKPOINT / "model.safetensors")
    assert unbroken.keys() == resumed.keys()
    for key in unbroken:
        assert torch.equal(unbroken[key], resumed[key]), key
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / LOG).read_text().splitlines()]
    assert steps == [2, 4, 6]  # one log line per interval, written by the main process only

    model, hooks = tiny(tiny_tokenizer)
    message = (r"was trained by 2 processes, this run has 1 \(it changes the batches\); "
               r"resume with accelerate launch --num_processes 2")
    with pytest.raises(ConfigError, match=message):
        train(model, training_tokens, cfg, tmp_path / "a", tiny_tokenizer.bos_token_id, hooks, progress=False)
