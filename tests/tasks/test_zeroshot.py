"""Zero-shot tasks through lm-eval on a model in memory, checked against hand-computed log-likelihoods."""

import json

import pytest
import torch

from qharness.core.errors import DataError
from qharness.tasks.spec import get_task, read_task_file
from qharness.tasks.zeroshot import zero_shot

ITEMS = [
    {"query": "And the LORD spake unto", "choices": [" Moses", " the fish", " Jonah, saying", " them"], "gold": 2},
    {"query": "In the beginning God created", "choices": [" the heaven", " a cat", " nothing", " all"], "gold": 0},
    {"query": "And it came to", "choices": [" pass", " rest", " light", " be"], "gold": 0},
    {"query": "The word of the", "choices": [" LORD", " man", " sea", " day"], "gold": 1},
]


def write_task(folder, items, output_type="multiple_choice"):
    (folder / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (folder / "mc.yaml").write_text(f"name: mc\nkind: zero-shot\ndata: items.jsonl\noutput_type: {output_type}\n"
                                    "chance: 0.25\n")
    return read_task_file(folder / "mc.yaml")


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[tokenizer.bos_token_id, *whole]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    start = 1 + len(context_ids)
    return sum(logprobs[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))


def test_multiple_choice_accuracy_matches_hand_computed_loglikelihoods(tiny_model, tiny_tokenizer, tmp_path):
    task = write_task(tmp_path, ITEMS)
    metrics = {m.name: m for m in zero_shot(tiny_model, tiny_tokenizer, task, progress=False)}
    picks = [max(range(4), key=lambda c, i=i: continuation_logprob(tiny_model, tiny_tokenizer, i["query"],
                                                                   i["choices"][c])) for i in ITEMS]
    expected = sum(p == i["gold"] for p, i in zip(picks, ITEMS, strict=True)) / len(ITEMS)
    assert metrics["acc"].value == pytest.approx(expected)
    assert metrics["acc"].n == 4 and metrics["acc"].chance == 0.25 and metrics["acc"].kind == "zero-shot"
    assert set(metrics) == {"acc", "acc_norm"}


# choices of very different lengths, so that dividing by length changes some picks
NORM_ITEMS = [
    {"query": "And the LORD spake unto", "choices": [" Moses and Aaron, saying", " him", " the children of Israel",
                                                      " them"], "gold": 3},
    {"query": "In the beginning", "choices": [" God", " was the word and the word was with God", " of days",
                                               " and the end"], "gold": 2},
    {"query": "And it came to", "choices": [" pass in those days", " be", " an end", " nought"], "gold": 1},
    {"query": "The word of the", "choices": [" LORD came unto me", " man", " prophet which he spake", " day"],
     "gold": 0},
]


def test_acc_and_acc_norm_match_hand_computed_picks(tiny_model, tiny_tokenizer, tmp_path):
    """acc: the choice with the largest summed log-likelihood; acc_norm: the largest log-likelihood per character
    of the choice (lm-eval's definition). The items are chosen so the two picks differ on some item, so neither
    metric can stand in for the other."""
    task = write_task(tmp_path, NORM_ITEMS)
    metrics = {m.name: m.value for m in zero_shot(tiny_model, tiny_tokenizer, task, progress=False)}
    acc_picks, norm_picks = [], []
    for item in NORM_ITEMS:
        lls = [continuation_logprob(tiny_model, tiny_tokenizer, item["query"], c) for c in item["choices"]]
        acc_picks.append(max(range(4), key=lambda c, lls=lls: lls[c]))
        norm_picks.append(max(range(4), key=lambda c, lls=lls, item=item: lls[c] / len(item["choices"][c])))
    assert acc_picks != norm_picks, (acc_picks, norm_picks)
    golds = [item["gold"] for item in NORM_ITEMS]
    expected_acc = sum(p == g for p, g in zip(acc_picks, golds, strict=True)) / 4
    expected_norm = sum(p == g for p, g in zip(norm_picks, golds, strict=True)) / 4
    assert expected_acc != expected_norm, (acc_picks, norm_picks)
    assert metrics["acc"] == pytest.approx(expected_acc) and metrics["acc_norm"] == pytest.approx(expected_norm)
    assert (expected_acc, expected_norm) == (0.5, 0.75)  # the model the comment above describes


def test_scores_do_not_change_with_batch_size(tiny_model, tiny_tokenizer, tmp_path):
    task = write_task(tmp_path, ITEMS)
    one = zero_shot(tiny_model, tiny_tokenizer, task, batch_size=1, progress=False)
    four = zero_shot(tiny_model, tiny_tokenizer, task, batch_size=4, progress=False)
    assert [m.value for m in one] == [m.value for m in four]


def test_limit_takes_the_first_items(tiny_model, tiny_tokenizer, tmp_path):
    task = write_task(tmp_path, ITEMS)
    assert zero_shot(tiny_model, tiny_tokenizer, task, limit=2, progress=False)[0].n == 2


def test_greedy_last_word_task(tiny_model, tiny_tokenizer, tmp_path):
    items = [{"query": "And the LORD spake unto", "target": " Jonah"}, {"query": "In the", "target": " beginning"}]
    task = write_task(tmp_path, items, output_type="loglikelihood")
    (metric,) = zero_shot(tiny_model, tiny_tokenizer, task, progress=False)
    assert metric.name == "acc" and metric.n == 2 and 0.0 <= metric.value <= 1.0


def test_shipped_offline_tasks_are_well_formed():
    for name, chance in (("wordnet-definition", 0.25), ("wordnet-cloze", 0.25), ("kjv-lastword", 0.0)):
        task = get_task(name)
        lines = task.data_path.read_text(encoding="utf-8").splitlines()
        assert len(lines) > 200 and task.chance == chance
        for item in map(json.loads, lines[:50]):
            if task.output_type == "multiple_choice":
                assert len(item["choices"]) == 4 and 0 <= item["gold"] < 4
                assert len(set(item["choices"])) == 4
            else:
                assert item["target"].startswith(" ") and item["query"]


def test_hub_task_offline_is_a_clear_error(tiny_model, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="task 'arc-easy': lm-eval could not run 'arc_easy' .*hub tasks need the "
                                        "internet"):
        zero_shot(tiny_model, tiny_tokenizer, get_task("arc-easy"), limit=2, progress=False)


def test_hub_perplexity_corpus_reads_through_datasets(tiny_model, tiny_tokenizer, tmp_path, heldout_text):
    from qharness.tasks.perplexity import perplexity
    from qharness.tasks.spec import load_task_text

    text = heldout_text[:1500]
    (tmp_path / "corpus.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "hub.yaml").write_text(
        "name: hub-standin\nkind: perplexity\ncontext_length: 32\n"
        f"dataset: {{path: json, data_files: {tmp_path / 'corpus.jsonl'}, split: train, field: text}}\n")
    task = read_task_file(tmp_path / "hub.yaml")
    assert load_task_text(task) == text
    via_hub = perplexity(tiny_model, tiny_tokenizer, load_task_text(task), 32, progress=False)
    direct = perplexity(tiny_model, tiny_tokenizer, text, 32, progress=False)
    assert via_hub == direct


def test_unreachable_hub_corpus_is_a_clear_error(tmp_path, monkeypatch):
    from qharness.tasks.spec import load_task_text

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="task 'wikitext2': cannot load dataset .*it needs the internet"):
        load_task_text(get_task("wikitext2"))
