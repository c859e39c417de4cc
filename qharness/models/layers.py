"""Find the decoder layers of any causal LM. The only module that knows how architectures are laid out.

Rather than a table of attribute paths per architecture (which breaks on every new model), we look for the
`nn.ModuleList` whose length is the config's layer count and whose entries share one class: that is the stack of
decoder layers in Llama, Mistral, Qwen, Gemma, Phi, OLMo (`model.layers`), GPT-2 and Falcon (`transformer.h`),
OPT (`model.decoder.layers`) and GPT-NeoX (`gpt_neox.layers`) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qharness.core.errors import ModelLoadError

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


def is_rms_norm(module: nn.Module) -> bool:
    """An RMSNorm without a bias: x / rms(x) * g, which commutes with an orthogonal rotation once g is folded out
    (LayerNorm's mean subtraction does not)."""
    is_rms = isinstance(module, nn.RMSNorm) or type(module).__name__.endswith("RMSNorm")
    return is_rms and getattr(module, "bias", None) is None


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


@dataclass(frozen=True)
class BlockLayout:
    """One pre-norm Llama-style decoder layer, as the residual stream sees it: h += o(attn(norm1(h))), then
    h += down(act(gate(norm2(h))) * up(norm2(h)))."""

    attn_norm: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    mlp_norm: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    heads: int  # query heads; o_proj's input is heads x head_dim
    kv_heads: int  # key/value heads (fewer than heads under grouped-query attention)
    head_dim: int
    attention: nn.Module  # self_attn, which holds q/k/v/o and whatever a mitigation added (a gate, a KV bias)


@dataclass(frozen=True)
class DecoderLayout:
    """The modules that read or write the residual stream of a Llama-style decoder, in order."""

    embed: nn.Embedding
    blocks: list[BlockLayout]
    final_norm: nn.Module
    lm_head: nn.Linear


LLAMA_STYLE = ("Llama-style decoders (Llama, Mistral, Qwen2, SmolLM2: pre-norm layers with input_layernorm, "
               "self_attn.q/k/v/o_proj, post_attention_layernorm, mlp.gate/up/down_proj)")


def _block_layout(layer: nn.Module, heads: int, kv_heads: int) -> BlockLayout | None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    parts = {name: getattr(attn, f"{name}_proj", None) for name in "qkvo"}
    parts |= {name: getattr(mlp, f"{name}_proj", None) for name in ("gate", "up", "down")}
    norms = [getattr(layer, name, None) for name in ("input_layernorm", "post_attention_layernorm")]
    if not all(isinstance(p, nn.Linear) for p in parts.values()) or not all(n is not None and is_norm(n)
                                                                            for n in norms):
        return None
    head_dim = parts["q"].out_features // heads
    return BlockLayout(norms[0], parts["q"], parts["k"], parts["v"], parts["o"], norms[1], parts["gate"],
                       parts["up"], parts["down"], heads, kv_heads, head_dim, attn)


def llama_layout(model: nn.Module) -> DecoderLayout | None:
    """The residual-stream layout of a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM2), or None for any other
    (GPT-2's fused c_attn and c_fc, OPT's, a model whose norms a mitigation replaced). These are Hugging Face's
    attribute names for that family; a transform that relies on the layout checks the function it computes after
    using it, so a look-alike that computes something else is refused rather than silently changed."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(heads, int) or not isinstance(embed, nn.Embedding) or not isinstance(lm_head, nn.Linear):
        return None
    layers = decoder_layers(model)
    inside = {id(m) for layer in layers for m in layer.modules()}
    final = [m for m in norm_modules(model).values() if id(m) not in inside]
    blocks = [_block_layout(layer, heads, getattr(config, "num_key_value_heads", None) or heads) for layer in layers]
    if len(final) != 1 or any(b is None for b in blocks):
        return None
    return DecoderLayout(embed, blocks, final[0], lm_head)
