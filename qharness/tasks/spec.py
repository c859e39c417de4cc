"""Task specs: read from YAML, validated, hashed (data + config) so changed data never mixes with old rows."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from qharness.errors import ConfigError, DataError
from qharness.registry import Registry

Kind = Literal["perplexity"]
KINDS = ("perplexity",)


def tasks_dir() -> Path:
    """The task folder: inside an installed wheel (qharness/_tasks) or at the top of a source checkout."""
    packaged = Path(__file__).resolve().parents[1] / "_tasks"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    name: str  # registry key, lowercase-hyphenated
    kind: Kind  # which runner evaluates it
    data: str  # text file, relative to the YAML's folder
    description: str = ""
    context_length: int = 2048  # tokens per non-overlapping window, BOS included
    root: str = ""  # folder the YAML was read from (set by the loader)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"task '{self.name}': unknown kind '{self.kind}'; valid: {', '.join(KINDS)}")
        if self.context_length < 2:
            raise ConfigError(f"task '{self.name}': context_length must be >= 2, got {self.context_length}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], root: Path) -> TaskSpec:
        valid = {f.name for f in fields(cls)} - {"root"}
        unknown = set(raw) - valid
        if unknown:
            raise ConfigError(f"task keys {sorted(unknown)} are not valid; valid keys: {sorted(valid)}")
        missing = {"name", "kind", "data"} - set(raw)
        if missing:
            raise ConfigError(f"task {raw.get('name', '?')} is missing {sorted(missing)}")
        return cls(**raw, root=str(root))

    @property
    def data_path(self) -> Path:
        return Path(self.root) / self.data

    def config_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "root"}

    def content_hash(self) -> str:
        """12 hex chars over the config and the data bytes: part of every result row's key."""
        digest = hashlib.sha256(json.dumps(self.config_dict(), sort_keys=True).encode())
        digest.update(load_task_bytes(self))
        return digest.hexdigest()[:12]


def load_task_bytes(task: TaskSpec) -> bytes:
    path = task.data_path
    if not path.is_file():
        raise DataError(f"task '{task.name}': data file not found: {path}; rebuild it with "
                        "`python -m qharness.tasks.corpus tasks/data`")
    return path.read_bytes()


def load_task_text(task: TaskSpec) -> str:
    try:
        return load_task_bytes(task).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"task '{task.name}': {task.data_path} is not UTF-8 text ({exc.reason})") from exc


def read_task_file(path: Path) -> TaskSpec:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a task file must hold a mapping of keys, got {type(raw).__name__}")
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
