"""A local Hugging Face folder: config.json, tokenizer and *.safetensors (never pickled weights)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from qharness.core.errors import ModelLoadError
from qharness.models.sources import SOURCES, Source


def matches(name: str) -> bool:
    path = Path(name).expanduser()
    if path.is_dir():
        check_model_folder(path)
        return True
    if path.exists():  # .gguf files were claimed by the gguf source before this one
        raise ModelLoadError(f"'{name}' is a file but not a .gguf model; pass a .gguf file or a model folder")
    return False


def check_model_folder(path: Path) -> None:
    """A folder without config.json is no model: say so (and where the model of a `train --out` folder is) instead
    of the tokenizer error transformers gives for it."""
    if (path / "config.json").is_file():
        return
    if (path / "model" / "config.json").is_file():
        raise ModelLoadError(f"'{path}' is a training run folder; its model is in {path / 'model'}: pass --model "
                             f"{shlex.quote(str(path / 'model'))}")
    raise ModelLoadError(f"'{path}' has no config.json, so it is not a Hugging Face model folder; pass a folder with "
                         "config.json, tokenizer and *.safetensors (or a .gguf file, a built-in or hub name)")


def read(name: str, dtype: Any) -> tuple[Any, Any, str]:
    from qharness.models.loading import load_pretrained

    path = Path(name).expanduser().resolve()
    return (*load_pretrained(str(path), dtype), f"local:{path}")


def read_placed(name: str, dtype: Any, spread: Any) -> tuple[Any, Any, str, Any]:
    from qharness.models.loading import load_pretrained_placed

    path = Path(name).expanduser().resolve()
    model, tokenizer, placed = load_pretrained_placed(str(path), dtype, spread)
    return model, tokenizer, f"local:{path}", placed


def context_limit(name: str) -> int | None:
    """Learned positions (GPT-2's n_positions) or the config's max_position_embeddings, when the config says."""
    config_path = Path(name).expanduser() / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text())
    return config.get("n_positions") or config.get("max_position_embeddings")


SOURCES.add("folder", Source(name="folder", form="an existing local folder", order=40, matches=matches, read=read,
                             context_limit=context_limit, read_placed=read_placed))
