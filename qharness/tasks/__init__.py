"""Tasks: declared in YAML under the top-level `tasks/` folder, registered by name, run by kind.

Add a task: drop `tasks/<name>.yaml` with `name`, `kind` and the kind's fields (see `spec.py`); no code changes.
"""

from qharness.tasks.spec import TASKS, TaskSpec, get_task, load_task_text

__all__ = ["TASKS", "TaskSpec", "get_task", "load_task_text"]
