"""Attention with mitigations built in: attention KV bias, gated attention and clipped softmax.

transformers 5 sends every attention call of Llama, GPT-2, Mistral, Qwen... through `ALL_ATTENTION_FUNCTIONS`,
keyed by `config._attn_implementation`, and hands the attention module itself to the function. We register two
implementations, `qharness_eager` and `qharness_sdpa`, that read the mitigation's parameters off that module
(`module.kv_bias`, `module.gate`, `module.softmax_clip`) and otherwise do what eager / SDPA attention do. So a
mitigation is a few parameters attached to stock transformers modules: no subclass per architecture, no remote code,
and `save_pretrained` writes the parameters with the rest (our loader rebuilds the modules, see mitigations).

- KV bias (Sun et al. 2024, sec. 5): learnable k', v' per layer and key/value head, prepended to the keys and values
  after RoPE (so never rotated): softmax(Q [k'; K]^T / sqrt(d)) [v'; V]. The mask gains one column every query
  sees; the sequence itself stays causal.
- Gated attention (Qiu et al. 2025, "Gated Attention for LLMs", the elementwise head-specific gate after SDPA;
  Bondarenko et al. 2023 use a per-head scalar): out <- out * sigmoid(W_g x + b_g), x the attention's input, so a
  head can output nothing without parking its attention on a sink token.
- Clipped softmax (Bondarenko et al. 2023, "Quantizable Transformers", arXiv 2306.12929):
  clip((zeta - gamma) * softmax(s) + gamma, 0, 1) with gamma < 0, so exact zeros are reachable at finite logits.
  It needs the probabilities, so it always runs the explicit (eager) computation, also under `qharness_sdpa`.

KV-cache quantization (quant/kv.py) goes through the same door: `module.kv_quant`, when set, takes the keys (after
RoPE) and values and returns what a quantized cache would hold, before the KV bias is prepended (k', v' are
parameters, not cached tokens) and before eager or SDPA run, so both see exactly the same keys and values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qharness.core.errors import ConfigError

EAGER = "qharness_eager"
SDPA = "qharness_sdpa"
KV_BIAS_INIT_STD = 0.02  # the paper's N(0, 0.02)
CLIP_GAMMA = -0.03  # Bondarenko et al.: gamma = -alpha / T; alpha ~ 4 at T = 128 (our context), ~ -0.03
CLIP_ZETA = 1.0


class KVBias(nn.Module):
    """k' and v' for every key/value head of one layer."""

    def __init__(self, kv_heads: int, head_dim: int, std: float = KV_BIAS_INIT_STD) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.randn(kv_heads, 1, head_dim) * std)
        self.v = nn.Parameter(torch.randn(kv_heads, 1, head_dim) * std)

    def prepend(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """key, value: (batch, kv_heads, length, head_dim) -> (batch, kv_heads, 1 + length, head_dim)."""
        batch = key.shape[0]
        k = self.k.to(key.dtype).expand(batch, -1, -1, -1)
        v = self.v.to(value.dtype).expand(batch, -1, -1, -1)
        return torch.cat([k, key], dim=2), torch.cat([v, value], dim=2)


class AttentionGate(nn.Module):
    """sigmoid(W x + b) per head and channel, multiplied into the attention output before the output projection.
    The attention function never sees the layer's input, so a forward pre-hook on the attention module stashes it
    in `self.input` for the one call that follows."""

    def __init__(self, hidden_size: int, heads: int, head_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, heads * head_dim)
        self.heads, self.head_dim = heads, head_dim
        # 1 from scratch (Qiu et al.); 2 for a gate added to a trained model, where 2 * sigmoid(0) = 1 passes the
        # attention through unchanged at first while keeping sigmoid's full slope (see gated_attention.retrofit)
        self.scale = scale
        self.input: Tensor | None = None
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)  # starts as a uniform 0.5: half of plain attention, learnable from there

    def forward(self, attn_output: Tensor) -> Tensor:
        """attn_output: (batch, length, heads, head_dim), as attention functions return it."""
        if self.input is None:
            raise RuntimeError("AttentionGate called without the layer input; was the pre-hook removed?")
        gate = torch.sigmoid(self.proj(self.input)).view(*attn_output.shape[:2], self.heads, self.head_dim)
        if self.scale != 1.0:
            gate = gate * self.scale
        self.input = None
        return attn_output * gate.to(attn_output.dtype)


def stash_gate_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
    module.gate.input = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class SoftmaxClip(nn.Module):
    """No parameters: holds gamma and zeta so they show in the model's repr and travel with the module."""

    def __init__(self, gamma: float = CLIP_GAMMA, zeta: float = CLIP_ZETA) -> None:
        super().__init__()
        self.gamma, self.zeta = gamma, zeta

    def forward(self, probs: Tensor) -> Tensor:
        return ((self.zeta - self.gamma) * probs + self.gamma).clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, zeta={self.zeta}"

    def ramp_(self, step: int) -> None:
        """For a clip added to a trained model (`ramp_steps` set): gamma goes linearly from 0 (plain softmax) to
        `target_gamma` over the first `ramp_steps` optimizer steps."""
        ramp = getattr(self, "ramp_steps", None)
        if ramp:
            self.gamma = self.target_gamma * min(1.0, step / ramp)


def causal_mask(query_length: int, key_length: int, device: torch.device) -> Tensor:
    """Bool (1, 1, q, k), True = may attend; the queries are the last `query_length` positions (KV cache)."""
    mask = torch.ones(query_length, key_length, dtype=torch.bool, device=device)
    return mask.tril(diagonal=key_length - query_length)[None, None]


def with_sink_column(mask: Tensor | None, query: Tensor, key: Tensor) -> Tensor:
    """The mask for keys [k'; K]: one leading column every query may see, the rest as before (causal if None)."""
    if mask is None:
        mask = causal_mask(query.shape[2], key.shape[2], query.device)
    mask = mask[..., -key.shape[2]:]  # a static cache's mask can be wider than the keys in use
    return F.pad(mask, (1, 0), value=True if mask.dtype == torch.bool else 0.0)


def repeat_kv(states: Tensor, groups: int) -> Tensor:
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def explicit_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                       scaling: float, dropout: float, clip: SoftmaxClip | None) -> tuple[Tensor, Tensor]:
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if mask is None:
        mask = causal_mask(query.shape[2], key.shape[2], query.device)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask[..., : key.shape[2]]
    probs = F.softmax(scores, dim=-1, dtype=torch.float32)
    if clip is not None:
        probs = clip(probs)
    probs = F.dropout(probs, p=dropout, training=module.training).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def mitigated_attention(use_sdpa: bool):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, Tensor | None]:
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        kv_bias: KVBias | None = getattr(module, "kv_bias", None)
        clip: SoftmaxClip | None = getattr(module, "softmax_clip", None)
        kv_quant = getattr(module, "kv_quant", None)
        if kv_quant is not None:
            key, value, attention_mask = kv_quant(query, key, value, attention_mask)
        if kv_bias is not None:
            key, value = kv_bias.prepend(key, value)
            attention_mask = with_sink_column(attention_mask, query, key[:, :, 1:])
        if use_sdpa and clip is None:
            output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                                     scaling=scaling, **kwargs)
        else:
            output, weights = explicit_attention(module, query, key, value, attention_mask, scaling, dropout, clip)
        gate: AttentionGate | None = getattr(module, "gate", None)
        return (gate(output) if gate is not None else output), weights

    return attention


def register() -> None:
    """Make `qharness_eager` / `qharness_sdpa` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    AttentionInterface.register(EAGER, mitigated_attention(use_sdpa=False))
    AttentionInterface.register(SDPA, mitigated_attention(use_sdpa=True))
    ALL_MASK_ATTENTION_FUNCTIONS.register(EAGER, eager_mask)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA, sdpa_mask)


def eager_variant(implementation: str | None) -> str:
    """The implementation that returns attention weights, keeping the mitigations if they are on."""
    return EAGER if implementation in (EAGER, SDPA) else "eager"


def takes_registered_attention(model: nn.Module) -> bool:
    """Whether `model` computes attention through transformers' AttentionInterface (Llama, Mistral, Qwen, GPT-2, OPT,
    Phi, ...). One that does not (Falcon) would take our implementation's name and ignore it: a mitigation attached
    to its attention modules would silently do nothing."""
    return bool(getattr(model, "_supports_attention_backend", False)) and hasattr(model, "set_attn_implementation")


def use_mitigated_attention_(model: nn.Module) -> None:
    """Route `model`'s attention through our implementations, eager if it was eager, else SDPA."""
    if not takes_registered_attention(model):
        raise ConfigError(f"{type(model).__name__} computes attention its own way, not through transformers' "
                          "attention implementations, so KV bias, gated attention and clipped softmax cannot be "
                          "inserted; they work on Llama, Mistral, Qwen, GPT-2, OPT, Phi and other models that do")
    register()
    current = getattr(model.config, "_attn_implementation", None)
    target = EAGER if current in ("eager", EAGER) else SDPA
    if current != target:
        model.set_attn_implementation(target)
