"""`scan(model, tokenizer, batches)`: one forward pass per sequence with a hook on every decoder layer's output.

Each hook reduces its layer's (T, C) output to a few numbers at once (stats.py) and adds per-channel sums for the
intervention's means, so memory grows with layers x channels and never with tokens. The attention side (share of
attention on position 0) comes from the same pass, with eager attention for its weights.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qharness.activations.profile import (
    SCHEMA,
    InterventionPlan,
    LayerProfile,
    Profile,
    ProfileSummary,
    TopHit,
)
from qharness.activations.stats import (
    MASSIVE_ABS,
    MASSIVE_RATIO,
    OUTLIER_RATIO,
    LayerStats,
    layer_stats,
    outlier_mask,
)
from qharness.core.errors import ConfigError
from qharness.models.layers import decoder_layers

__all__ = ["SCHEMA", "ScanConfig", "scan"]
DELIMITERS = {".", ",", ";", ":", "!", "?", "\n", ""}


@dataclass(frozen=True)
class ScanConfig:
    sequences: int = 8  # calibration sequences (training split text)
    length: int = 256  # tokens per sequence, BOS included
    bos: bool = True  # prepend BOS to each sequence
    top_k: int = 3  # largest entries kept per layer and sequence
    attention: bool = True  # also measure the attention share on position 0 (eager attention)
    outlier_ratio: float = OUTLIER_RATIO  # |h| >= this x median marks an outlier entry

    def __post_init__(self) -> None:
        for name, low in (("sequences", 1), ("length", 2), ("top_k", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"scan {name} must be >= {low}, got {getattr(self, name)}")


@dataclass
class LayerRecord:
    """What one layer accumulates over sequences: no per-token tensor survives a forward pass."""

    stats: list[LayerStats] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)  # token ids of the top entries, decoded at the end
    outlier_channels: Counter = field(default_factory=Counter)  # channel -> sequences with an outlier there
    massive_channels: Counter = field(default_factory=Counter)  # channel -> sequences with a massive entry there
    first_sum: Tensor | None = None  # per-channel sum of h at position 0
    rest_sum: Tensor | None = None  # per-channel sum of h at positions >= 1
    rest_count: int = 0
    attention_on_first: list[float] = field(default_factory=list)
    top_tokens: list[list[str]] = field(default_factory=list)  # filled from top_ids after the forward passes


def layer_output(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def layer_hooks(layers: nn.ModuleList, callback) -> Iterator[None]:
    """Forward hooks on every layer, all removed on exit whatever happens."""
    handles = [layer.register_forward_hook(lambda module, args, output, i=i: callback(i, layer_output(output)))
               for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def eager_attention(model: nn.Module, enabled: bool) -> Iterator[bool]:
    """Attention weights exist only in eager attention; switch to it for the scan and back afterwards."""
    from qharness.models.attention import eager_variant

    previous = getattr(model.config, "_attn_implementation", None)
    eager = eager_variant(previous)  # a mitigated model keeps its KV bias / gate / clipped softmax
    switch = enabled and hasattr(model, "set_attn_implementation") and previous != eager
    if switch:
        model.set_attn_implementation(eager)
    try:
        yield enabled and (switch or previous == eager)
    finally:
        if switch:
            model.set_attn_implementation(previous)


def token_kind(text: str) -> str:
    stripped = text.strip()
    return "delimiter" if stripped in DELIMITERS or (not stripped and "\n" in text) else "content"


def _record(record: LayerRecord, hidden: Tensor, ids: list[int], config: ScanConfig) -> None:
    h = hidden[0]  # (T, C): one sequence per batch
    stats = layer_stats(h, config.top_k)
    record.stats.append(stats)
    record.top_ids.append([ids[e.position] for e in stats.top])
    if stats.max >= config.outlier_ratio * stats.median:  # else no entry can qualify: skip the masks
        outliers = outlier_mask(h, config.outlier_ratio, stats.median)
        record.outlier_channels.update(outliers.any(dim=0).nonzero().flatten().tolist())
        if stats.is_massive:
            massive = outliers & (h.detach().abs() > MASSIVE_ABS) & (h.detach().abs() >= MASSIVE_RATIO * stats.median)
            record.massive_channels.update(massive.any(dim=0).nonzero().flatten().tolist())
    first, rest = h[0].double(), h[1:].sum(dim=0, dtype=torch.float64)
    record.first_sum = first if record.first_sum is None else record.first_sum + first
    record.rest_sum = rest if record.rest_sum is None else record.rest_sum + rest
    record.rest_count += h.shape[0] - 1


def scan(model: nn.Module, tokenizer: Any, batches: list[Tensor], config: ScanConfig = ScanConfig(),
         layers: nn.ModuleList | None = None) -> Profile:
    """The profile of `model` over `batches` of shape (1, T)."""
    layers = layers if layers is not None else decoder_layers(model)
    records = [LayerRecord() for _ in layers]
    current: list[int] = []
    hook = lambda i, hidden: _record(records[i], hidden, current, config)  # noqa: E731
    with eager_attention(model, config.attention) as has_attention, layer_hooks(layers, hook), torch.inference_mode():
        for input_ids in batches:
            current[:] = input_ids[0].tolist()
            out = model(input_ids=input_ids, output_attentions=has_attention)
            for record, attention in zip(records, out.attentions or (), strict=False):
                # (1, heads, T, T): mean over heads and over queries after the first of the weight on key 0
                record.attention_on_first.append(float(attention[0, :, 1:, 0].mean()))
    for record in records:
        record.top_tokens = [[tokenizer.decode([i]) for i in ids] for ids in record.top_ids]
    return build_profile(records, config, len(batches))


def _layer_entry(index: int, record: LayerRecord, sequences: int) -> LayerProfile:
    peak = max(range(len(record.stats)), key=lambda s: record.stats[s].max)
    stats = record.stats
    return LayerProfile(
        layer=index,
        max=max(s.max for s in stats),
        median=sum(s.median for s in stats) / len(stats),
        ratio=sum(s.ratio for s in stats) / len(stats),
        kurtosis=sum(s.kurtosis for s in stats) / len(stats),
        top=[TopHit(**asdict(e), token=t) for e, t in zip(stats[peak].top, record.top_tokens[peak], strict=True)],
        massive_fraction=sum(s.is_massive for s in stats) / len(stats),
        massive_channels={str(c): n / sequences for c, n in record.massive_channels.most_common(16)},
        outlier_channels={str(c): n / sequences for c, n in record.outlier_channels.most_common(16)},
        nonfinite=sum(s.nonfinite for s in stats),
        attention_on_first=(sum(record.attention_on_first) / len(record.attention_on_first)
                            if record.attention_on_first else None),
    )


def build_profile(records: list[LayerRecord], config: ScanConfig, sequences: int) -> Profile:
    layers = [_layer_entry(i, r, sequences) for i, r in enumerate(records)]
    return Profile(config=asdict(config), sequences=sequences, layers=layers, summary=summarize(layers, records))


def _intervention_plan(layers: list[LayerProfile], records: list[LayerRecord], target: int | None,
                       criterion: str) -> InterventionPlan | None:
    if target is None:
        return None
    record = records[target]
    channels = layers[target].massive_channels if criterion == "massive" else layers[target].outlier_channels
    targeted = sorted(int(c) for c, v in channels.items() if v >= 0.5)
    return InterventionPlan(
        layer=target, criterion=criterion, channels=targeted,
        mean_first=[float(record.first_sum[c]) / len(record.stats) for c in targeted],
        mean_rest=[float(record.rest_sum[c]) / max(record.rest_count, 1) for c in targeted],
    )


def summarize(layers: list[LayerProfile], records: list[LayerRecord]) -> ProfileSummary:
    first_massive = next((e.layer for e in layers if e.massive_fraction >= 0.5), None)
    first_outlier = next((e.layer for e in layers if any(v >= 0.5 for v in e.outlier_channels.values())), None)
    channels = ([int(c) for c, v in layers[first_outlier].outlier_channels.items() if v >= 0.5]
                if first_outlier is not None else [])
    after = records[first_outlier:] if first_outlier is not None else records
    tops = [(s.top[0], tokens[0]) for r in after for s, tokens in zip(r.stats, r.top_tokens, strict=True)]
    top_channels = Counter(entry.channel for entry, _ in tops)
    peak = max(layers, key=lambda e: e.max)
    # the paper intervenes at the first layer with massive activations; small models may have none, so the first
    # layer with outlier channels stands in
    target = first_massive if first_massive is not None else first_outlier
    plan = _intervention_plan(layers, records, target, "massive" if first_massive is not None else "outlier")
    return ProfileSummary(
        max=peak.max,
        max_layer=peak.layer,
        max_ratio=max(e.ratio for e in layers),
        first_massive_layer=first_massive,
        first_outlier_layer=first_outlier,
        outlier_channels=channels,
        bos_holds_max=sum(entry.position == 0 for entry, _ in tops) / len(tops),
        delimiter_holds_max=sum(entry.position > 0 and token_kind(t) == "delimiter" for entry, t in tops) / len(tops),
        top_channel=top_channels.most_common(1)[0][0],
        top_channel_stability=top_channels.most_common(1)[0][1] / len(tops),
        overflow_layers=[e.layer for e in layers if e.nonfinite],
        intervention=plan,
        sequence_max=[max(r.stats[s].max for r in records) for s in range(len(records[0].stats))],
    )
