"""What the run tests share: settings for the tiny model on the short task, and a run without progress bars."""

from qharness.experiment.runner import run as run_with_progress
from qharness.experiment.settings import RunSettings


def run(settings: RunSettings, say):
    return run_with_progress(settings, say=say, progress=False)


def spec_for(model_dir, task_dir, results, **kwargs) -> RunSettings:
    return RunSettings(model=str(model_dir), tasks=(str(task_dir / "short.yaml"),), results=results, **kwargs)
