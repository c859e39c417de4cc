import pytest

from qharness.core.errors import ConfigError, DataError, UnknownName
from qharness.tasks.spec import all_tasks, get_task, read_task_file


def test_shipped_tasks_load_and_their_data_exists():
    names = {task.name for task in all_tasks()}
    assert {"kjv-heldout", "wordnet-heldout"} <= names
    for task in all_tasks():
        if task.data is not None:
            assert task.data_path.is_file()
        assert len(task.content_hash()) == 12
    hub = {task.name for task in all_tasks() if task.data is None}
    assert {"wikitext2", "c4", "pg19", "hellaswag", "piqa", "arc-easy", "winogrande", "lambada-openai"} <= hub


def test_zero_shot_hashes_follow_the_scoring_and_perplexity_ones_do_not(monkeypatch):
    from qharness.tasks import spec

    zero_shot, ppl, hub = get_task("wordnet-cloze"), get_task("kjv-heldout"), get_task("hellaswag")
    before = zero_shot.content_hash(), ppl.content_hash(), hub.content_hash()
    monkeypatch.setattr(spec, "ZERO_SHOT_SCORING", spec.ZERO_SHOT_SCORING + 1)
    assert zero_shot.content_hash() != before[0]  # rows scored the old way are other cells
    assert (ppl.content_hash(), hub.content_hash()) == before[1:]  # lm-eval configures hub tasks itself


def test_unknown_task_lists_known_ones():
    with pytest.raises(UnknownName, match="unknown task 'kjv'; did you mean 'kjv-heldout'"):
        get_task("kjv")


def test_task_file_by_path_and_hash_follows_data(tiny_task_dir):
    task = get_task(str(tiny_task_dir / "short.yaml"))
    assert task.name == "short" and task.context_length == 64
    before = task.content_hash()
    (tiny_task_dir / "data" / "short.txt").write_text("changed text", encoding="utf-8")
    assert task.content_hash() != before


def test_bad_task_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: perplexity\ndata: d.txt\ncontxt_length: 5\n")
    with pytest.raises(ConfigError, match=r"task x: unknown keys \['contxt_length'\]; valid keys: "):
        read_task_file(bad)
    bad.write_text("name: x\nkind: ranking\ndata: d.txt\n")
    with pytest.raises(ConfigError, match=r"task x: kind is 'ranking' \(str\); expected 'perplexity' or 'zero-shot'"):
        read_task_file(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_task_file(bad)
    bad.write_text("name: x\nkind: perplexity\ndata: missing.txt\n")
    with pytest.raises(DataError, match="task 'x': data file not found: .*missing.txt"):
        read_task_file(bad).content_hash()
    with pytest.raises(DataError, match="task file not found: .*nope.yaml"):
        get_task(str(tmp_path / "nope.yaml"))
