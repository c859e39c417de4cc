"""The one on-disk cache (converted models, fetched files). `QHARNESS_CACHE` moves it; default ~/.cache/qharness."""

from __future__ import annotations

import os
from pathlib import Path


def cache_path(*parts: str) -> Path:
    """Where `parts` live in the cache, created or not (for looking)."""
    root = Path(os.environ.get("QHARNESS_CACHE") or Path.home() / ".cache" / "qharness")
    return root.joinpath(*parts)


def cache_dir(*parts: str) -> Path:
    """Like cache_path, created if missing (for writing)."""
    path = cache_path(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
