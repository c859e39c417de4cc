"""What makes a result reproducible: library versions, device, git revision, time. Copied into every row."""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path

import torch

TRACKED_PACKAGES = ("qharness", "torch", "transformers", "tokenizers", "gguf", "safetensors", "numpy")


@cache
def versions() -> str:
    """Compact JSON of the installed versions that can change a number."""
    found = {}
    for package in TRACKED_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    found["python"] = platform.python_version()
    return json.dumps(found, sort_keys=True, separators=(",", ":"))


@cache
def git_revision() -> str:
    """The source checkout's commit, with '+dirty' when it has uncommitted changes; 'unknown' outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.machine()}x{torch.get_num_threads()}"


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def row_fields(device: torch.device) -> dict[str, str]:
    """The reproducibility columns every result row carries."""
    return {"versions": versions(), "device": device_description(device), "git_rev": git_revision(),
            "time": utc_now()}
