"""Where a model comes from: one registered `Source` per kind of name, tried in order.

    builtin   smollm2-135m                      a real model a package registry ships (builtin.py)
    pairs     pair:osp-1.4b-muon                a public checkpoint trained with or without a mitigation (pairs.py)
    zoo       zoo:llama-kv_bias                 a small model trained here with one recipe (zoo.py)
    gguf      path/to/model.gguf                a local GGUF file, dequantized (gguf.py)
    folder    path/to/folder                    a local Hugging Face folder, safetensors only (folder.py)
    hub       HuggingFaceTB/SmolLM2-135M        a hub id, for users online (hub.py)

A source answers three questions about a name without loading weights (`matches`, `context_limit`) and one that
does (`read`). Loading never trains or builds anything: a zoo model that is not trained yet is refused here, and the
commands call `qharness.training.ensure(name)` first, which trains it. Add a source: one file in this package that
registers a `Source` in `SOURCES` (it is imported automatically); `order` places it among the others.

Nothing here imports torch or transformers at import time, so `qharness list` and `--help` stay fast.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qharness.core.errors import BackendUnavailable, ConfigError, ModelLoadError, QHarnessError
from qharness.core.registry import Registry

if TYPE_CHECKING:
    import torch

Dtype = Literal["auto", "fp32", "bf16", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
DTYPE_NAMES: tuple[str, ...] = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class ModelSpec:
    name: str = "smollm2-135m"  # built-in | zoo:<arch>-<mitigation> | pair:<alias> | folder | file.gguf | "org/name"
    dtype: Dtype = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    device: Device = "auto"  # auto: cuda when available, else cpu
    device_map: str | None = None  # accelerate's map ("auto"): the model spread over GPUs, CPU and disk (placement.py)
    max_memory: dict[str, str] | None = None  # with device_map, per device: {"0": "20GiB", "cpu": "64GiB"}

    def __post_init__(self) -> None:
        from qharness.models.placement import check_placement

        if self.dtype not in ("auto", *DTYPE_NAMES):
            raise ConfigError(f"unknown dtype '{self.dtype}'; valid: auto, {', '.join(DTYPE_NAMES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"unknown device '{self.device}'; valid: auto, cpu, cuda")
        check_placement(self.device_map, self.max_memory, ("device map", "max memory"))


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any
    spec: ModelSpec
    source: str  # what was actually read, for the result rows
    device: torch.device
    dtype: torch.dtype
    arch: str = ""  # the config's model_type: llama, gpt2, ...
    mitigation: str = "none"  # the mitigation spec its config records
    family: str = ""  # see Source.family
    train_seed: int | None = None  # the training seed of a model trained here (its training.json); None otherwise
    train_recipe: str = ""  # digest of its training recipe without the seed: the seeds of one recipe share it
    placement: Any = None  # a models.placement.Placement when accelerate spread it over devices; None: all on `device`

    def with_model(self, model: Any) -> LoadedModel:
        """The same description for another state of the model (a quantized copy)."""
        return replace(self, model=model)


@dataclass(frozen=True)
class Source:
    name: str  # the kind, as `classify` returns it
    form: str  # how a name of this kind looks, for the unknown-model message
    order: int  # sources are tried in increasing order; the first that matches reads the name
    matches: Callable[[str], bool]  # cheap, loads nothing; may raise for a malformed name of its own kind
    read: Callable[[str, Any], tuple[Any, Any, str]]  # (name, torch dtype) -> (model, tokenizer, provenance)
    context_limit: Callable[[str], int | None] = lambda name: None  # longest sequence, if known without loading
    names: Callable[[], list[str]] = lambda: []  # names it knows, for did-you-mean suggestions
    # models trained with one recipe and different mitigations share a family ("zoo:llama"), whose "none" member is
    # the others' baseline; "" for a model that belongs to none
    family: Callable[[str], str] = lambda name: ""
    describe_name: Callable[[str], dict[str, str]] | None = None  # arch/mitigation/family from the name alone
    requires: Callable[[str], tuple[str, ...]] = lambda name: ()  # models this one is made from (ensured first)
    history: Callable[[str], Path | None] = lambda name: None  # its training log (train_log.jsonl), if trained here
    # (name, torch dtype, placement.Spread) -> (model, tokenizer, provenance, (Placement, input device)): read straight
    # onto the devices of a device map, never whole in CPU memory; None: read on the CPU, then spread
    read_placed: Callable[[str, Any, Any], tuple[Any, Any, str, Any]] | None = None


SOURCES: Registry[Source] = Registry("model source")


def _load_sources() -> list[Source]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return sorted((entry.obj for entry in SOURCES), key=lambda source: source.order)


def source_for(name: str) -> Source:
    """The source that reads `name`; raises with every accepted form (and close names) when none does."""
    sources = _load_sources()
    for source in sources:
        try:
            if source.matches(name):
                return source
        except OSError as exc:  # a name the file system cannot even look up (too long, bad characters)
            shown = name if len(name) <= 60 else name[:57] + "..."
            raise ModelLoadError(f"model '{shown}' cannot be looked up as a path ({exc.strerror}); give "
                                 "a shorter path, a built-in name, a zoo name or a hub id") from None
    known = [known for source in sources for known in source.names()]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise ModelLoadError(f"unknown model '{name}'; {hint}give " + ", ".join(s.form for s in sources)
                         + " (`qharness list models`)")


def classify(name: str) -> str:
    """Which kind of source `name` is, checked without loading anything; raises for a name that is none."""
    return source_for(name).name


def context_limit(name: str) -> int | None:
    """The longest sequence a model was built or trained for, when it is known without loading the weights."""
    return source_for(name).context_limit(name)


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name in DTYPE_NAMES if torch_dtype(name) == dtype)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_device(device: Device) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("device 'cuda' requested but no CUDA GPU is visible here; use --device cpu or auto")
    return torch.device(device)


def resolve_dtype(dtype: Dtype, device: torch.device) -> torch.dtype:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(dtype)


def load_model(spec: ModelSpec, progress: bool = True) -> LoadedModel:
    """The float model in eval mode on its device, with its tokenizer. Reads only: never downloads a hub model
    unless the name is a hub id, and never trains (see `qharness.training.ensure`)."""
    from qharness.models import mitigations
    from qharness.models.loading import quiet_transformers

    source = source_for(spec.name)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    placement = None
    if spec.device_map is None:
        with quiet_transformers(progress):
            model, tokenizer, provenance = source.read(spec.name, dtype)
        model.to(device).eval()
    else:
        from qharness.models.placement import Spread, check_devices, dispatch_

        check_devices(spec.max_memory, device, "max memory")
        spread = Spread(spec.device_map, spec.max_memory, device)
        with quiet_transformers(progress):
            if source.read_placed is not None:  # a checkpoint read straight onto its devices
                model, tokenizer, provenance, (placement, device) = source.read_placed(spec.name, dtype, spread)
            else:  # read on the CPU first, then spread (GGUF, a built-in's own reader)
                model, tokenizer, provenance = source.read(spec.name, dtype)
                placement, device = dispatch_(model.eval(), *spread.settings, dtype)
    mitigation = mitigations.recorded(model.config)
    if mitigation == mitigations.NONE and source.describe_name:  # a published model's name says what it was trained
        mitigation = source.describe_name(spec.name).get("mitigation", mitigation)  # with; its config cannot
    seed, recipe = training_seed(spec.name)
    return LoadedModel(model, tokenizer, spec, provenance, device, dtype, arch=model.config.model_type,
                       mitigation=mitigation, family=source.family(spec.name), train_seed=seed, train_recipe=recipe,
                       placement=placement)


def is_trained_run(run_folder: Path) -> bool:
    """Whether a training run folder holds its finished model (run_folder/model, swapped in whole when saved)."""
    return (run_folder / "model" / "config.json").is_file()


def read_trained(name: str, run_folder: Path, dtype: Any, provenance: str, cost: str = "") -> tuple[Any, Any, str]:
    """`read` for a model trained here (zoo, tune): its run folder's model, or a one-line refusal saying how to
    train it; loading never trains."""
    from qharness.models.loading import load_pretrained

    if not is_trained_run(run_folder):
        raise ModelLoadError(f"{name} is not trained yet; `qharness train --model {name}` trains it{cost}, and "
                             "`qharness run` / `scan` / `sweep` do so on first use")
    return (*load_pretrained(str(run_folder / "model"), dtype), provenance)


def _source_if_any(name: str) -> Source | None:
    """The source of `name`, or None for a name that no longer resolves here (a leaderboard row's deleted folder)."""
    try:
        return source_for(name)
    except QHarnessError:
        return None


def related(name: str) -> tuple[tuple[str, ...], Path | None]:
    """What a model's source knows beyond loading it: the models it was made from, and its training log."""
    source = _source_if_any(name)
    if source is None:
        return (), None
    log = source.history(name)
    return source.requires(name), log if log is not None and log.is_file() else None


def training_record(name: str) -> dict[str, Any]:
    """What the training.json of a model trained here says (zoo and tune models: in their run folder, beside the
    training log; a local folder written by `qharness train --out`: its own); {} for any other model."""
    import json

    source = _source_if_any(name)
    if source is None:
        return {}
    log = source.history(name)
    paths = ([log.parent / "model" / "training.json"] if log is not None else []) + (
        [Path(name) / "training.json"] if source.name == "folder" else [])
    for path in paths:
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # an unreadable record says nothing; the model itself still loads
                return {}
    return {}


def training_seed(name: str) -> tuple[int | None, str]:
    """(training seed, digest of the recipe without its seed) of a model trained here, else (None, ''): rows of
    models with the same recipe digest and different seeds are seeds of one recipe."""
    from qharness.data.recipe import unseeded_digest

    recipe = training_record(name).get("recipe")
    if not isinstance(recipe, dict) or not isinstance(recipe.get("train"), dict) or "seed" not in recipe["train"]:
        return None, ""
    return int(recipe["train"]["seed"]), unseeded_digest(recipe)


def name_columns(name: str) -> dict[str, str]:
    """What a model's name alone says about it (arch, mitigation, family), for leaderboard rows written before those
    columns existed; only names that encode them (the zoo's) say anything."""
    source = _source_if_any(name)
    return source.describe_name(name) if source is not None and source.describe_name else {}
