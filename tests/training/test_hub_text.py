"""`--data hf:...`: the form, streaming only as far as needed, and the refusals. Offline: `datasets.load_dataset` is
replaced by a stand-in that records how it was called and how far it was read."""

from __future__ import annotations

import pytest

from qharness.core.errors import DataError
from qharness.tasks.spec import tasks_dir
from qharness.training import hub_text
from qharness.training.continued import read_documents, tuning_tokens
from qharness.training.hub_text import HubText, parse, stream_documents

HELDOUT_CHAPTER = (tasks_dir() / "data" / "kjv-heldout.txt").read_text(encoding="utf-8").split("\n\n")[1]


class FakeHub:
    """load_dataset's stand-in: rows with the text under `field`, one held-out chapter among them."""

    def __init__(self, field: str = "text", rows: int = 1000) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.read = 0
        self.field, self.rows = field, rows

    def load_dataset(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self._rows()

    def _rows(self):
        for i in range(self.rows):
            self.read += 1
            text = HELDOUT_CHAPTER if i == 1 else f"document {i} " + "word " * 20
            yield {"id": i, self.field: text}


@pytest.fixture()
def hub(monkeypatch):
    import datasets

    fake = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", fake.load_dataset)
    return fake


@pytest.mark.parametrize(("item", "expected"), [
    ("hf:HuggingFaceFW/fineweb-edu", HubText("HuggingFaceFW/fineweb-edu", None, "train", "text")),
    ("hf:HuggingFaceFW/fineweb-edu:sample-10BT", HubText("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text")),
    ("hf:Salesforce/wikitext:wikitext-103-raw-v1:train",
     HubText("Salesforce/wikitext", "wikitext-103-raw-v1", "train", "text")),
    ("hf:bigcode/the-stack-smol::train:content", HubText("bigcode/the-stack-smol", None, "train", "content")),
])
def test_the_form_parses(item, expected):
    assert parse(item) == expected


@pytest.mark.parametrize("item", ["hf:", "hf::x", "hf:a/b:c:d:e:f", "hf:a/b/c"])
def test_a_malformed_name_says_the_form(item):
    with pytest.raises(DataError, match=r"write hf:DATASET\[:CONFIG\[:SPLIT\[:FIELD\]\]\]"):
        parse(item)


@pytest.mark.parametrize("item", [
    "hf:Salesforce/wikitext:wikitext-103-raw-v1:test", "hf:wikitext:wikitext-2-raw-v1:test",
    "hf:allenai/c4:en:validation", "hf:deepmind/pg19::test", "hf:allenai/ai2_arc:ARC-Easy:test",
])
def test_a_split_that_a_task_evaluates_on_is_refused(item):
    with pytest.raises(DataError, match="holds evaluation text .*train on its train split"):
        parse(item)


def test_streaming_reads_only_what_is_needed_from_the_text_field_and_drops_held_out_text(hub):
    hub.field = "content"
    spec = parse("hf:org/corpus:cfg:train:content")
    kept = []
    docs = stream_documents(spec, needed_tokens=100, count_tokens=lambda text: len(text.split()),
                            keep=lambda text: HELDOUT_CHAPTER not in text or kept.append(text))
    assert hub.calls == [(("org/corpus", "cfg"), {"split": "train", "streaming": True})]
    assert len(docs) == 5 and all(d.startswith("document") for d in docs)  # 22 words each: 5 reach 100
    assert hub.read == 6  # the held-out chapter was read, dropped, and not counted; then it stopped
    assert kept == [HELDOUT_CHAPTER]


def test_read_documents_drops_streamed_evaluation_text(hub):
    said = []
    docs = read_documents(("hf:org/corpus",), needed_tokens=50, say=said.append)
    assert HELDOUT_CHAPTER not in docs and len(docs) == 3
    assert said == ["tune: dropped 1 document(s) that share a 13-word sequence with the evaluation text"]


def test_tuning_tokens_stream_as_many_tokens_as_training_needs(hub, monkeypatch, tmp_path, tiny_tokenizer):
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path))
    tokens = tuning_tokens(tiny_tokenizer, ("hf:org/corpus",), progress=False, needed_tokens=300)
    assert 300 <= len(tokens) < 400 and hub.read < 20
    more = tuning_tokens(tiny_tokenizer, ("hf:org/corpus",), progress=False, needed_tokens=3000)
    assert len(more) >= 3000  # another amount is another cache entry, not the first one reused


def test_a_missing_field_names_the_fields_there(hub):
    with pytest.raises(DataError, match=r"rows have no 'text' field \(they have \['body', 'id'\]\)"):
        hub.field = "body"
        stream_documents(parse("hf:org/corpus"), 100, len)


def test_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot stream it from the hub .*it needs the internet") as info:
        stream_documents(parse("hf:HuggingFaceFW/fineweb-edu:sample-10BT"), 100, len)
    assert "\n" not in str(info.value)


def test_without_datasets_it_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="needs `datasets`: pip install"):
        hub_text.stream_documents(parse("hf:org/corpus"), 100, len)
