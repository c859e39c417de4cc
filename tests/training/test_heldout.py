"""The evaluation text never enters training from outside the built-in split."""

from __future__ import annotations

from qharness.tasks.spec import all_tasks, tasks_dir
from qharness.training.continued import read_documents
from qharness.training.heldout import LM_EVAL_DATASETS, Decontaminator, evaluated_datasets


def test_every_hub_task_names_its_dataset():
    lm_eval = {task.lm_eval_task for task in all_tasks() if task.lm_eval_task}
    assert lm_eval <= set(LM_EVAL_DATASETS), sorted(lm_eval - set(LM_EVAL_DATASETS))
    assert {"wikitext", "c4", "pg19", "ai2_arc", "lambada_openai"} <= evaluated_datasets()


def test_overlap_with_any_evaluation_file_is_caught_and_training_text_is_not():
    guard = Decontaminator()
    data = tasks_dir() / "data"
    heldout_words = (data / "kjv-heldout.txt").read_text(encoding="utf-8").split()[200:215]
    assert not guard.is_clean("A blog post quoting " + " ".join(heldout_words) + " and more.")
    cloze = (data / "wordnet-cloze.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert not guard.is_clean(cloze)  # a zero-shot item, whose synset is held out but not in wordnet-heldout.txt
    calibration = (data / "calibration.txt").read_text(encoding="utf-8").split("\n\n")
    assert all(guard.is_clean(doc) for doc in calibration)
    assert guard.dropped == 2


def test_local_data_is_checked_too(tmp_path):
    (tmp_path / "mixed.txt").write_text("a document of its own\n\n"
                                        + (tasks_dir() / "data" / "kjv-heldout.txt").read_text().split("\n\n")[1])
    said = []
    assert read_documents((str(tmp_path / "mixed.txt"),), say=said.append) == ["a document of its own"]
    assert said and "dropped 1 document" in said[0]
