"""Attention KV bias (Sun et al. 2024, "Massive Activations in LLMs", sec. 5): a learnable key and value every query
can attend to, so heads park attention there instead of growing a massive activation on the BOS token to do it.
The arithmetic lives in qharness/models/attention.py."""

from __future__ import annotations

from torch import nn

from qharness.models.attention import KVBias, use_mitigated_attention_
from qharness.models.layers import attention_modules
from qharness.models.mitigations import MITIGATIONS, Mitigation, placed_like


def add_kv_bias_(model: nn.Module) -> None:
    config = model.config
    for attention in attention_modules(model):
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        attention.kv_bias = placed_like(KVBias(kv_heads, attention.head_dim), attention)
    use_mitigated_attention_(model)


MITIGATIONS.add("kv_bias", Mitigation(
    name="kv_bias",
    description="learnable k', v' per layer and head prepended to keys and values (not rotated), init N(0, 0.02)",
    reference="Sun et al. 2024, Massive Activations in Large Language Models (arXiv 2402.17762), sec. 5",
    build=add_kv_bias_,
))
