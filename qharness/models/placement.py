"""Big-model inference: a model spread over GPUs, CPU memory and disk by accelerate (`--device-map auto`).

    spec = ModelSpec("path/to/model", device_map="auto", max_memory={"0": "20GiB", "cpu": "64GiB"})

`check_placement` checks the two settings' values alone (no torch import: a bad value stops before anything loads).
The map is accelerate's `infer_auto_device_map` (whole decoder layers: the model's `_no_split_modules`), as
transformers' `from_pretrained(device_map=...)` and lm-eval's `parallelize=True` make it. Two ways to apply it:
`load_placed` reads a Hugging Face checkpoint (a folder, a hub id) straight onto its devices, planned on an empty
model, so no whole copy is ever in CPU memory; `dispatch_` places a model already read on the CPU (a GGUF file, a
built-in, a mitigated model trained here) with `dispatch_model`.

What a placed model looks like to the rest of the harness (a map of more than one device; `dispatch_` hooks a
one-device map too, `load_placed` leaves it a plain model): each module carries an accelerate `AlignDevicesHook`
that moves its inputs to its execution device; a module placed on disk (or, with a GPU as the main device, in CPU
memory) has its weights on the `meta` device, and its hook loads them from its weights map for each forward and
drops them after. `quant/modules.swap_module` gives a module put in another's place the same hook, and sim
quantizes such weights as they load (`SimQuantLinear`), so the forward computes exactly what it computes on one
device.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qharness.core.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    import torch

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' and accelerate's names
# accelerate's convert_file_size_to_int: bytes, or a number with a unit (GiB = 2^30, GB = 10^9; lower-case b: bits)
_AMOUNT = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|[KMGT]b)?$", re.IGNORECASE)


def check_placement(device_map: str | None, max_memory: dict[str, str] | None, flags: tuple[str, str]) -> None:
    """Values alone: a map accelerate knows, and amounts on devices it knows. `flags`: how the user spelled the two
    settings (`--device-map`, `--max-memory` or a sweep file's keys)."""
    map_flag, memory_flag = flags
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ConfigError(f"{map_flag} '{device_map}' is not a device map; valid: {', '.join(DEVICE_MAPS)}")
    if max_memory is None:
        return
    if device_map is None:
        raise ConfigError(f"{memory_flag} limits each device of a model spread over several; it needs "
                          f"{map_flag} auto")
    for device, amount in max_memory.items():
        if not (str(device).isdigit() or device in ("cpu", "disk")):
            raise ConfigError(f"{memory_flag} device '{device}' is not one accelerate places on; valid: a GPU "
                              "index (0, 1, ...), cpu, disk")
        if not _AMOUNT.match(str(amount).strip()):
            raise ConfigError(f"{memory_flag} {device}={amount} is not an amount; give bytes or a number with a "
                              "unit, e.g. 20GiB, 500MB")


@dataclass(frozen=True)
class Spread:
    """What a model spread over devices was asked for: accelerate's map name, per-device limits, the main device."""

    device_map: str
    max_memory: dict[str, str] | None
    device: torch.device

    @property
    def settings(self) -> tuple[str, dict[str, str] | None, torch.device]:
        return self.device_map, self.max_memory, self.device


def check_devices(max_memory: dict[str, str] | None, device: torch.device, flag: str) -> None:
    """The GPUs named in max_memory exist and are used: accelerate would only log a warning and place nothing."""
    import torch

    gpus = sorted(int(key) for key in (max_memory or {}) if str(key).isdigit())
    if not gpus:
        return
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    missing = [g for g in gpus if g >= count]
    if missing:
        where = f"{count} visible GPU(s), 0..{count - 1}" if count else "no GPU in use (--device cpu, or none here)"
        raise ConfigError(f"{flag} names GPU {','.join(map(str, missing))}, but there is {where}; name only "
                          "cpu and disk, or run with --device cuda")


@dataclass
class Placement:
    """Where a placed model's modules live (module name -> device, accelerate's device map), and the folder of the
    weights offloaded to disk, removed when the model is dropped."""

    device_map: dict[str, Any]
    folder: Any = field(default=None, repr=False)  # a TemporaryDirectory, held for the model's life


Placed = tuple[Placement, "torch.device"]  # a placement and the device a placed model's inputs go to


def _memory(max_memory: dict[str, str] | None, device: torch.device) -> dict[int | str, str] | None:
    """accelerate's form (GPU indices as ints); on a CPU run only cpu and disk, even where GPUs are visible."""
    if max_memory is None:
        if device.type == "cuda":
            return None  # accelerate's own: what every GPU and the CPU have free
        from accelerate.utils import get_max_memory

        return {"cpu": get_max_memory()["cpu"]}
    return {int(key) if str(key).isdigit() else key: value for key, value in max_memory.items()}


def device_map_for(model: Any, device_map: str, max_memory: dict[str, str] | None, device: torch.device,
                   dtype: torch.dtype) -> dict[str, Any]:
    """accelerate's map of `model` (its weights real or on `meta`: only their sizes count), whole decoder layers at a
    time (the model's `_no_split_modules`)."""
    import torch
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    memory = _memory(max_memory, device)
    if device_map != "sequential" and device.type == "cuda" and torch.cuda.device_count() > 1:
        memory = get_balanced_memory(model, memory, no_split_module_classes=no_split, dtype=dtype,
                                     low_zero=device_map == "balanced_low_0")
    mapping = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    if not mapping:
        raise ModelLoadError("the device map places no module; give --max-memory more room")
    if set(mapping.values()) == {"disk"}:  # every weight read from disk for every forward; dispatch_model fails on it
        limits = ", ".join(f"{key}={value}" for key, value in (max_memory or {}).items()) or "what is free"
        raise ConfigError(f"the device map puts the whole model on disk: {limits} holds none of its modules; give "
                          "the CPU or a GPU at least its largest decoder layer or its embeddings")
    return dict(mapping)


def _main_device(mapping: dict[str, Any]) -> str | int:
    return next((d for d in mapping.values() if d not in ("cpu", "disk")), "cpu")


def _as_device(device: str | int) -> torch.device:
    import torch

    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def dispatch_(model: Any, device_map: str, max_memory: dict[str, str] | None, device: torch.device,
              dtype: torch.dtype) -> Placed:
    """Place `model` (read on the CPU) over the devices; returns the placement and the device its inputs go to (the
    embeddings')."""
    from accelerate import dispatch_model

    mapping = device_map_for(model, device_map, max_memory, device, dtype)
    folder = tempfile.TemporaryDirectory(prefix="qharness-offload-")
    main = _main_device(mapping)
    dispatch_model(model, mapping, main_device=main, offload_dir=folder.name, force_hooks=True)
    model.eval()
    return Placement(mapping, folder), _as_device(main)


def load_placed(name_or_path: str, config: Any, dtype: torch.dtype, device_map: str,
                max_memory: dict[str, str] | None, device: torch.device) -> tuple[Any, Placed]:
    """A Hugging Face checkpoint read straight onto its devices, for models larger than CPU memory: the map is planned
    on an empty (`meta`) model of the config, then transformers reads each weight from its safetensors shard onto
    the device the map gives it, writing those placed on disk to the offload folder; no whole copy is ever in CPU
    memory, as it is in `dispatch_`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
    empty.tie_weights()  # a tied head shares the embeddings' bytes, as in the loaded model: counted once
    mapping = device_map_for(empty, device_map, max_memory, device, dtype)
    del empty
    folder = tempfile.TemporaryDirectory(prefix="qharness-offload-")
    model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, dtype=dtype, device_map=mapping,
                                                 offload_folder=folder.name, use_safetensors=True,
                                                 trust_remote_code=False)
    return model.eval(), (Placement(mapping, folder), _as_device(_main_device(mapping)))


def input_device(model: Any) -> torch.device:
    """Where a model's input ids go: its embeddings' execution device when accelerate placed it (their weights may
    be offloaded, on `meta`), else its first parameter's device."""
    import torch

    hook = getattr(model.get_input_embeddings(), "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return next(model.parameters()).device


def is_offloaded(tensor: Any) -> bool:
    """A weight accelerate keeps off the module (on disk or in CPU memory) and loads for each forward."""
    return tensor.device.type == "meta"
