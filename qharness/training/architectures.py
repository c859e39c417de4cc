"""The two small architectures the zoo trains, in the paper's two families: Llama (GLU: SwiGLU MLP, RMSNorm, RoPE)
and GPT-2 (non-GLU: GELU MLP, LayerNorm, learned positions). Stock transformers classes, so everything that loads a
transformers model (the runner, the scan, the quantizers) takes them as they are."""

from __future__ import annotations

from typing import Any

import torch

from qharness.data.recipe import ArchConfig


def transformers_config(cfg: ArchConfig, bos_id: int, eos_id: int) -> Any:
    from transformers import GPT2Config, LlamaConfig

    if cfg.arch == "llama":
        # SwiGLU at 8/3 x d keeps the MLP's parameter count equal to GPT-2's 4 x d GELU MLP, rounded to 32.
        intermediate = cfg.mlp_hidden or -(-(8 * cfg.d_model // 3) // 32) * 32
        return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=intermediate,
                           num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                           max_position_embeddings=cfg.context, bos_token_id=bos_id, eos_token_id=eos_id,
                           tie_word_embeddings=True)
    # Dropout off: these models see each token about once, and it would blur the comparison across mitigations.
    return GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.layers, n_head=cfg.heads,
                      n_inner=cfg.mlp_hidden, n_positions=cfg.context, bos_token_id=bos_id, eos_token_id=eos_id,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)


def new_model(cfg: ArchConfig, bos_id: int, eos_id: int, seed: int) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(transformers_config(cfg, bos_id, eos_id), dtype=torch.float32,
                                            attn_implementation="sdpa")
