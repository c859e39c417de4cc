"""Built-in names (`smollm2-135m`): real pretrained models that a package registry ships; see models/shipped.py."""

from __future__ import annotations

from typing import Any

from qharness.models.shipped import BUILTIN_MODELS
from qharness.models.sources import SOURCES, Source


def read(name: str, dtype: Any) -> tuple[Any, Any, str]:
    from qharness.models.loading import load_pretrained

    entry = BUILTIN_MODELS.get(name)
    model, tokenizer = load_pretrained(str(entry.materialize()), dtype)  # fetched and converted once, then cached
    return model, tokenizer, entry.provenance


SOURCES.add("builtin", Source(
    name="builtin",
    form=f"a built-in name ({', '.join(BUILTIN_MODELS.names())})",
    order=10,
    matches=lambda name: name in BUILTIN_MODELS,
    read=read,
    context_limit=lambda name: BUILTIN_MODELS.get(name).positions,
    names=BUILTIN_MODELS.names,
))
