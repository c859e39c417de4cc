"""KV-cache quantization: keys and values fake-quantized inside attention, as a quantized cache would hold them.

A setting is data (`KVSetting`); the arithmetic is `sim.fake_quantize`, applied to the keys (after RoPE) and values
that transformers hands the attention implementations of models/attention.py. `kv_quantized(model, setting)`
attaches one `KVFakeQuant` to each attention module and routes the model through those implementations, so eager
and SDPA attention see the same quantized cache. It composes with any weight/activation scheme (it touches no
Linear) and with `--quant none` (fp weights, only the cache quantized).

Names read `<format>-<layout>[+keep0]`:
- `token`: keys and values with one scale per token and head (over head_dim), quantized as each token is written.
- `kivi`: values per token; keys per channel (KIVI, Liu et al. 2024, arXiv 2402.02750: key outliers live in fixed
  channels), one scale per channel and head over a block of `block` tokens. A block's scale needs all its tokens,
  so, as KIVI's full-precision residual, the block still being filled stays in full precision: query i sees a key
  quantized only once its block ended at or before i. A prefill cannot hold two versions of a key, so the keys are
  passed twice, [quantized; fp], and the mask picks one per query; nothing ever depends on a later token.
- `+keep0`: the first token's keys and values stay exact and are left out of every scale (the attention sink / BOS,
  whose outliers would otherwise stretch the scale of its block; cf. KVQuant's attention-sink-aware variant,
  Hooper et al. 2024, arXiv 2401.18079, and IntactKV, Liu et al. 2024, arXiv 2403.01241).
Integer formats are asymmetric (min/max with a zero point, as KIVI); FP8 E4M3 is scaled by amax -> 448.
Add a format: one entry in `KV_FORMATS` (a layout: one in `KEY_AXES` and its scale axis in
`KVSetting`); `qharness list kv` and `--kv` read the same table.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from qharness.core.errors import ConfigError, UnknownName
from qharness.core.registry import Registry
from qharness.quant.schemes import PerGroup, PerToken, TensorQuant

if TYPE_CHECKING:
    from torch import Tensor, nn

KVFormat = Literal["int8", "int4", "fp8_e4m3"]
# element format -> (how setting names spell it, how descriptions print it); a new format is one entry here
KV_FORMATS: dict[str, tuple[str, str]] = {"int8": ("int8", "INT8"), "int4": ("int4", "INT4"),
                                          "fp8_e4m3": ("fp8-e4m3", "FP8 E4M3")}
KEY_AXES: tuple[str, ...] = ("token", "channel")
NONE = "none"  # no KV quantization: the leaderboard's kv column stays empty
KEEP_FIRST = "keep0"
KIVI_BLOCK = 32  # KIVI's group size along tokens (its paper's default G = 32)
KIVI = "Liu et al. 2024, KIVI (arXiv 2402.02750)"


@dataclass(frozen=True)
class KVSetting:
    name: str  # canonical, modifiers included: what the leaderboard's `kv` column holds
    format: KVFormat  # of keys and values alike
    key_axis: Literal["token", "channel"]  # keys: one scale per token (and head), or per channel over a block
    keep_first: bool = False  # the first token's keys and values stay exact and out of every scale
    block: int = KIVI_BLOCK  # key_axis "channel": how many tokens share a channel's scale
    description: str = ""
    reference: str = ""

    def __post_init__(self) -> None:
        if self.format not in KV_FORMATS:
            raise ConfigError(f"KV format '{self.format}' is not one of {', '.join(KV_FORMATS)}")
        if self.key_axis not in KEY_AXES:
            raise ConfigError(f"KV key_axis '{self.key_axis}' is not one of {', '.join(KEY_AXES)}")
        if self.block < 1:
            raise ConfigError(f"KV block must be >= 1 token, got {self.block}")

    def tensor_quant(self, along_tokens: bool) -> TensorQuant:
        """Per token: reduce over head_dim. Along tokens (keys per channel): the caller puts tokens last."""
        granularity = PerGroup(self.block) if along_tokens else PerToken()
        return TensorQuant(self.format, granularity, symmetric=not self.format.startswith("int"))


KV_SETTINGS: Registry[Any] = Registry("KV setting")  # name -> () -> KVSetting


def _register(format: str, key_axis: str) -> None:
    layout = "token" if key_axis == "token" else "kivi"
    spelled, printed = KV_FORMATS[format]
    name = f"{spelled}-{layout}"
    keys = ("keys and values per token (and head)" if key_axis == "token"
            else f"keys per channel over blocks of {KIVI_BLOCK} tokens (the open block in fp), values per token")
    text = f"{printed} KV cache: {keys}"
    reference = KIVI if key_axis == "channel" else "per-token KV-cache quantization (the baseline of " + KIVI + ")"
    KV_SETTINGS.add(name, lambda: KVSetting(name, format, key_axis, description=text, reference=reference))


for _format in KV_FORMATS:
    for _axis in KEY_AXES:
        _register(_format, _axis)


def get_kv(text: str) -> KVSetting | None:
    """'none' (or '') -> None; 'int4-token+keep0' -> that setting with the first token kept."""
    if text in ("", NONE):
        return None
    base, *options = text.split("+")
    if base == NONE:  # the registry's own message would list none among the names it does not know
        raise ConfigError(f"KV setting '{text}': {NONE} keeps the whole cache in full precision and takes no "
                          f"options; give a setting with +{KEEP_FIRST}, e.g. int8-token+{KEEP_FIRST}")
    try:
        setting = KV_SETTINGS.get(base)()
    except UnknownName as exc:
        raise UnknownName(f"{exc}; or {NONE}; append +{KEEP_FIRST} to keep the first token exact") from None
    strays = [o for o in options if o != KEEP_FIRST]
    if strays or len(options) > 1:
        problem = f"unknown option '+{strays[0]}'" if strays else f"'+{KEEP_FIRST}' given twice"
        raise ConfigError(f"KV setting '{text}': {problem}; the one option is +{KEEP_FIRST} (first token exact), "
                          f"e.g. {setting.name}+{KEEP_FIRST}")
    if options:
        setting = dataclasses.replace(setting, name=f"{setting.name}+{KEEP_FIRST}", keep_first=True)
    return setting


def split_quants(quants: tuple[str, ...], kv: KVSetting | None, has_keep: bool) -> tuple[tuple[str, ...], bool]:
    """The weight/activation schemes of a run, and whether it also asked for fp weights with a quantized cache
    (`--quant none --kv X`). Refuses the combinations that would measure nothing new."""
    schemes = tuple(q for q in quants if q != NONE)
    kv_only = len(schemes) < len(quants) and kv is not None  # without a cache to quantize, none is the baseline
    if not schemes and kv is None:
        raise ConfigError(f"--quant {NONE} alone is the full-precision baseline every run computes; add --kv "
                          "SETTING to quantize only the KV cache (`qharness list kv`), or name a scheme")
    if kv_only and not schemes and has_keep:
        raise ConfigError(f"--keep-positions/--keep-channels/--keep-linears keep Linears exact, but --quant {NONE} "
                          f"quantizes no Linear; drop them (to keep the KV cache's first token exact: --kv "
                          f"{kv.name.split('+')[0]}+{KEEP_FIRST})")
    return schemes, kv_only


# ---- arithmetic ---------------------------------------------------------------------------------------------------
def _fake_quantize(x: Tensor, tq: TensorQuant, keep_first: bool, along_tokens: bool) -> Tensor:
    """x: (batch, kv_heads, length, head_dim). Along tokens, the length axis is put last so that `PerGroup` blocks
    run over tokens within each channel."""
    import torch

    from qharness.quant.sim import fake_quantize

    inner = x
    if keep_first:  # out of the scale, then back exactly
        inner = torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, 1:]], dim=2)
    tokens_last = (lambda t: t.transpose(2, 3)) if along_tokens else (lambda t: t)
    quantized = tokens_last(fake_quantize(tokens_last(inner), tq))
    if keep_first:
        quantized = torch.cat([x[:, :, :1], quantized[:, :, 1:]], dim=2)
    return quantized


def _restrict(mask: Tensor, allowed: Tensor) -> Tensor:
    """`mask` (bool: True = may attend, or additive float) with everything outside `allowed` masked out."""
    import torch

    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)


def block_done(query_length: int, key_length: int, block: int, device: Any) -> Tensor:
    """Bool (q, k): key j's block has ended by query i (the queries are the last `query_length` positions)."""
    import torch

    positions = torch.arange(key_length - query_length, key_length, device=device)[:, None]  # (q, 1)
    block_end = (torch.arange(key_length, device=device) // block + 1) * block - 1  # (k,)
    return block_end[None, :] <= positions


def fake_quantize_kv(setting: KVSetting, query: Tensor, key: Tensor, value: Tensor,
                     mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """key, value: (batch, kv_heads, length, head_dim), after RoPE. Returns the keys, values and mask attention
    should use: the same shapes for `token`; for `kivi`, keys [quantized; fp] with values twice and a mask that
    shows each query one version of each key."""
    import torch

    from qharness.models.attention import causal_mask

    value = _fake_quantize(value, setting.tensor_quant(False), setting.keep_first, along_tokens=False)
    if setting.key_axis == "token":
        return _fake_quantize(key, setting.tensor_quant(False), setting.keep_first, along_tokens=False), value, mask
    quantized = _fake_quantize(key, setting.tensor_quant(True), setting.keep_first, along_tokens=True)
    length = key.shape[2]
    visible = causal_mask(query.shape[2], length, key.device) if mask is None else mask[..., :length]
    done = block_done(query.shape[2], length, setting.block, key.device)  # (q, k)
    mask = torch.cat([_restrict(visible, done), _restrict(visible, ~done)], dim=-1)  # (b, 1, q, 2k)
    return torch.cat([quantized, key], dim=2), torch.cat([value, value], dim=2), mask


class KVFakeQuant:
    """What attention finds at `module.kv_quant`: called with (query, key, value, mask) before the scores; counts
    its calls so that `check_kv_model` can tell whether a model's attention reaches it at all."""

    def __init__(self, setting: KVSetting) -> None:
        self.setting, self.calls = setting, 0

    def __call__(self, query: Tensor, key: Tensor, value: Tensor,
                 mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        self.calls += 1
        return fake_quantize_kv(self.setting, query, key, value, mask)

    def __repr__(self) -> str:
        return f"KVFakeQuant({self.setting.name})"


# ---- where it goes ------------------------------------------------------------------------------------------------
def _refuse(model: nn.Module, setting: KVSetting, why: str) -> ConfigError:
    return ConfigError(f"--kv {setting.name}: {type(model).__name__} {why}, so its keys and values cannot be "
                       "quantized; use a model whose attention does (Llama, Mistral, Qwen, GPT-2, ...) or drop --kv")


@contextlib.contextmanager
def kv_quantized(model: nn.Module, setting: KVSetting | None) -> Iterator[list[KVFakeQuant]]:
    """Within the block, `model`'s attention quantizes its KV cache as `setting` says (nothing when None); the
    model's attention implementation and modules are as before afterwards."""
    if setting is None:
        yield []
        return
    from qharness.models.attention import takes_registered_attention, use_mitigated_attention_
    from qharness.models.layers import attention_modules

    if not takes_registered_attention(model):
        raise _refuse(model, setting, "does not take transformers' attention implementations")
    attentions = attention_modules(model)
    previous = model.config._attn_implementation
    use_mitigated_attention_(model)
    quantizers = [KVFakeQuant(setting) for _ in attentions]
    try:
        for attention, quantizer in zip(attentions, quantizers, strict=True):
            attention.kv_quant = quantizer
        yield quantizers
    finally:
        for attention in attentions:
            vars(attention).pop("kv_quant", None)
        if model.config._attn_implementation != previous:
            model.set_attn_implementation(previous)


def check_kv_model(model: nn.Module, setting: KVSetting | None) -> None:
    """Before any evaluation: every attention layer of `model` really calls the quantizer (one forward pass over
    two tokens). A model that takes our implementation by name but computes attention its own way fails here."""
    if setting is None:
        return
    import torch

    from qharness.models.placement import input_device

    device = input_device(model)
    with kv_quantized(model, setting) as quantizers, torch.inference_mode():
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
    silent = [i for i, q in enumerate(quantizers) if q.calls == 0]
    if silent:
        raise _refuse(model, setting, f"computes attention in layers {silent[:4]} without calling the registered "
                                      "implementations")
