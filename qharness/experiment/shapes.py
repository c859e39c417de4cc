"""A model's shapes before its weights load: hidden size, positions and the Linears a scheme quantizes, read from
its config (config.json, a GGUF header, or the zoo's recipe) and a skeleton built on the meta device (no memory, no
weights). The plan checks kept channels, kept Linears and each backend's width limits against these, so a bad
setting is refused before minutes of loading.

`model_shapes(name)` is None where the config cannot be read without fetching or loading anything (a hub id not yet
in the local hub cache, a built-in model not yet fetched): then the same checks run on the loaded model instead
(`shapes_of`), as they did before there was a plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qharness.models.sources import classify


@dataclass(frozen=True)
class ModelShapes:
    hidden_size: int | None  # the residual width kept channels index; None if the config does not say
    max_positions: int | None  # learned or trained positions (n_positions, max_position_embeddings)
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)  # target name -> (out_features, in_features)

    def meta_linears(self) -> dict[str, Any]:
        """Weightless nn.Linear stand-ins of the targets, for checks written against modules (backend widths)."""
        from torch import nn

        return {name: nn.Linear(inp, out, bias=False, device="meta") for name, (out, inp) in self.linears.items()}


def shapes_of(model: Any) -> ModelShapes:
    """The shapes of a model in memory (a meta skeleton or the loaded model), its Conv1D already converted."""
    from qharness.quant.apply import target_linears

    config = model.config
    return ModelShapes(
        hidden_size=getattr(config, "hidden_size", None) or getattr(config, "n_embd", None),
        max_positions=getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None),
        linears={name: tuple(linear.weight.shape) for name, linear in target_linears(model).items()},
    )


def _folder_config(folder: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)


def _gguf_config(path: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)


def _file_config(path: Path | None) -> Any:
    if path is None:
        return None
    return _gguf_config(path) if path.suffix == ".gguf" else _folder_config(path)


def _builtin_config(name: str) -> Any:
    from qharness.models.shipped import BUILTIN_MODELS

    return _file_config(BUILTIN_MODELS.get(name).local())


def _zoo_config(name: str) -> Any:
    from qharness.models import mitigations
    from qharness.models.sources import zoo

    if zoo.is_trained(name):
        return _folder_config(zoo.folder_for(name) / "model")
    from qharness.training.architectures import transformers_config

    recipe = zoo.recipe_for(name)  # not trained yet: the config its training will write
    config = transformers_config(recipe.arch, bos_id=0, eos_id=1)
    setattr(config, mitigations.CONFIG_KEY, recipe.mitigation)
    return config


def _tune_config(name: str) -> Any:
    from qharness.models import mitigations
    from qharness.models.sources import tune

    folder = tune.folder_for(name) / "model"
    if (folder / "config.json").is_file():
        return _folder_config(folder)
    base, mitigation = tune.parse(name)  # not trained yet: the base's config with the mitigation added
    config = model_config(base)
    if config is not None:
        setattr(config, mitigations.CONFIG_KEY, mitigation)
    return config


def _hub_config(name: str) -> Any:
    """Only from the local hub cache: planning never waits on the network (loading fetches the model anyway)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name, trust_remote_code=False, local_files_only=True)


def _pair_config(name: str) -> Any:
    from qharness.models.sources.pairs import published

    return _hub_config(published(name).hub_id)


CONFIGS: dict[str, Callable[[str], Any]] = {  # source kind -> its model's config, read without loading weights
    "builtin": _builtin_config,
    "zoo": _zoo_config,
    "tune": _tune_config,
    "gguf": lambda name: _gguf_config(Path(name).expanduser()),
    "folder": lambda name: _folder_config(Path(name).expanduser()),
    "hub": _hub_config,
    "pairs": _pair_config,
}


def model_config(name: str) -> Any:
    """The transformers config of model `name`, or None where reading it would mean fetching or loading. Any failure
    here is None too: the loader then says what is wrong with the model, in its own words."""
    reader = CONFIGS.get(classify(name))
    if reader is None:
        return None
    from qharness.models.loading import quiet_transformers

    try:
        with quiet_transformers(False):
            return reader(name)
    except Exception:  # noqa: BLE001 - knowing the shapes early is an optimisation; the load reports the error
        return None


def skeleton(config: Any) -> Any:
    """The model `config` describes, its mitigation modules built and GPT-2's Conv1D converted, on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from qharness.models import mitigations
    from qharness.models.loading import quiet_transformers
    from qharness.quant.apply import convert_conv1d_

    with torch.device("meta"), quiet_transformers(False):
        model = AutoModelForCausalLM.from_config(config)
        mitigations.build_(model, mitigations.recorded(config))
    convert_conv1d_(model)
    return model


def model_shapes(name: str) -> ModelShapes | None:
    """`name`'s shapes from its config and a meta skeleton; None when the config is not at hand (see the module)."""
    config = model_config(name)
    return None if config is None else shapes_of(skeleton(config))
