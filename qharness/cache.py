"""The one on-disk cache (converted models, fetched files). `QHARNESS_CACHE` moves it; default ~/.cache/qharness."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("QHARNESS_CACHE") or Path.home() / ".cache" / "qharness")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
