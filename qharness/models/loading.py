"""Reading weights into a transformers model: a GGUF file, a local folder or a hub id, safetensors only.

The model sources (qharness.models.sources) decide which of these a name needs. Weights load through safetensors
only (never pickle) and `trust_remote_code` stays off: a hub model that needs remote code is refused with a message,
not run. A config that records a qharness mitigation gets its modules rebuilt before its weights load.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qharness.core.errors import ConfigError, ModelLoadError, first_line

if TYPE_CHECKING:
    from qharness.models.placement import Placed, Spread


@contextmanager
def quiet_transformers(progress: bool = True):
    """transformers and gguf print conversion chatter and deprecation notes we do not want in a results run;
    their progress bars (loading, GGUF conversion) stay unless `progress` is off."""
    from transformers.utils import logging as hf_logging

    gguf_logger = logging.getLogger("gguf")
    previous, bars, gguf_level = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), gguf_logger.level
    hf_logging.set_verbosity_error()
    gguf_logger.setLevel(logging.ERROR)
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), _gguf_bar(progress):
            warnings.simplefilter("ignore")
            yield
    finally:  # leave the process as we found it: a library caller's own logging is theirs
        hf_logging.set_verbosity(previous)
        gguf_logger.setLevel(gguf_level)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def _gguf_bar(progress: bool):
    """transformers' GGUF conversion draws a plain tqdm bar that its own progress switch does not reach; with
    progress off, it gets a disabled tqdm for the duration and its own back afterwards."""
    if progress:
        yield
        return
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    gguf_utils.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Dequantize a GGUF file into a float transformers model (needs the `gguf` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as exc:  # gguf raises ValueError, struct.error, KeyError... on a damaged file
        reason = first_line(exc)
        raise ModelLoadError(f"cannot read GGUF file {path}: {reason}; is it a complete GGUF model file?") from exc
    return model, tokenizer


def load_safetensors_(model: Any, folder: Path) -> None:
    """Load every *.safetensors file in `folder` into `model`, strictly: a key may be missing only when it is tied to
    one that was loaded (the LM head tied to the embeddings)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {folder}")
    state = {key: value for file in files for key, value in load_file(file).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[key]) for key in state if key in params}
    untied = [key for key in missing if key not in params or id(params[key]) not in loaded]
    if untied or unexpected:
        raise ModelLoadError(f"weights in {folder} do not fit the model its config describes: "
                             f"missing {untied[:3]}, unexpected {unexpected[:3]}")


def load_mitigated(folder: Path, config: Any, dtype: torch.dtype) -> Any:
    """A model we trained with a mitigation: rebuild its modules from the config, then load the weights."""
    from transformers import AutoModelForCausalLM

    from qharness.models import mitigations

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    mitigations.build_(model, mitigations.recorded(config))
    load_safetensors_(model, folder)
    return model


def load_pretrained(name_or_path: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """A local Hugging Face folder or a hub id, safetensors only, no remote code. A config that records a
    qharness mitigation gets its modules rebuilt before the weights load."""
    model, tokenizer, _ = _load(name_or_path, dtype, None)
    return model, tokenizer


def load_pretrained_placed(name_or_path: str, dtype: torch.dtype, spread: Spread) -> tuple[Any, Any, Placed]:
    """The same, spread over devices by `spread` (a device map): read straight onto its devices
    (placement.load_placed), so a model larger than CPU memory loads; a mitigated model (trained here, small) is read
    whole and then spread."""
    model, tokenizer, placed = _load(name_or_path, dtype, spread)
    assert placed is not None
    return model, tokenizer, placed


def _load(name_or_path: str, dtype: torch.dtype, spread: Spread | None) -> tuple[Any, Any, Placed | None]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qharness.models import mitigations
    from qharness.models.placement import dispatch_, load_placed

    placed = None
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
            if mitigations.recorded(config) != mitigations.NONE:
                folder = Path(name_or_path)
                if not folder.is_dir():
                    from huggingface_hub import snapshot_download

                    folder = Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))
                model = load_mitigated(folder, config, dtype)
                if spread is not None:
                    placed = dispatch_(model.eval(), *spread.settings, dtype)
            elif spread is not None:
                model, placed = load_placed(name_or_path, config, dtype, *spread.settings)
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    name_or_path, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=False
                )
    except (ModelLoadError, ConfigError):
        raise
    except Exception as exc:
        where_text = "local folder" if Path(name_or_path).is_dir() else "Hugging Face hub id (needs the internet)"
        raise ModelLoadError(f"cannot load model '{name_or_path}' as a {where_text}: {first_line(exc)}") from exc
    return model, tokenizer, placed
