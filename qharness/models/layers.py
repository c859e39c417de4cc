"""Find the decoder layers of any causal LM. The only module that knows how architectures are laid out.

Rather than a table of attribute paths per architecture (which breaks on every new model), we look for the
`nn.ModuleList` whose length is the config's layer count and whose entries share one class: that is the stack of
decoder layers in Llama, Mistral, Qwen, Gemma, Phi, OLMo (`model.layers`), GPT-2 and Falcon (`transformer.h`),
OPT (`model.decoder.layers`) and GPT-NeoX (`gpt_neox.layers`) alike.
"""

from __future__ import annotations

from torch import nn

from qharness.errors import ModelLoadError

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    text_config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for key in LAYER_COUNT_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int):
            return value
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer stack, in order. Raises ModelLoadError naming what was looked for if none is found."""
    expected = layer_count(model)
    candidates = [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len({type(layer) for layer in module}) == 1
        and (expected is None or len(module) == expected)
    ]
    if not candidates:
        raise ModelLoadError(
            f"cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList of "
            f"{expected if expected is not None else 'identical'} layers; this architecture is not supported yet"
        )
    return max(candidates, key=len)  # the outermost / longest stack: a nested list of heads is never longer


def layers_at(model: nn.Module, path: str) -> nn.ModuleList:
    """The `--layers` override: a dotted attribute path to the decoder layer list, e.g. 'model.layers'."""
    try:
        module = model.get_submodule(path)
    except AttributeError as exc:
        raise ModelLoadError(f"--layers '{path}' is not a submodule of {type(model).__name__}: {exc}") from exc
    if not isinstance(module, nn.ModuleList):
        raise ModelLoadError(f"--layers '{path}' is a {type(module).__name__}, not an nn.ModuleList of layers")
    return module


NORM_CLASSES = (nn.LayerNorm, nn.RMSNorm)


def is_norm(module: nn.Module) -> bool:
    """torch's norms, and the per-architecture RMSNorm/LayerNorm classes transformers defines for each model."""
    return isinstance(module, NORM_CLASSES) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every normalization module of the model (decoder layers and the final norm)."""
    return {name: module for name, module in model.named_modules() if is_norm(module)}


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of each decoder layer: the first submodule whose class name ends in 'Attention'
    (LlamaAttention, GPT2Attention, MistralAttention, ...)."""
    found = []
    for index, layer in enumerate(decoder_layers(model)):
        attention = next((m for m in layer.modules() if type(m).__name__.endswith("Attention")), None)
        if attention is None:
            raise ModelLoadError(f"decoder layer {index} of {type(model).__name__} has no '*Attention' module")
        found.append(attention)
    return found
