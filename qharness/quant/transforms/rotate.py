"""Rotate the residual stream by an orthogonal Hadamard Q (QuaRot, Ashkboos et al. 2024, arXiv:2404.00456).

RMSNorm(h Q) = RMSNorm(h) Q for an orthogonal Q once the norm's weight g is folded into the Linears that read it
(an RMS is a length, which Q keeps). So with
    embedding E -> E Q;  Linears reading the stream (q, k, v, gate, up) W -> W diag(g) Q;
    Linears writing it (o, down) W -> Q^T W, b -> Q^T b;  lm_head W -> W diag(g_final) Q
the model computes the same logits while its hidden state is h Q. A Hadamard row has every entry +-1/sqrt(d), so a
massive channel is spread evenly over all d channels and stops setting the per-token or per-tensor scale alone.
Two more rotations are QuaRot's too:
- an online Hadamard H before down_proj (x -> x H at run time, W_down -> W_down H offline): down_proj's input
  carries a GLU model's largest activations and is not on the residual stream, so Q does not reach it;
- a per-head Hadamard on v_proj's output rows and o_proj's input columns, fused offline (attention mixes tokens,
  not channels within a head). QuaRot's online Hadamard across heads before o_proj is not done here.
Tied embeddings are untied: E Q and W diag(g) Q differ.

Two of our mitigations add to the attention and are rotated with it: gated attention's gate reads the attention's
input, so its projection is one more reader of the stream (W -> W diag(g) Q); a learned value v' (`kv_bias`) is a
value row like v_proj's outputs, so the per-head Hadamard turns it too (v' -> v' H; k' is untouched, as keys are).
The gate multiplies each head's output channel by channel, which a rotation of those channels does not commute
with, so a gated layer keeps its heads unrotated (its residual stream and down_proj input are rotated as usual).

Q and H are QuaRot's randomized Hadamards (diag(random signs) times a Hadamard, seeds 0, 1 and 2): for d = 2^k m a
Sylvester Hadamard of order 2^k Kronecker a known one of order m in (12, 20, 28, 36, 40, 44, 52, 60, 108, 140,
156, 172), so SmolLM2's 576 = 36 x 16 and 1536 = 12 x 128 are exact Hadamards, not random orthogonal stand-ins.
The matrices come from torchao (torchao.prototype.spinquant.hadamard_utils, QuaRot's and QuIP#'s code); its
spinquant rotation itself is written for torchao's own model class, and fast-hadamard-transform has CUDA kernels
only, so the fusing into Hugging Face modules is written here. The online H is a dense matmul in fp32.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING

from qharness.core.errors import ConfigError
from qharness.quant.transforms import TRANSFORMS, Transform

if TYPE_CHECKING:  # torch is imported where it runs, so `qharness list` stays fast
    from torch import Tensor, nn

    from qharness.models.layers import BlockLayout, DecoderLayout

SEEDS = {"residual": 0, "down": 1, "head": 2}


def hadamard(size: int, seed: int) -> Tensor:
    """A randomized orthogonal Hadamard of order `size`, float64."""
    with contextlib.redirect_stdout(sys.stderr):  # torchao prints a note about its CUDA kernel on import
        from torchao.prototype.spinquant.hadamard_utils import random_hadamard_matrix
    try:
        matrix = random_hadamard_matrix(size, "cpu", seed=seed).double()
    except AssertionError:  # get_hadK asserts that size / m is a power of 2
        raise ConfigError(f"transform 'rotate' needs widths of 2^k times 1, 12, 20, 28, 36, 40, 44, 52, 60, 108, 140, "
                          f"156 or 172 (a known Hadamard order); this model has a width of {size}") from None
    # torchao divides by sqrt(n) computed in float32; renormalizing the rows makes Q orthogonal to float64
    return matrix / matrix.norm(dim=1, keepdim=True)


def _set_(param: Tensor, value: Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


def _read_(linear: nn.Linear, q: Tensor, norm_weight: Tensor | None = None) -> None:
    """A Linear reading the rotated stream: W -> W diag(g) Q."""
    w = linear.weight.double()
    if norm_weight is not None:
        w = w * norm_weight.double()
    _set_(linear.weight, w @ q)


def _write_(linear: nn.Linear, q: Tensor) -> None:
    """A Linear writing into the rotated stream: W -> Q^T W, b -> Q^T b."""
    _set_(linear.weight, q.T @ linear.weight.double())
    if linear.bias is not None:
        _set_(linear.bias, q.T @ linear.bias.double())


def _untie_(model: nn.Module, embed: nn.Embedding, lm_head: nn.Linear) -> None:
    from torch import nn

    if lm_head.weight is embed.weight:
        lm_head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False


def _check_norms(layout: DecoderLayout) -> None:
    from qharness.models.layers import is_rms_norm

    norms = [layout.final_norm, *(n for b in layout.blocks for n in (b.attn_norm, b.mlp_norm))]
    other = next((n for n in norms if not is_rms_norm(n)), None)
    if other is not None:  # LayerNorm subtracts the mean, which a rotation does not commute with
        raise ConfigError(f"transform 'rotate' needs RMSNorm (no bias) everywhere; this model has "
                          f"{type(other).__name__}")


def _rotate_heads_(block: BlockLayout, h: Tensor) -> None:
    """Each value head's output v_k -> v_k H (W_v[k] -> H^T W_v[k]; a learned value v'_k -> v'_k H); o_proj reads
    every query head's slice rotated by the same H (W_o -> W_o blockdiag(H)), whichever value head it shares."""
    import torch

    v, o, hd = block.v, block.o, block.head_dim
    _set_(v.weight, torch.einsum("de,kdn->ken", h, v.weight.double().reshape(block.kv_heads, hd, -1)).reshape(
        v.weight.shape))
    if v.bias is not None:
        _set_(v.bias, torch.einsum("de,kd->ke", h, v.bias.double().reshape(block.kv_heads, hd)).reshape(-1))
    _set_(o.weight, (o.weight.double().reshape(o.out_features, block.heads, hd) @ h).reshape(o.weight.shape))
    kv_bias = getattr(block.attention, "kv_bias", None)
    if kv_bias is not None:
        _set_(kv_bias.v, kv_bias.v.double() @ h)


def rotate_(model: nn.Module, argument: float | None, batches: list[Tensor]) -> None:
    import torch

    from qharness.models.attention import AttentionGate
    from qharness.models.layers import LLAMA_STYLE, llama_layout
    from qharness.quant.modules import OnlineRotation, swap_module

    layout = llama_layout(model)
    if layout is None:
        raise ConfigError(f"transform 'rotate' supports {LLAMA_STYLE}; {type(model).__name__} is not one")
    _check_norms(layout)
    _untie_(model, layout.embed, layout.lm_head)
    device = layout.embed.weight.device
    first = layout.blocks[0]
    names = {id(module): name for name, module in model.named_modules()}
    q = hadamard(layout.embed.embedding_dim, SEEDS["residual"]).to(device)
    h_down = hadamard(first.down.in_features, SEEDS["down"]).to(device)
    h_head = hadamard(first.head_dim, SEEDS["head"]).to(device)
    _set_(layout.embed.weight, layout.embed.weight.double() @ q)
    for b in layout.blocks:
        gate = getattr(b.attention, "gate", None)
        gate = gate if isinstance(gate, AttentionGate) else None  # gated attention's, not any module named gate
        attention_readers = (b.q, b.k, b.v) + ((gate.proj,) if gate is not None else ())
        for norm, readers in ((b.attn_norm, attention_readers), (b.mlp_norm, (b.gate, b.up))):
            for linear in readers:
                _read_(linear, q, norm.weight)
            _set_(norm.weight, torch.ones_like(norm.weight))
        _write_(b.o, q)
        _write_(b.down, q)
        _set_(b.down.weight, b.down.weight.double() @ h_down)
        swap_module(model, names[id(b.down)], OnlineRotation(b.down, h_down))
        if gate is None:
            _rotate_heads_(b, h_head)
    _read_(layout.lm_head, q, layout.final_norm.weight)
    _set_(layout.final_norm.weight, torch.ones_like(layout.final_norm.weight))


TRANSFORMS.add("rotate", Transform(
    name="rotate",
    description="QuaRot: randomized Hadamard rotation of the residual stream (norms fused, embeddings untied), "
                "an online Hadamard before down_proj and a per-head one on v/o_proj",
    reference="Ashkboos et al. 2024, arXiv:2404.00456",
    apply=rotate_,
    requires=("torchao",),
    mixes_channels=True,
    refuses_backends={"gptq": "gptqmodel quantizes a saved copy that it reloads as the stock architecture, "
                              "without the online Hadamard before down_proj"},
))
