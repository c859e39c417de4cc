"""The massive-activation profile as typed data: what `scan` returns, `qharness scan` prints and writes to
profile.json, and the leaderboard's scan rows summarize. One dataclass a level (top entry, layer, summary,
intervention plan, profile); `to_json` / `from_json` map it to the JSON layout documented in results/README.md under
its schema name, so a profile written by an earlier version of the same schema reads back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qharness.core.errors import DataError

SCHEMA = "qharness.profile/1"


@dataclass(frozen=True)
class TopHit:
    value: float  # signed value of the entry
    position: int  # token index in the sequence
    channel: int  # hidden channel
    token: str  # the decoded token at that position


@dataclass(frozen=True)
class LayerProfile:
    layer: int  # index in the decoder stack
    max: float  # max |h| over sequences
    median: float  # mean over sequences of median |h|
    ratio: float  # mean over sequences of max/median
    kurtosis: float  # mean Pearson kurtosis (3 for a Gaussian)
    top: list[TopHit]  # the k largest entries of the sequence with the largest max
    massive_fraction: float  # share of sequences meeting max > 100 and max >= 1000 x median
    massive_channels: dict[str, float]  # channel -> share of sequences with a massive entry there (16 most frequent)
    outlier_channels: dict[str, float]  # the same for entries >= outlier_ratio x median
    nonfinite: int  # inf/NaN entries (fp16 overflow)
    attention_on_first: float | None  # mean attention weight on position 0; None when not measured


@dataclass(frozen=True)
class InterventionPlan:
    """Where the paper's intervention acts: the first massive layer and its massive channels, else the first layer
    with outlier channels and those."""

    layer: int
    criterion: str  # "massive" or "outlier"
    channels: list[int]
    mean_first: list[float]  # each channel's mean at position 0 over the calibration sequences
    mean_rest: list[float]  # and at the other positions


@dataclass(frozen=True)
class ProfileSummary:
    max: float  # the largest |h| of any layer
    max_layer: int
    max_ratio: float  # the largest per-layer ratio
    first_massive_layer: int | None
    first_outlier_layer: int | None
    outlier_channels: list[int]  # the outlier channels of the first outlier layer
    bos_holds_max: float  # share of (layer, sequence) pairs from the first outlier layer on whose max sits on BOS
    delimiter_holds_max: float  # ... on a delimiter token
    top_channel: int  # the channel that holds the max most often
    top_channel_stability: float  # how often it does
    overflow_layers: list[int]  # layers with non-finite entries
    intervention: InterventionPlan | None
    # each calibration sequence's largest |h| over the layers: how much `max` depends on which sequences were drawn
    # (empty in profiles written before it was kept)
    sequence_max: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class InterventionResult:
    condition: str  # original | zero | mean
    ppl: float
    layer: int
    channels: list[int]
    task: str
    # against the original: ppl / original ppl - 1 (None for `original` itself, and in profiles written before it
    # was kept), with its 95% interval (a paired block bootstrap of the per-token NLLs on the same tokens); for
    # `original` the interval is the perplexity's own
    change: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    tokens: int | None = None  # tokens predicted per condition


@dataclass
class Profile:
    config: dict[str, Any]  # the ScanConfig it was measured with
    sequences: int
    layers: list[LayerProfile]
    summary: ProfileSummary
    # provenance, filled by the scan command
    model: str = ""
    model_source: str = ""
    dtype: str = ""
    device: str = ""
    git_rev: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    time: str = ""
    intervention_table: list[InterventionResult] = field(default_factory=list)
    schema: str = SCHEMA

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.intervention_table:
            del data["intervention_table"]
        return {"schema": data.pop("schema"), **data}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "profile") -> Profile:
        if data.get("schema") != SCHEMA:
            raise DataError(f"{where} has schema {data.get('schema')!r}, not {SCHEMA!r}; rerun `qharness scan`")
        summary = dict(data["summary"])
        plan = summary.get("intervention")
        summary["intervention"] = InterventionPlan(**plan) if plan else None
        layers = [LayerProfile(**{**layer, "top": [TopHit(**hit) for hit in layer["top"]]})
                  for layer in data["layers"]]
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, "layers": layers,
                      "summary": ProfileSummary(**summary),
                      "intervention_table": [InterventionResult(**row)
                                             for row in data.get("intervention_table", [])]})

    @classmethod
    def read(cls, path: Path) -> Profile:
        import json

        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read scan profile {path}: {exc}") from exc
        return cls.from_json(data, str(path))
