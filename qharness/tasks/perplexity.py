"""Perplexity, the paper's protocol: token-level exp(mean NLL over predicted tokens) over non-overlapping windows.

The text is tokenized once and cut into windows of `context_length - 1` text tokens. With BOS (the default) each
window is [BOS] + text and every text token is predicted; without BOS the window is the text alone and its first
token has no prediction. Both ways the windows hold the same text, so `--no-bos` isolates the BOS effect.

This is token-level perplexity, the number papers report; lm-eval's `word_perplexity` divides by words instead
and is not comparable. Every metric carries its `kind` so the two never mix.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qharness.core.errors import ConfigError
from qharness.models.placement import input_device
from qharness.tasks.metrics import Metric


def bos_token_id(tokenizer: Any) -> int:
    """The token that opens a document: the tokenizer's BOS, else its EOS (GPT-2 style <|endoftext|>)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ConfigError("this tokenizer has neither a BOS nor an EOS token to prepend; run with --no-bos")


def token_windows(ids: Sequence[int], context_length: int, bos_id: int | None) -> list[list[int]]:
    """Non-overlapping windows of `context_length - 1` text tokens, each prefixed with `bos_id` when given."""
    step = context_length - 1
    prefix = [] if bos_id is None else [bos_id]
    windows = [prefix + list(ids[i : i + step]) for i in range(0, len(ids), step)]
    return [w for w in windows if len(w) >= 2]  # a window needs one token to predict


def window_nll(model: Any, windows: list[list[int]], batch_size: int, device: torch.device,
               progress: bool = True) -> np.ndarray:
    """The NLL of every predicted token, window after window in text order (float64). Windows of equal length
    share a batch; padding is never used, so the result does not depend on `batch_size`."""
    by_length: dict[int, list[int]] = {}
    for index, window in enumerate(windows):
        by_length.setdefault(len(window), []).append(index)
    batches = [group[i : i + batch_size] for group in by_length.values() for i in range(0, len(group), batch_size)]
    per_window: list[np.ndarray] = [np.empty(0)] * len(windows)
    with torch.inference_mode(), tqdm(total=len(windows), desc="windows", unit="win", disable=not progress,
                                      leave=False) as bar:
        for batch in batches:
            input_ids = torch.tensor([windows[i] for i in batch], device=device)  # (B, T)
            logits = model(input_ids=input_ids).logits  # (B, T, V)
            # targets shifted left, the last position ignored: no copy of the (B, T, V) logits is made
            targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)  # (B, T)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")  # (B*T,)
            rows = nll.double().view(len(batch), -1)[:, :-1].cpu().numpy()  # (B, T-1): the predicted tokens
            for i, row in zip(batch, rows, strict=True):
                per_window[i] = row
            bar.update(len(batch))
    return np.concatenate(per_window)


def perplexity(model: Any, tokenizer: Any, text: str, context_length: int, *, bos: bool = True,
               batch_size: int = 1, limit: int | None = None, progress: bool = True) -> Metric:
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    windows = token_windows(ids, context_length, bos_token_id(tokenizer) if bos else None)
    if limit is not None:
        windows = windows[:limit]
    if not windows:
        raise ConfigError("the text is too short for one perplexity window")
    nll = window_nll(model, windows, batch_size, input_device(model), progress)
    return Metric("ppl", math.exp(float(nll.sum()) / len(nll)), higher_is_better=False, kind="token-level",
                  n=len(nll), units=nll, units_hash=targets_hash(windows), windows=len(windows))


def targets_hash(windows: list[list[int]]) -> str:
    """A digest of the predicted token ids in order: two rows' NLLs pair token by token only when it agrees."""
    targets = np.array([t for window in windows for t in window[1:]], dtype=np.int64)
    return hashlib.sha1(targets.tobytes()).hexdigest()[:16]
