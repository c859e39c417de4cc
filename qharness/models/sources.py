"""Where a model comes from: a built-in name, a local Hugging Face folder, a local .gguf file, or a hub id.

`load_model(spec)` resolves the spec in that order and returns the float model in eval mode with its tokenizer.
Weights load through safetensors only (never pickle) and `trust_remote_code` stays off: a hub model that needs
remote code is refused with a message, not run.
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from qharness.errors import BackendUnavailable, ConfigError, ModelLoadError, first_line
from qharness.models.builtin import BUILTIN_MODELS
from qharness.training import zoo

Dtype = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSpec:
    name: str = "smollm2-135m"  # built-in name | local HF folder | path/to/file.gguf | hub id "org/name"
    dtype: Dtype = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    device: Device = "auto"  # auto: cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"unknown dtype '{self.dtype}'; valid: auto, {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"unknown device '{self.device}'; valid: auto, cpu, cuda")


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any
    spec: ModelSpec
    source: str  # what was actually read, for the result rows
    device: torch.device
    dtype: torch.dtype



def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, known in DTYPES.items() if known == dtype)


def resolve_device(device: Device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("device 'cuda' requested but no CUDA GPU is visible here; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: Dtype, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


@contextmanager
def quiet_transformers(progress: bool = True):
    """transformers and gguf print conversion chatter and deprecation notes we do not want in a results run;
    their progress bars (loading, GGUF conversion) stay unless `progress` is off."""
    from transformers.utils import logging as hf_logging

    previous, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("gguf").setLevel(logging.ERROR)
            yield
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()


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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qharness.models import mitigations

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
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    name_or_path, config=config, dtype=dtype, use_safetensors=True, trust_remote_code=False
                )
    except ModelLoadError:
        raise
    except Exception as exc:
        where = "local folder" if Path(name_or_path).is_dir() else "Hugging Face hub id (needs the internet)"
        raise ModelLoadError(f"cannot load model '{name_or_path}' as a {where}: {first_line(exc)}") from exc
    return model, tokenizer


def classify(name: str) -> Literal["builtin", "zoo", "gguf", "folder", "hub"]:
    """Which kind of source `name` is, checked without loading anything; raises for a name that is none."""
    if name in BUILTIN_MODELS:
        return "builtin"
    if zoo.is_zoo_name(name):
        zoo.recipe_for(name)  # raises for an unknown arch or mitigation
        return "zoo"
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        return "gguf"
    if path.is_dir():
        return "folder"
    if path.exists():
        raise ModelLoadError(f"'{name}' is a file but not a .gguf model; pass a .gguf file or a model folder")
    if HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return "hub"
    raise ModelLoadError(
        f"unknown model '{name}': not a built-in name ({', '.join(BUILTIN_MODELS.names())}), a zoo model "
        "(zoo:llama-base, zoo:gpt2-kv_bias, ...; `qharness list models`), an existing "
        "local folder or .gguf file, or a hub id like 'HuggingFaceTB/SmolLM2-135M'"
    )


def context_limit(name: str) -> int | None:
    """The longest sequence a model was built or trained for, when it is known without loading the weights: a zoo
    recipe's context, or a local folder's config (learned positions, max_position_embeddings). None: not known."""
    kind = classify(name)
    if kind == "zoo":
        return zoo.recipe_for(name).arch.context
    config_path = Path(name).expanduser() / "config.json"
    if kind == "folder" and config_path.is_file():
        import json

        config = json.loads(config_path.read_text())
        return config.get("n_positions") or config.get("max_position_embeddings")
    return None


def read_model(name: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """(model, tokenizer, source description) for any accepted model name."""
    kind = classify(name)
    if kind == "builtin":
        entry = BUILTIN_MODELS.get(name)
        model, tokenizer = load_pretrained(str(entry.materialize()), dtype)
        return model, tokenizer, entry.provenance
    if kind == "zoo":
        folder = zoo.materialize(name)
        model, tokenizer = load_pretrained(str(folder), dtype)
        return model, tokenizer, f"{name} (trained here, recipe {zoo.recipe_for(name).digest()})"
    path = Path(name).expanduser().resolve()
    if kind == "gguf":
        return (*load_gguf(path, dtype), f"gguf:{path}")
    if kind == "folder":
        return (*load_pretrained(str(path), dtype), f"local:{path}")
    return (*load_pretrained(name, dtype), f"hub:{name}")


def load_model(spec: ModelSpec, progress: bool = True) -> LoadedModel:
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    with quiet_transformers(progress):
        model, tokenizer, source = read_model(spec.name, dtype)
    model.to(device).eval()
    return LoadedModel(model, tokenizer, spec, source, device, dtype)
