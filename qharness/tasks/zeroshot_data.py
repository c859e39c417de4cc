"""Build the offline zero-shot sets from the held-out documents only (corpus.py decides what is held out).

- wordnet-definition: "The word "X" means" -> the right WordNet definition among 4 (3 from other held-out synsets
  of the same part of speech). Chance 0.25.
- wordnet-cloze: a WordNet example sentence with its headword removed -> the headword among 4 of the same part of
  speech, each scored with the rest of the sentence. Chance 0.25.
- kjv-lastword: LAMBADA-like: the previous verse and the verse without its last word -> the last word, greedy.
  Chance ~1/vocabulary.

Each line of the .jsonl files is {"query", "choices", "gold"} or {"query", "target"}: no templates anywhere.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from qharness.tasks.corpus import HELDOUT_KJV_BOOKS, WORDNET_POS_FILES, Document, is_heldout

SEED = 1234
MAX_ITEMS = 500
EXAMPLE = re.compile(r'"([^"]+)"')


@dataclass(frozen=True)
class Synset:
    pos: str
    offset: str
    lemma: str
    definition: str
    examples: tuple[str, ...]


def heldout_synsets(dict_dir: Path) -> list[Synset]:
    synsets = []
    for pos in WORDNET_POS_FILES:
        for line in (dict_dir / f"data.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            if not is_heldout(Document("wordnet", f"{pos}:{parts[0]}", "")):
                continue
            lemma = re.sub(r"\(.*\)$", "", parts[4]).replace("_", " ")
            definition = gloss.split(";")[0].strip()
            synsets.append(Synset(pos, parts[0], lemma, definition, tuple(EXAMPLE.findall(gloss))))
    return synsets


def _sample(items: list[dict], rng: random.Random) -> list[dict]:
    return items if len(items) <= MAX_ITEMS else rng.sample(items, MAX_ITEMS)


def definition_items(synsets: list[Synset], rng: random.Random) -> list[dict]:
    items = []
    for synset in synsets:
        pool = [s.definition for s in synsets if s.pos == synset.pos and s.definition != synset.definition]
        choices = [synset.definition, *rng.sample(pool, 3)]
        rng.shuffle(choices)
        items.append({"query": f'The word "{synset.lemma}" means', "choices": [" " + c for c in choices],
                      "gold": choices.index(synset.definition)})
    return _sample(items, rng)


def cloze_items(synsets: list[Synset], rng: random.Random) -> list[dict]:
    items = []
    for synset in synsets:
        if " " in synset.lemma:
            continue
        for example in synset.examples:
            match = re.search(rf"\b{re.escape(synset.lemma)}\b", example)
            if match is None or match.start() == 0:
                continue
            pool = sorted({s.lemma for s in synsets if s.pos == synset.pos and " " not in s.lemma} - {synset.lemma})
            words = [synset.lemma, *rng.sample(pool, 3)]
            rng.shuffle(words)
            suffix = example[match.end():]
            items.append({"query": example[: match.start()].rstrip(), "choices": [f" {w}{suffix}" for w in words],
                          "gold": words.index(synset.lemma)})
            break
    return _sample(items, rng)


def lastword_items(kjv_jsonl: Path) -> list[dict]:
    verses = [json.loads(line) for line in kjv_jsonl.read_text(encoding="utf-8").splitlines()]
    items, previous = [], ""
    for verse in verses:
        if verse["book"] not in HELDOUT_KJV_BOOKS:
            continue
        text = verse["text"].strip()
        words = text.rstrip(".,;:!?'").split()
        if len(words) >= 8 and words[-1].isalpha():
            context = (previous + " " + " ".join(words[:-1])).strip()
            items.append({"query": context, "target": " " + words[-1]})
        previous = text if verse["verse"] > 1 else ""
    return items


def write_zero_shot_sets(out_dir: Path, kjv_jsonl: Path, wordnet_dir: Path) -> dict[str, dict[str, str | int]]:
    synsets = heldout_synsets(wordnet_dir)
    sets = {
        "wordnet-definition.jsonl": definition_items(synsets, random.Random(SEED)),
        "wordnet-cloze.jsonl": cloze_items(synsets, random.Random(SEED)),
        "kjv-lastword.jsonl": lastword_items(kjv_jsonl),
    }
    manifest = {}
    for name, items in sets.items():
        text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        (out_dir / name).write_text(text, encoding="utf-8")
        manifest[name] = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "documents": len(items),
                          "source": f"held-out documents only; qharness/tasks/zeroshot_data.py, seed {SEED}"}
    return manifest
