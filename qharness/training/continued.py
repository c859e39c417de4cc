"""Continued training of a pretrained model with a mitigation (`qharness train --from MODEL`, and the `tune:` names
trained on first use): the model as `--model` loads it, in fp32, the mitigation added without changing what it
computes, then the same loop as the zoo's on text tokenized with the model's own tokenizer.

A mitigation is added either because it keeps the model's function (none, the control; the loss-side outlier
penalty) or through its `retrofit`, which adds it so the function moves as little as it can; the change is
measured on calibration text and recorded in training.json:
- the loss-side penalties (outlier_penalty, lp_penalty) change no module: 0;
- gated attention: gates 2 * sigmoid(0 x + 0) = 1, an exact pass-through that still learns (sigmoid's slope 1/4);
- clipped softmax: gamma starts at 0 (exactly softmax) and ramps to its value over the first steps;
- TVR: each decoder matrix's target std is its own pretrained std (0.02 would shrink SmolLM2's weights by 2x to
  20x and break it), so TVR only stops the weights' variance growing during continued training;
- KV bias: k' = v' = 0, a sink that adds nothing but still takes a softmax share (not exact);
- DyT: cannot equal a norm (tanh cannot divide by each token's RMS), so each DyT is fitted to its norm's outputs
  on calibration text (alpha by grid, gamma and beta by least squares per channel) and training does the rest.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qharness.core.cache import cache_dir
from qharness.core.errors import DataError, first_line
from qharness.core.provenance import row_fields
from qharness.data.recipe import TUNE_TRAIN, TuneRecipe
from qharness.models import mitigations
from qharness.models.drift import logit_drift, logit_gap
from qharness.models.sources import ModelSpec, load_model
from qharness.models.sources.tune import check_context, folder_for, recipe_for, snapshot_folder
from qharness.training.heldout import Decontaminator
from qharness.training.hub_text import is_hub_text, stream_documents
from qharness.training.hub_text import parse as parse_hub_text
from qharness.training.loop import CHECKPOINT, LOG, TrainResult, train
from qharness.training.recipe_file import BUILTIN
from qharness.training.text import encode_stream, training_texts

TEXT_SUFFIXES = (".txt", ".md", ".rst")
DATA_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")  # what a --data folder is read for
TEXT_VERSION = 2  # part of the token cache's key: 2 drops documents that overlap the evaluation text
TUNE_TOKENS = TUNE_TRAIN.tokens  # what one default run reads
DISTILL_LOG = "distill.json"  # in the run folder: the distillation before step 1, when the mitigation has one


def read_documents(data: tuple[str, ...], needed_tokens: int = TUNE_TOKENS,
                   count_tokens: Callable[[str], int] = lambda text: len(text.split()),
                   say: Callable[[str], Any] = lambda message: None) -> list[str]:
    """Documents from text files, folders of them, JSON lines with a "text" field, parquet files with a "text"
    column, or hub datasets (`hf:...`, streamed until they hold `needed_tokens` as `count_tokens` counts); () is the
    built-in training text. Any document that overlaps the evaluation text is dropped (heldout.py)."""
    if not data:
        return training_texts()  # split from the held-out text by construction
    check_data(data)
    guard = Decontaminator()
    documents: list[str] = []
    for item in data:
        if is_hub_text(item):
            documents += stream_documents(parse_hub_text(item), needed_tokens, count_tokens, guard.is_clean)
        else:
            documents += [doc for doc in _documents_of(Path(item).expanduser()) if guard.is_clean(doc)]
    if guard.dropped:
        say(f"tune: dropped {guard.dropped} document(s) that share a 13-word sequence with the evaluation text")
    if not any(doc.strip() for doc in documents):
        overlap = f" once {guard.dropped} overlapping the evaluation text are dropped" if guard.dropped else ""
        raise DataError(f"--data {' '.join(data)} holds no text{overlap}; give text files, a folder of them, .jsonl "
                        "with a 'text' field, .parquet with a 'text' column or hf:DATASET")
    return documents


def check_data(data: tuple[str, ...]) -> None:
    """The checks made before a model loads (or a base model is trained): each hf: item's form and split, each local
    item's files (see `_files_of`), and their text: every .jsonl line an object whose 'text' is a string, text files
    UTF-8, and some text in all (an empty folder of files would otherwise fail only after the model loaded)."""
    holds_text = False  # hub datasets and parquet columns are read when training reads them: counted as text here
    for item in data:
        if is_hub_text(item):
            parse_hub_text(item)
            holds_text = True
        elif item == BUILTIN and not Path(item).exists():
            raise DataError(f"--data {BUILTIN}: with --from the built-in training text is what leaving --data out "
                            "reads; drop --data (or give files, folders or hf:DATASET)")
        else:
            for file in _files_of(Path(item).expanduser()):  # every document read, so every line is checked
                texts = 1 if file.suffix == ".parquet" else sum(1 for doc in _file_documents(file) if doc.strip())
                holds_text = holds_text or texts > 0
    if data and not holds_text:
        raise DataError(f"--data {' '.join(data)} holds no text; give text files, a folder of them, .jsonl with a "
                        "'text' field, .parquet with a 'text' column or hf:DATASET")


def data_files(data: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each local file --data reads, by content: path, size, mtime and sha256. The token cache is keyed on these (a
    file rewritten in place is new text, not the old text's cached tokens) and training.json records them."""
    from qharness.models.shipped import sha256_of

    files = []
    for item in data:
        if is_hub_text(item):
            continue
        for file in _files_of(Path(item).expanduser()):
            stat = file.stat()
            files.append({"path": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                          "sha256": sha256_of(file)})
    return files


def _files_of(path: Path) -> list[Path]:
    """The files a local --data item stands for: itself, or a folder's files of the kinds read here. A .json file
    is refused (read as text it would train on JSON syntax), and a parquet file must open and hold 'text'."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"--data {path}: no .txt, .md, .rst, .jsonl or .parquet files in this folder")
    elif not path.is_file():
        raise DataError(f"--data {path}: no such file or folder")
    elif path.suffix == ".json":
        raise DataError(f"--data {path}: a .json file is not read as records; give JSON lines (.jsonl), one object "
                        "with a 'text' field per line")
    else:
        files = [path]
    for file in files:
        if file.suffix == ".parquet":
            _check_parquet(file)
    return files


def _check_parquet(path: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"--data {path}: reading parquet needs pyarrow: pip install -c constraints.txt pyarrow"
                        ) from None
    try:
        columns = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"--data {path}: not a readable parquet file ({first_line(exc)})") from None
    if "text" not in columns:
        raise DataError(f"--data {path}: a parquet file needs a 'text' column, it has {columns}")


def _documents_of(path: Path) -> Iterator[str]:
    for file in _files_of(path):
        yield from _file_documents(file)


def _file_documents(file: Path) -> Iterator[str]:
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from (str(text) for text in pq.read_table(file, columns=["text"]).column("text").to_pylist() if text)
        return
    try:
        content = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"--data {file}: not UTF-8 text (binary?)") from None
    if file.suffix == ".jsonl":
        yield from _jsonl_texts(file, content)
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
        if not isinstance(text, str):  # str(None) trained on the word "None"
            raise DataError(f"--data {path}: line {number} has 'text': {json.dumps(text)}, not a string")
        yield text


def tuning_tokens(tokenizer: Any, data: tuple[str, ...], progress: bool = True,
                  needed_tokens: int = TUNE_TOKENS, files: list[dict[str, Any]] | None = None) -> torch.Tensor:
    """The training text as one token stream of the model's own tokenizer, cached by (tokenizer, data, the content
    of each local file (`data_files`, computed unless given), and for streamed data the tokens asked for)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    streamed = [needed_tokens] if any(is_hub_text(item) for item in data) else []
    files = data_files(data) if files is None else files
    key = hashlib.sha256(json.dumps([vocab, list(data), TEXT_VERSION, *streamed, *([files] if files else [])]
                                    ).encode()).hexdigest()[:16]
    path = cache_dir("tune", "text") / f"{key}.npy"
    if not path.is_file():
        say = print if progress else (lambda message: None)
        say("tune: reading and tokenizing the training text (once per tokenizer and data)")

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        stream = encode_stream(tokenizer, read_documents(data, needed_tokens, count, say))
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
        mitigations.record_(model, spec)
        return 0.0
    batches = calibration_batches(tokenizer, calibration_text(), n=2, length=128,
                                  device=next(model.parameters()).device)

    def add() -> None:
        for mitigation in resolved:  # in the spec's order: each retrofit fits the model the previous one left
            if mitigation.retrofit is not None:
                mitigation.retrofit(model, batches)
            elif mitigation.build is not None:  # preserves_function: its modules compute nothing new at first
                mitigation.build(model)
        mitigations.record_(model, spec)

    return logit_drift(model, batches, add)


def loss_penalty(recipe: TuneRecipe) -> Any:
    """The recipe's loss-side mitigation with its settings, or None (`mitigations.check_penalty` says what is
    refused)."""
    penalty = mitigations.check_penalty(recipe.mitigation, recipe.penalty)
    return None if penalty is None else penalty.penalty(dict(recipe.penalty))


def check_recipe(recipe: TuneRecipe) -> None:
    """Everything about a continued training that can be refused before a model loads or its base trains for
    minutes: the penalty's settings, the sequence length against the base's positions, and the data."""
    loss_penalty(recipe)
    check_context(recipe)
    check_data(recipe.data)


def continue_training(recipe: TuneRecipe, out_dir: Path, progress: bool = True, budget_minutes: float | None = None,
                      device: str = "auto") -> TrainResult:
    """Train `recipe.base` further with `recipe.mitigation` in out_dir (checkpoint, log) and save the model to
    out_dir/model when done. Resumes a checkpoint of the same recipe. The base must exist (`ensure` it first)."""
    from qharness.tasks.perplexity import bos_token_id
    from qharness.training.run import finished_run, save_final

    done = finished_run(out_dir, recipe.digest())
    if done is not None:
        return done
    check_recipe(recipe)
    penalty = loss_penalty(recipe)
    loaded = load_model(ModelSpec(recipe.base, dtype="fp32", device=device), progress=progress)
    model, tokenizer = loaded.model, loaded.tokenizer
    applied = mitigations.resolve(recipe.mitigation)
    resuming = (out_dir / CHECKPOINT / "state.json").is_file()  # its weights replace whatever is done here
    teacher = copy.deepcopy(model) if any(m.distill for m in applied) and not resuming else None
    change = retrofit_(model, recipe.mitigation, tokenizer)
    if progress and recipe.mitigation != "none":
        print(f"{recipe.mitigation} added to {recipe.base}: logits moved by {change:.2%} of their largest value "
              "before any step")
    cfg = recipe.train if budget_minutes is None else replace(recipe.train, budget_minutes=budget_minutes)
    files = data_files(recipe.data)
    tokens = tuning_tokens(tokenizer, recipe.data, progress, needed_tokens=cfg.tokens, files=files)
    if teacher is not None:
        distill_to_(model, teacher, applied, tokens, recipe, tokenizer, out_dir, progress)
        del teacher
    distilled = json.loads((out_dir / DISTILL_LOG).read_text()) if (out_dir / DISTILL_LOG).is_file() else None
    if distilled is not None:
        change = distilled["logit_change_after"]  # what training starts from
    hooks = [m.after_step for m in applied if m.after_step is not None]
    if recipe.snapshots:
        hooks.append(snapshot_hook(recipe, tokenizer, out_dir, change))
    result = train(model, tokens, cfg, out_dir, bos_token_id(tokenizer), hooks, progress,
                   penalty=penalty)
    if result.finished:
        log = [json.loads(line) for line in (out_dir / LOG).read_text().splitlines()]
        info = {"recipe": {**asdict(recipe), "digest": recipe.digest()}, "base_source": loaded.source,
                "retrofit_logit_change": change, "distillation": distilled, "final": log[-1] if log else {},
                "tokens_seen": cfg.tokens, "data_files": files,
                **row_fields(next(model.parameters()).device)}
        save_final(model, tokenizer, out_dir, info, progress)
    return result


def distill_to_(model: Any, teacher: Any, applied: list[Any], tokens: torch.Tensor, recipe: TuneRecipe,
                tokenizer: Any, out_dir: Path, progress: bool) -> None:
    """Distil the retrofitted model's new parameters to the original's logits (training/distill.py) and record the
    log and the logit change before and after in out_dir/distill.json, which a resumed run reads back."""
    from qharness.quant.calibrate import calibration_batches, calibration_text
    from qharness.tasks.perplexity import bos_token_id
    from qharness.training.distill import DistillConfig, distill_

    batches = calibration_batches(tokenizer, calibration_text(), n=2, length=128,
                                  device=next(model.parameters()).device)  # the batches retrofit_ measures on
    before = logit_gap(model, teacher, batches)
    trainable = [p for m in applied if m.distill is not None for p in m.distill(model)]
    cfg = DistillConfig()
    log = distill_(model, teacher, trainable, tokens, recipe.train, bos_token_id(tokenizer), cfg,
                   drift=lambda: logit_gap(model, teacher, batches))
    record = {"steps": cfg.steps, "lr": cfg.lr, "parameters": sum(p.numel() for p in trainable),
              "logit_change_before": before, "logit_change_after": log[-1]["logit_drift"], "log": log}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DISTILL_LOG).write_text(json.dumps(record, indent=1))
    if progress:
        print(f"distilled {record['parameters']} parameters to {recipe.base}'s logits for {cfg.steps} steps: logits "
              f"now {record['logit_change_after']:.2%} of their largest value away (from {before:.2%})")


def snapshot_hook(recipe: TuneRecipe, tokenizer: Any, out_dir: Path, change: float) -> Callable[[Any, int], None]:
    """The step hook that keeps a bf16 copy of the weights at each of the recipe's snapshot steps (run by the main
    process only). It runs before that step's checkpoint, so a run killed in between redoes the step and writes
    the same snapshot again."""
    from qharness.training.loop import process_state
    from qharness.training.run import save_snapshot

    def hook(model: Any, step: int) -> None:
        if step in recipe.snapshots and process_state().is_main_process:
            info = {"recipe": {**asdict(recipe), "digest": recipe.digest()}, "step": step,
                    "tokens_seen": step * recipe.train.batch_size * recipe.train.grad_accum * recipe.train.context,
                    "retrofit_logit_change": change, "precision": "bf16 copy of the fp32 training weights"}
            save_snapshot(model, tokenizer, snapshot_folder(out_dir, step), info, progress=False)

    return hook


def train_tune_model(name: str, progress: bool = True, budget_minutes: float | None = None) -> Path | None:
    """Train the tune: model `name` unless it is trained; its model folder, or None when the budget stopped it."""
    from qharness.training.cached import train_once

    recipe = recipe_for(name)
    kept = f", weights kept at steps {', '.join(map(str, recipe.snapshots))}" if recipe.snapshots else ""
    return train_once(name, folder_for(name), f"{recipe.train.steps} steps from {recipe.base}{kept}",
                      lambda folder: continue_training(recipe, folder, progress, budget_minutes), progress)
