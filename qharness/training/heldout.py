"""What training text must never contain: the evaluation texts. Two guards for text that does not come from the
built-in split (which corpus.py makes disjoint by construction):

- `check_hub_split`: a hub dataset that a task evaluates on may be trained on only through its train split (WikiText's
  test and validation articles are the same in WikiText-2 and -103, so every config is covered).
- `Decontaminator`: a document sharing any 13-word sequence with a shipped evaluation file (the held-out KJV and
  WordNet text, and the zero-shot items drawn from them), or holding a shorter evaluation line or item whole, is
  dropped. 13-gram overlap is the test GPT-3 used for benchmark contamination (Brown et al. 2020, appendix C);
  words are lower-cased letters and digits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from qharness.core.errors import DataError

NGRAM = 13
MIN_WORDS = 6  # shorter units ("a cat", a one-word choice) are common phrases, not evidence of contamination
WORD = re.compile(r"[a-z0-9]+")
# The hub datasets behind the lm-eval tasks (by their name without the organization), which the task YAMLs name only
# as lm-eval task names; tests/training/test_heldout.py checks every task is covered.
LM_EVAL_DATASETS = {"arc_easy": "ai2_arc", "arc_challenge": "ai2_arc", "hellaswag": "hellaswag",
                    "lambada_openai": "lambada_openai", "piqa": "piqa", "winogrande": "winogrande"}


def evaluated_datasets() -> set[str]:
    """The hub datasets (name without organization, lower case) some task evaluates on."""
    from qharness.tasks.spec import all_tasks

    names = set()
    for task in all_tasks():
        if task.dataset is not None:
            names.add(str(task.dataset["path"]).rsplit("/", 1)[-1].lower())
        elif task.lm_eval_task is not None:
            names.add(LM_EVAL_DATASETS.get(task.lm_eval_task, task.lm_eval_task).lower())
    return names


def check_hub_split(path: str, split: str, flag: str) -> None:
    """Refuse a split other than train of a dataset that a task evaluates on."""
    dataset = path.rsplit("/", 1)[-1].lower()
    if dataset in evaluated_datasets() and not split.startswith("train"):
        raise DataError(f"{flag}: split '{split}' of {path} holds evaluation text (a task evaluates on {dataset}); "
                        "train on its train split")


def _words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _ngrams(words: list[str], n: int) -> Iterator[tuple[str, ...]]:
    return (tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _evaluation_units() -> Iterator[str]:
    """Every shipped evaluation file as units of text: perplexity files by line, zero-shot items by string field."""
    from qharness.tasks.spec import all_tasks, load_task_bytes

    for task in all_tasks():
        if task.data is None:
            continue
        content = load_task_bytes(task).decode("utf-8")
        if not task.data.endswith(".jsonl"):
            yield from content.splitlines()
            continue
        for line in filter(str.strip, content.splitlines()):
            yield from (value for value in json.loads(line).values() if isinstance(value, str))


class Decontaminator:
    """Drops documents that overlap the shipped evaluation text; counts what it dropped. A unit of at least 13 words
    is matched by its 13-word sequences; a shorter one (a zero-shot query, a short gloss) of at least `MIN_WORDS`
    words only whole."""

    def __init__(self) -> None:
        self.ngrams: set[int] = set()
        self.short: dict[int, set[int]] = {}  # length -> whole short units of that many words
        try:
            for unit in _evaluation_units():
                words = _words(unit)
                if len(words) >= NGRAM:
                    self.ngrams.update(hash(g) for g in _ngrams(words, NGRAM))
                elif len(words) >= MIN_WORDS:
                    self.short.setdefault(len(words), set()).add(hash(tuple(words)))
        except DataError as exc:
            raise DataError(f"cannot check training text against the evaluation text: {exc}") from exc
        self.dropped = 0

    def is_clean(self, document: str) -> bool:
        words = _words(document)
        overlaps = any(hash(g) in self.ngrams for g in _ngrams(words, NGRAM)) or any(
            hash(g) in units for n, units in self.short.items() for g in _ngrams(words, n))
        self.dropped += overlaps
        return not overlaps
