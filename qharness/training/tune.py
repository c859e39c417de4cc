"""Continued training of a pretrained model with a mitigation (`qharness train --from MODEL`, and the `tune:` names
trained on first use): the model as `--model` loads it, in fp32, the mitigation added without changing what it
computes, then the same loop as the zoo's on text tokenized with the model's own tokenizer.

A mitigation is added either because it keeps the model's function (none, the control; the loss-side outlier
penalty) or through its `retrofit`, which sets what it adds so the function moves as little as it can (KV bias:
k' = v' = 0), the change measured on calibration text and recorded in training.json. The others (DyT, gated
attention, clipped softmax, TVR) have no retrofit yet and are refused with that reason.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qharness.cache import cache_dir
from qharness.errors import ConfigError, DataError
from qharness.models import mitigations
from qharness.models.sources import ModelSpec, load_model
from qharness.models.sources.tune import folder_for, recipe_for
from qharness.provenance import row_fields
from qharness.recipe import TuneRecipe
from qharness.training.loop import LOG, TrainResult, train
from qharness.training.text import encode_stream, training_texts

TEXT_SUFFIXES = (".txt", ".md", ".rst")


def read_documents(data: tuple[str, ...]) -> list[str]:
    """Documents from text files, folders of them, JSON lines with a "text" field, or parquet files with a "text"
    column; () is the built-in training text (never the held-out evaluation text)."""
    if not data:
        return training_texts()
    documents = [doc for item in data for doc in _documents_of(Path(item).expanduser())]
    if not any(doc.strip() for doc in documents):
        raise DataError(f"--data {' '.join(data)} holds no text; give text files, a folder of them, .jsonl with a "
                        "'text' field or .parquet with a 'text' column")
    return documents


def _documents_of(path: Path) -> Iterator[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (*TEXT_SUFFIXES, ".jsonl", ".parquet"))
        if not files:
            raise DataError(f"--data {path}: no .txt, .md, .rst, .jsonl or .parquet files in this folder")
        for file in files:
            yield from _documents_of(file)
        return
    if not path.is_file():
        raise DataError(f"--data {path}: no such file or folder")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise DataError(f"--data {path}: a parquet file needs a 'text' column, it has {table.column_names}")
        yield from (str(text) for text in table.column("text").to_pylist() if text)
        return
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"--data {path}: not UTF-8 text (binary?)") from None
    if path.suffix == ".jsonl":
        yield from _jsonl_texts(path, content)
    else:
        yield from (part for part in content.split("\n\n") if part.strip())


def _jsonl_texts(path: Path, content: str) -> Iterator[str]:
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError):
            raise DataError(f"--data {path}: line {number} is not a JSON object with a 'text' field") from None
        yield str(text)


def tuning_tokens(tokenizer: Any, data: tuple[str, ...], progress: bool = True) -> torch.Tensor:
    """The training text as one token stream of the model's own tokenizer, cached by (tokenizer, data)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    key = hashlib.sha256(json.dumps([vocab, list(data)]).encode()).hexdigest()[:16]
    path = cache_dir("tune", "text") / f"{key}.npy"
    if not path.is_file():
        if progress:
            print("tune: reading and tokenizing the training text (once per tokenizer and data)")
        stream = encode_stream(tokenizer, read_documents(data))
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, stream)
        tmp.replace(path)
    return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))


def retrofit_(model: Any, spec: str, tokenizer: Any) -> float:
    """Add the mitigations of `spec` to a trained model as `retrofit` prescribes; returns how much that changed its
    function: max |logits after - logits before| / max |logits before| on two sequences of the calibration text."""
    from qharness.quant.calibrate import calibration_batches, calibration_text

    resolved = mitigations.resolve(spec)
    if not any(m.build or m.retrofit for m in resolved):  # nothing touches a module: the function is the same
        mitigations.build_(model, spec)  # still records the spec in the config
        return 0.0
    batches = calibration_batches(tokenizer, calibration_text(), n=2, length=128,
                                  device=next(model.parameters()).device)
    with torch.no_grad():
        before = [model(input_ids=ids).logits for ids in batches]
        for mitigation in mitigations.build_(model, spec):
            if mitigation.retrofit is not None:
                mitigation.retrofit(model)
        after = [model(input_ids=ids).logits for ids in batches]
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(after, before, strict=True))


def continue_training(recipe: TuneRecipe, out_dir: Path, progress: bool = True, budget_minutes: float | None = None,
                      device: str = "auto") -> TrainResult:
    """Train `recipe.base` further with `recipe.mitigation` in out_dir (checkpoint, log) and save the model to
    out_dir/model when done. Resumes a checkpoint of the same recipe. The base must exist (`ensure` it first)."""
    from qharness.tasks.perplexity import bos_token_id
    from qharness.training.run import finished_run, save_final

    done = finished_run(out_dir, recipe.digest())
    if done is not None:
        return done
    loaded = load_model(ModelSpec(recipe.base, dtype="fp32", device=device), progress=progress)
    model, tokenizer = loaded.model, loaded.tokenizer
    change = retrofit_(model, recipe.mitigation, tokenizer)
    if progress and recipe.mitigation != "none":
        print(f"{recipe.mitigation} added to {recipe.base}: logits moved by {change:.2%} of their largest value "
              "before any step")
    applied = mitigations.resolve(recipe.mitigation)
    penalties = [m.penalty(dict(recipe.penalty)) for m in applied if m.penalty is not None]
    if len(penalties) > 1:
        raise ConfigError(f"mitigation '{recipe.mitigation}' joins {len(penalties)} loss penalties; use one")
    hooks = [m.after_step for m in applied if m.after_step is not None]
    tokens = tuning_tokens(tokenizer, recipe.data, progress)
    cfg = recipe.train if budget_minutes is None else replace(recipe.train, budget_minutes=budget_minutes)
    result = train(model, tokens, cfg, out_dir, bos_token_id(tokenizer), hooks, progress,
                   penalty=penalties[0] if penalties else None)
    if result.finished:
        log = [json.loads(line) for line in (out_dir / LOG).read_text().splitlines()]
        info = {"recipe": {**asdict(recipe), "digest": recipe.digest()}, "base_source": loaded.source,
                "retrofit_logit_change": change, "final": log[-1] if log else {},
                "tokens_seen": cfg.steps * cfg.batch_size * cfg.grad_accum * cfg.context,
                **row_fields(next(model.parameters()).device)}
        save_final(model, tokenizer, out_dir, info, progress)
    return result


def train_tune_model(name: str, progress: bool = True, budget_minutes: float | None = None) -> Path | None:
    """Train the tune: model `name` unless it is trained; its model folder, or None when the budget stopped it."""
    from qharness.training.zoo import train_once

    recipe = recipe_for(name)
    return train_once(name, folder_for(name), f"{recipe.train.steps} steps from {recipe.base}",
                      lambda folder: continue_training(recipe, folder, progress, budget_minutes), progress)
