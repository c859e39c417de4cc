"""Attention KV bias (Sun et al. 2024, "Massive Activations in LLMs", sec. 5): a learnable key and value every query
can attend to, so heads park attention there instead of growing a massive activation on the BOS token to do it.
The arithmetic lives in qharness/models/attention.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qharness.models.mitigations import MITIGATIONS, Mitigation, placed_like

if TYPE_CHECKING:
    import torch
    from torch import nn


def add_kv_bias_(model: nn.Module) -> None:
    from qharness.models.attention import KVBias, use_mitigated_attention_
    from qharness.models.layers import attention_modules

    config = model.config
    for attention in attention_modules(model):
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        attention.kv_bias = placed_like(KVBias(kv_heads, attention.head_dim), attention)
    use_mitigated_attention_(model)


def retrofit_kv_bias_(model: nn.Module, batches: list[torch.Tensor]) -> None:
    add_kv_bias_(model)
    zero_kv_bias_(model)


def zero_kv_bias_(model: nn.Module) -> None:
    """For a trained model: k' = v' = 0. The sink then adds nothing to any head's output, but it still takes the
    softmax share 1 / (1 + sum_j exp(s_j)) of each query, so the function changes by as much as the heads' scores
    leave room for: little where a head already sinks its attention into BOS with a large score."""
    import torch

    from qharness.models.layers import attention_modules

    with torch.no_grad():
        for attention in attention_modules(model):
            attention.kv_bias.k.zero_()
            attention.kv_bias.v.zero_()


MITIGATIONS.add("kv_bias", Mitigation(
    name="kv_bias",
    description="learnable k', v' per layer and head prepended to keys and values (not rotated), init N(0, 0.02)",
    reference="Sun et al. 2024, Massive Activations in Large Language Models (arXiv 2402.17762), sec. 5",
    build=add_kv_bias_,
    retrofit=retrofit_kv_bias_,
))
