"""A local .gguf file: transformers dequantizes it into a float model (needs the `gguf` package)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qharness.core.errors import ModelLoadError
from qharness.models.sources import SOURCES, Source


def matches(name: str) -> bool:
    path = Path(name).expanduser()
    if path.suffix != ".gguf":
        return False
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    return True


def read(name: str, dtype: Any) -> tuple[Any, Any, str]:
    from qharness.models.loading import load_gguf

    path = Path(name).expanduser().resolve()
    return (*load_gguf(path, dtype), f"gguf:{path}")


SOURCES.add("gguf", Source(name="gguf", form="a local .gguf file", order=30, matches=matches, read=read))
