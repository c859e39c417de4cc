"""What a scheme cost: one `Degradation` per quantized leaderboard row (fp -> quantized value of one metric), the
unit every table of the comparator is built from."""

from __future__ import annotations

from dataclasses import dataclass

from qharness.data.results import SCAN_TASK, Row, is_baseline, is_cost, key


@dataclass(frozen=True)
class Degradation:
    model: str
    quant: str
    backend: str
    keep: str
    task: str
    metric: str
    value: float
    fp_value: float
    higher_is_better: bool
    kv: str = ""  # the KV-cache setting ("" = the cache in full precision)
    transform: str = ""  # the post-hoc transform applied before quantizing ("" = none)
    n: str = ""  # tokens (perplexity) or items (zero-shot) evaluated; "" in leaderboards from before it was kept
    setting: tuple[str, ...] = ()  # (task_hash, bos, context_length, limit): rows compare only within one setting
    row_key: tuple[str, ...] = ()  # the row's leaderboard key: where its per-unit results are (units.py)
    ci: tuple[float, float] | None = None  # the row's 95% interval on rel, when it has one

    @property
    def evaluated(self) -> str:
        """What the number was measured on, as the report prints it: '4094 tok, limit 2' or '7435 tok, all'."""
        if not self.n:
            return ""
        unit = "tok" if self.metric == "ppl" else "items"
        limit = self.setting[3] if len(self.setting) == 4 else ""
        return f"{self.n} {unit}, " + (f"limit {limit}" if limit else "all")

    @property
    def delta(self) -> float:
        return self.value - self.fp_value

    @property
    def rel(self) -> float:
        return self.delta / self.fp_value if self.fp_value else float("nan")

    @property
    def loss(self) -> float:
        """How much worse, in the metric's own units (positive = worse)."""
        return -self.delta if self.higher_is_better else self.delta

    @property
    def plain(self) -> bool:
        """The scheme alone: nothing kept in full precision, no transform, no KV-cache quantization."""
        return not (self.keep or self.transform or self.kv)

    @property
    def label(self) -> str:
        """The scheme with whatever was added to it, as the report's tables print it."""
        extras = [f"transform {self.transform}" if self.transform else "", f"kv {self.kv}" if self.kv else "",
                  f"keep {self.keep}" if self.keep else ""]
        extras = [e for e in extras if e]
        return self.quant + (f" ({', '.join(extras)})" if extras else "")


def degradations(rows: list[Row]) -> list[Degradation]:
    out = []
    for row in rows:
        if is_baseline(row) or row.get("task") == SCAN_TASK or is_cost(row) or not row.get("fp_value"):
            continue
        ci = ((float(row["ci_low"]), float(row["ci_high"])) if row.get("ci_of") == "rel_delta" and row.get("ci_low")
              else None)
        setting = tuple(row.get(c, "") for c in ("task_hash", "bos", "context_length", "limit"))
        out.append(Degradation(row["model"], row["quant"], row.get("backend", ""), row.get("keep", ""),
                               row["task"], row["metric"], float(row["value"]), float(row["fp_value"]),
                               row.get("higher_is_better") == "True", row.get("kv", ""), row.get("transform", ""),
                               n=row.get("n", ""), setting=setting, row_key=key(row), ci=ci))
    return out


def percent(value: float | None) -> str:
    """A relative change as the report prints it; past +-10,000% (a broken model) in scientific notation."""
    if value is None:
        return ""
    return f"{value:+.1%}" if abs(value) < 100 else f"{value * 100:+.2g}%"


def percent_interval(value: float | None, ci: tuple[float, float] | None) -> str:
    """'+3.7% [+3.1, +4.3]': a relative change and its interval in points of percent ('' parts when absent); a
    broken model's in the notation of its value, '+2.9e+04% [+2.6e+04, +3.3e+04]', not dropped."""
    if ci is None or value is None:
        return percent(value)
    spec = "+.1f" if abs(value) < 100 else "+.2g"
    return f"{percent(value)} [{ci[0] * 100:{spec}}, {ci[1] * 100:{spec}}]"


def number(value: float | None) -> str:
    """A metric value as the report prints it: two decimals, or three significant digits past 100,000."""
    if value is None:
        return ""
    return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.3g}"
