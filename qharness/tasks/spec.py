"""Task specs: read from YAML, validated, hashed (data + config) so changed data never mixes with old rows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from qharness.core.errors import ConfigError, DataError, first_line
from qharness.core.registry import Registry
from qharness.core.typecheck import from_mapping, read_yaml_mapping

Kind = Literal["perplexity", "zero-shot"]
KINDS = ("perplexity", "zero-shot")
OUTPUT_TYPES = ("multiple_choice", "loglikelihood")

# Bump when zero-shot scoring changes (it is part of those tasks' hash). 2: each choice scored exactly as written
# after the query (2026-12-04); 1 let lm-eval put its default " " before choices that carry their own space.
ZERO_SHOT_SCORING = 2


def tasks_dir() -> Path:
    """The task folder: inside an installed wheel (qharness/_tasks) or at the top of a source checkout."""
    packaged = Path(__file__).resolve().parents[1] / "_tasks"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    name: str  # registry key, lowercase-hyphenated
    kind: Kind  # which runner evaluates it
    data: str | None = None  # local file relative to the YAML's folder: text (perplexity) or jsonl (zero-shot)
    dataset: dict[str, Any] | None = None  # perplexity from the hub: load_dataset kwargs + "field" (online users)
    lm_eval_task: str | None = None  # zero-shot from lm-eval's own registry (hub data, online users)
    description: str = ""
    context_length: int = 2048  # perplexity: tokens per non-overlapping window, BOS included
    output_type: str = "multiple_choice"  # local zero-shot: multiple_choice {query, choices, gold} or
    #                                       loglikelihood {query, target} (greedy exact match)
    chance: float | None = None  # zero-shot: the score of random guessing, printed beside every score
    metric_names: tuple[str, ...] | None = None  # zero-shot: which lm-eval metrics to keep (default by output_type)
    root: str = ""  # folder the YAML was read from (set by the loader)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"task '{self.name}': unknown kind '{self.kind}'; valid: {', '.join(KINDS)}")
        if self.context_length < 2:
            raise ConfigError(f"task '{self.name}': context_length must be >= 2, got {self.context_length}")
        sources = {"perplexity": ("data", "dataset"), "zero-shot": ("data", "lm_eval_task")}[self.kind]
        if sum(getattr(self, key) is not None for key in sources) != 1:
            raise ConfigError(f"task '{self.name}': a {self.kind} task needs exactly one of {' or '.join(sources)}")
        if self.output_type not in OUTPUT_TYPES:
            raise ConfigError(f"task '{self.name}': unknown output_type '{self.output_type}'; "
                              f"valid: {', '.join(OUTPUT_TYPES)}")

    @property
    def metrics(self) -> tuple[str, ...]:
        if self.kind == "perplexity":
            return ("ppl",)
        if self.metric_names:
            return tuple(self.metric_names)
        return ("acc", "acc_norm") if self.lm_eval_task or self.output_type == "multiple_choice" else ("acc",)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], root: Path) -> TaskSpec:
        checked = from_mapping(cls, raw, f"task {raw.get('name', '?')!s}", skip=("root",))
        missing = {"name", "kind"} - set(checked)
        if missing:
            raise ConfigError(f"task {raw.get('name', '?')} is missing {sorted(missing)}")
        return cls(**checked, root=str(root))

    @property
    def data_path(self) -> Path:
        if self.data is None:
            raise DataError(f"task '{self.name}' has no local data file; it reads {self.dataset or self.lm_eval_task}")
        return Path(self.root) / self.data

    def config_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "root"}

    def content_hash(self) -> str:
        """12 hex chars over the config and the local data bytes: part of every result row's key. Hub data is
        identified by its config (pin a `revision` in `dataset` to make it exact). Zero-shot tasks add how they are
        scored (local ones: lm-eval scores hub tasks its own way), so rows scored another way never pass for current
        ones."""
        config = self.config_dict()
        if self.kind == "zero-shot" and self.lm_eval_task is None:
            config["scoring"] = ZERO_SHOT_SCORING
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        if self.data is not None:
            digest.update(load_task_bytes(self))
        return digest.hexdigest()[:12]


def within_context(task: TaskSpec, limit: int | None) -> TaskSpec:
    """The task with its windows shortened to a model's context (a zoo GPT-2 has 128 learned positions). The new
    length is part of the row key and the task hash, so such rows never pass for full-length ones."""
    if task.kind != "perplexity" or limit is None or task.context_length <= limit:
        return task
    return replace(task, context_length=limit)


def load_task_bytes(task: TaskSpec) -> bytes:
    path = task.data_path
    if not path.is_file():
        raise DataError(f"task '{task.name}': data file not found: {path}; rebuild it with "
                        "`python -m qharness.tasks.rebuild tasks/data`")
    return path.read_bytes()


def load_hub_text(task: TaskSpec) -> str:
    """Perplexity text from the Hugging Face hub through `datasets` (online users; offline gives a clear error)."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"task '{task.name}' reads a hub dataset and needs `datasets`: "
                        "pip install -c constraints.txt datasets") from exc
    kwargs = dict(task.dataset)
    field_name = kwargs.pop("field", "text")
    try:
        rows = datasets.load_dataset(**kwargs)
    except Exception as exc:
        raise DataError(f"task '{task.name}': cannot load dataset {kwargs} ({first_line(exc, 160)}); it needs the "
                        "internet, or use an offline task (qharness list tasks)") from exc
    return "\n\n".join(row[field_name] for row in rows)


def load_task_text(task: TaskSpec) -> str:
    if task.dataset is not None:
        return load_hub_text(task)
    try:
        return load_task_bytes(task).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"task '{task.name}': {task.data_path} is not UTF-8 text ({exc.reason})") from exc


def read_task_file(path: Path) -> TaskSpec:
    raw = read_yaml_mapping(path, "a task file must hold a mapping of keys")
    return TaskSpec.from_dict(raw, path.parent)


TASKS: Registry[TaskSpec] = Registry("task")


def _register_task_files(folder: Path) -> None:
    for path in sorted(folder.glob("*.yaml")):
        spec = read_task_file(path)
        TASKS.add(spec.name, spec)


def get_task(name: str) -> TaskSpec:
    """A registered task by name, or any task YAML file by path (`--task path/to/mytask.yaml`)."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(f"task file not found: {path}")
        return read_task_file(path)
    if not len(TASKS):
        _register_task_files(tasks_dir())
    return TASKS.get(name)


def all_tasks() -> list[TaskSpec]:
    if not len(TASKS):
        _register_task_files(tasks_dir())
    return [entry.obj for entry in TASKS]
