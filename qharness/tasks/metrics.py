"""What every task returns: bare metric names with their direction, kind and chance level, and the per-unit
results the value averages (per-token NLL, per-item correctness) that intervals are computed from."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Metric:
    name: str  # bare metric name: "ppl", "acc", "acc_norm"
    value: float
    higher_is_better: bool
    kind: str  # "token-level" (perplexity as papers report it), "zero-shot", "activation"
    n: int  # how many predictions the value averages over
    chance: float | None = None  # the score of random guessing, where it is defined
    # What `value` is a function of, in text order: the NLL of each predicted token (ppl = exp(mean)) or each item's
    # score (acc = mean). Kept so an interval, and a pairing with another row on the same units, needs no recompute.
    units: np.ndarray | None = field(default=None, compare=False, repr=False)
    units_hash: str = ""  # names the units (the predicted tokens, the items): rows pair only when theirs agree
    windows: int | None = None  # perplexity: how many windows the tokens came from
