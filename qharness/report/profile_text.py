"""A scan profile as text: what `qharness scan` prints, and the findings' scan block (report/publish.py renders it
from a shipped profile.json, so the block carries the run's numbers and intervals, not typed ones)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from qharness.activations.profile import InterventionResult, Profile
from qharness.report.degradation import percent_interval

HEADER = "layer  max       median  ratio   kurtosis  top entry (position, channel, token)        attn@0"


def summary_lines(profile: Profile) -> list[str]:
    s = profile.summary
    spread = ""
    if len(s.sequence_max) > 1:  # a max held by BOS is the same in every sequence: position 0 sees only itself
        low, high = min(s.sequence_max), max(s.sequence_max)
        spread = (f" (the same in each of the {len(s.sequence_max)} sequences)" if f"{low:.1f}" == f"{high:.1f}"
                  else f" (each sequence's largest: {low:.1f} to {high:.1f})")
    lines = [
        f"model: {profile.model}   sequences: {profile.sequences} x {profile.config['length']} tokens   "
        f"BOS: {profile.config['bos']}",
        f"max |h| {s.max:.1f} at layer {s.max_layer}{spread}; max/median ratio {s.max_ratio:.0f}; "
        f"massive (>100 and >=1000x median) from layer {s.first_massive_layer}; "
        f"outliers (>=100x median) from layer {s.first_outlier_layer} on channels {s.outlier_channels}",
        f"the largest entry sits on BOS in {s.bos_holds_max:.0%} of (layer, sequence) pairs after that, on a "
        f"delimiter in {s.delimiter_holds_max:.0%}; channel {s.top_channel} holds it "
        f"{s.top_channel_stability:.0%} of the time",
    ]
    if s.overflow_layers:
        lines.append(f"OVERFLOW: non-finite values in layers {s.overflow_layers} (fp16 saturates at 65504)")
    return lines


def layer_lines(profile: Profile, layers: Collection[int] | None = None) -> list[str]:
    """The per-layer table; `layers`: only those (the findings show the layers where something happens)."""
    lines = [HEADER]
    for e in profile.layers:
        if layers is not None and e.layer not in layers:
            continue
        top = e.top[0]
        where = f"{top.value:+.1f} ({top.position}, {top.channel}, {top.token!r})"
        attention = "" if e.attention_on_first is None else f"{e.attention_on_first:.2f}"
        lines.append(f"{e.layer:<5}  {e.max:<8.1f}  {e.median:<6.3f}  {e.ratio:<6.0f}  "
                     f"{e.kurtosis:<8.0f}  {where:<42}  {attention}")
    return lines


def intervention_line(row: InterventionResult) -> str:
    """'... mean     ppl 23.31, +0.9% [+0.3, +1.5] vs original': the original with its own interval, the others
    with their change against it, paired on the same tokens (profiles written before intervals: the ppl alone)."""
    tokens = f", {row.tokens:,} tokens" if row.tokens else ""
    text = f"intervention at layer {row.layer} channels {row.channels}: {row.condition:8} ppl {row.ppl:.2f}"
    if row.ci_low is None or row.ci_high is None:
        return text + f" ({row.task}, token-level{tokens})"
    if row.change is None:
        return text + f" [{row.ci_low:.2f}, {row.ci_high:.2f}] ({row.task}, token-level{tokens})"
    return text + f", {percent_interval(row.change, (row.ci_low, row.ci_high))} vs original"


def format_scan(profile: Profile, out_dir: Path | None = None, layers: Collection[int] | None = None) -> str:
    lines = [*summary_lines(profile), *layer_lines(profile, layers),
             *(intervention_line(row) for row in profile.intervention_table)]
    if out_dir is not None:
        lines.append(f"profile, plots -> {out_dir}")
    return "\n".join(lines)
