"""Zero-shot tasks through lm-eval, on the model already in memory (quantized or not).

Local tasks (tasks/*.yaml with `data: something.jsonl`) become lm-eval task configs in code, with absolute paths
and field names instead of templates; hub tasks (`lm_eval_task: hellaswag`) are lm-eval's own. lm-eval's
`"acc,none"` keys map to our bare names in `metrics_from_lm_eval`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from typing import Any

import numpy as np

from qharness.core.errors import DataError, first_line
from qharness.core.scoped import environment, logger_level
from qharness.tasks.metrics import Metric
from qharness.tasks.spec import TaskSpec


def lm_eval_task(task: TaskSpec) -> dict[str, Any] | str:
    if task.lm_eval_task is not None:
        return task.lm_eval_task
    metrics = [{"metric": name, "aggregation": "mean", "higher_is_better": True} for name in task.metrics]
    config = {
        "task": f"qharness_{task.name.replace('-', '_')}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(task.data_path.resolve())}},
        "test_split": "test",
        "output_type": task.output_type,
        "doc_to_text": "query",
        # our choices and targets carry their own leading space (" Moses"); lm-eval's default delimiter " " would
        # score "spake unto  Moses", two spaces, a token sequence the text never has
        "target_delimiter": "",
        "metric_list": metrics,
    }
    if task.output_type == "multiple_choice":
        config.update(doc_to_choice="choices", doc_to_target="gold")
    else:
        config.update(doc_to_target="target")
    return config


def item_scores(samples: list[dict[str, Any]], name: str) -> np.ndarray | None:
    """Each item's score under metric `name` (lm-eval's logged samples), in document order; None if not logged."""
    samples = [sample for sample in samples if sample.get("filter", "none") == "none"]  # the scores of `name,none`
    if not samples or any(name not in sample for sample in samples):
        return None
    ordered = sorted(samples, key=lambda sample: int(sample["doc_id"]))
    return np.array([float(sample[name]) for sample in ordered], dtype=np.float64)


def items_hash(samples: list[dict[str, Any]]) -> str:
    """A digest of the items scored, in document order (lm-eval's doc hashes): rows pair only when it agrees."""
    ordered = sorted(samples, key=lambda sample: int(sample["doc_id"]))
    text = "\n".join(str(sample.get("doc_hash", sample["doc_id"])) for sample in ordered)
    return hashlib.sha1(text.encode()).hexdigest()[:16] if samples else ""


def metrics_from_lm_eval(task: TaskSpec, results: dict[str, Any], n: int,
                         samples: list[dict[str, Any]] | None = None) -> list[Metric]:
    """lm-eval's {"acc,none": 0.61, ...} -> our Metrics, in the task's declared order, each with its per-item
    scores when the samples were logged."""
    metrics = []
    for name in task.metrics:
        value = results.get(f"{name},none")
        if value is None:
            raise DataError(f"task '{task.name}': lm-eval returned no '{name}' (it returned "
                            f"{sorted(k.split(',')[0] for k in results if ',' in k)}); set metric_names in its YAML")
        metrics.append(Metric(name, float(value), higher_is_better=True, kind="zero-shot", n=n, chance=task.chance,
                              units=item_scores(samples or [], name), units_hash=items_hash(samples or [])))
    return metrics


def zero_shot(model: Any, tokenizer: Any, task: TaskSpec, *, limit: int | None = None, batch_size: int = 1,
              bos: bool = True, progress: bool = True) -> list[Metric]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if task.data is not None and not task.data_path.is_file():
        raise DataError(f"task '{task.name}': data file not found: {task.data_path}")
    # lm-eval passes its own disable flags to tqdm, so quiet runs catch its bars here instead.
    bars = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with environment(TOKENIZERS_PARALLELISM="false"), bars, \
                logger_level("lm_eval", logging.INFO if progress else logging.ERROR):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=bos)
            output = simple_evaluate(model=lm, tasks=[lm_eval_task(task)], limit=limit, bootstrap_iters=0,
                                     log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    except Exception as exc:
        if task.lm_eval_task is None:
            raise
        reason = first_line(exc, 160)
        raise DataError(f"task '{task.name}': lm-eval could not run '{task.lm_eval_task}' ({reason}); hub tasks "
                        "need the internet, the offline ones are in `qharness list tasks`") from exc
    name, results = next(iter(output["results"].items()))
    n = int(output.get("n-samples", {}).get(name, {}).get("effective", 0))
    # the per-item scores are what intervals resample (and pair across rows); logging them costs no model call
    return metrics_from_lm_eval(task, results, n, output.get("samples", {}).get(name))
