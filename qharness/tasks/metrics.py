"""What every task returns: bare metric names with their direction, kind and chance level."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str  # bare metric name: "ppl", "acc", "acc_norm"
    value: float
    higher_is_better: bool
    kind: str  # "token-level" (perplexity as papers report it), "zero-shot", "activation"
    n: int  # how many predictions the value averages over
    chance: float | None = None  # the score of random guessing, where it is defined
