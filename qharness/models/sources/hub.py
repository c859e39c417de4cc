"""A Hugging Face hub id ("org/name"), for users online: safetensors only, no remote code."""

from __future__ import annotations

import re
from typing import Any

from qharness.models.sources import SOURCES, Source

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def matches(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def read(name: str, dtype: Any) -> tuple[Any, Any, str]:
    from qharness.models.loading import load_pretrained

    return (*load_pretrained(name, dtype), f"hub:{name}")


def read_placed(name: str, dtype: Any, spread: Any) -> tuple[Any, Any, str, Any]:
    from qharness.models.loading import load_pretrained_placed

    model, tokenizer, placed = load_pretrained_placed(name, dtype, spread)
    return model, tokenizer, f"hub:{name}", placed


SOURCES.add("hub", Source(name="hub", form="or a hub id like 'HuggingFaceTB/SmolLM2-135M'", order=50,
                          matches=matches, read=read, read_placed=read_placed))
