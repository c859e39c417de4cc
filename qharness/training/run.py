"""One training run end to end: corpus, fresh model, mitigation, loop, and the saved Hugging Face folder.
Shared by `qharness train` and the zoo, so a zoo model and a hand-trained one are made the same way."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from qharness.core.errors import ConfigError
from qharness.core.provenance import row_fields
from qharness.models import mitigations
from qharness.models.loading import quiet_transformers
from qharness.training.architectures import new_model
from qharness.training.loop import CHECKPOINT, LOG, TrainResult, process_state, train
from qharness.training.text import training_corpus


def save_trained(model: Any, tokenizer: Any, folder: Path, info: dict[str, Any], progress: bool = True) -> None:
    """save_pretrained (safetensors) + tokenizer + training.json, swapped in whole so a kill leaves no half model."""
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    with quiet_transformers(progress):
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    (staging / "training.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def save_snapshot(model: Any, tokenizer: Any, folder: Path, info: dict[str, Any], progress: bool = True) -> None:
    """The weights as they are now, in bf16 (half the fp32 size: 270 MB for a 135M-parameter model), as a model
    folder any command loads (it upcasts them to the dtype it asks for); swapped in whole like `save_trained`."""
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    state = {name: tensor.detach().to(torch.bfloat16) for name, tensor in model.state_dict().items()}
    with quiet_transformers(progress):
        model.save_pretrained(staging, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    (staging / "training.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def finished_run(out_dir: Path, digest: str) -> TrainResult | None:
    """The result of a run whose model out_dir already holds, trained by the recipe with `digest`; None when there
    is none. A rerun then loads nothing and trains nothing (the checkpoint is gone, see `save_final`); a model
    from another recipe is refused rather than overwritten."""
    info_path = out_dir / "model" / "training.json"
    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    if info.get("recipe", {}).get("digest") != digest:
        raise ConfigError(f"{out_dir} already holds a model trained by another recipe; "
                          "give --out a new folder, or remove that one to retrain")
    final = info.get("final", {})
    return TrainResult(int(final.get("step", 0)), True, float(final.get("loss", float("nan"))), 0.0)


def save_final(model: Any, tokenizer: Any, out_dir: Path, info: dict[str, Any], progress: bool = True) -> None:
    """Save the trained model to out_dir/model, then drop the checkpoint: its optimizer moments (twice the weights)
    and its copy of the weights only serve resuming an unfinished run (1.6 GB for a 135M-parameter model)."""
    save_trained(model, tokenizer, out_dir / "model", info, progress)
    shutil.rmtree(out_dir / CHECKPOINT, ignore_errors=True)


def train_model(recipe: Any, out_dir: Path, progress: bool = True, budget_minutes: float | None = None,
                tokens: torch.Tensor | None = None, tokenizer: Any = None) -> TrainResult:
    """Train `recipe` (a zoo.Recipe) in out_dir (checkpoint, log) and save the model to out_dir/model when done.
    tokens/tokenizer default to the zoo's training corpus; tests pass small ones."""
    mitigations.check_from_scratch(recipe.mitigation)
    done = finished_run(out_dir, recipe.digest())
    if done is not None:
        return done
    manifest: dict[str, Any] = {}
    if tokens is None:
        tokenizer, tokens, manifest = training_corpus(progress)
    if recipe.arch.vocab_size < len(tokenizer):  # token ids past the embedding fail at the first step
        raise ConfigError(f"vocab_size {recipe.arch.vocab_size} is smaller than the {len(tokenizer)} tokens of the "
                          f"tokenizer the training text is read with; give vocab_size {len(tokenizer)} or more")
    cfg = recipe.train if budget_minutes is None else replace(recipe.train, budget_minutes=budget_minutes)
    model = new_model(recipe.arch, tokenizer.bos_token_id, tokenizer.eos_token_id, cfg.seed)
    applied = mitigations.build_(model, recipe.mitigation)
    mitigations.initialize_(model, applied)
    hooks = [m.after_step for m in applied if m.after_step is not None]
    result = train(model, tokens, cfg, out_dir, tokenizer.bos_token_id, hooks, progress)
    state = process_state()
    if result.finished and state.is_main_process:  # one writer: every rank swapping the same folder would race
        log = [json.loads(line) for line in (out_dir / LOG).read_text().splitlines()]
        info = {"recipe": {"arch": asdict(recipe.arch), "train": asdict(recipe.train),
                           "mitigation": recipe.mitigation, "digest": recipe.digest()},
                "processes": state.num_processes,  # data-parallel processes: each drew batch_size sequences a step
                "corpus": manifest, "final": log[-1] if log else {}, "seconds_last_call": result.seconds,
                "parameters": sum(p.numel() for p in model.parameters()),
                **row_fields(next(model.parameters()).device)}
        save_final(model, tokenizer, out_dir, info, progress)
    state.wait_for_everyone()  # the others return once the model is there for them to load
    return result
