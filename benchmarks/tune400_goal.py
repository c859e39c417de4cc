"""Issue #20's goal, checked on the 400-step models: does a mitigation's per-tensor static INT8 cost <= +5% over its
own fp perplexity, at <= +3% fp cost against the 400-step control, both as the upper end of a 95% interval?

    python benchmarks/tune400_goal.py [results/published/tune400-step400.csv]

Reads the leaderboard's rows and their per-token NLLs (no model is run): the static INT8 change is the row's own
paired interval; the fp cost is a paired block bootstrap of the mitigation's fp NLLs against the control's on the
same tokens (qharness.stats.bootstrap.rel_change_interval, the control standing in for the fp model).
"""

from __future__ import annotations

import sys
from pathlib import Path

from qharness.data.results import is_baseline, key, read_rows
from qharness.data.units import read_units
from qharness.stats.bootstrap import rel_change_interval

CONTROL = "tune400:smollm2-135m-none"
STATIC = "int8-w8a8-tensor-static"


def main(path: Path) -> int:
    rows = read_rows(path)
    fp = {r["model"]: r for r in rows if is_baseline(r) and r["metric"] == "ppl"}
    nll = {model: read_units(path, key(row)).values for model, row in fp.items()}
    print("| model | fp ppl | fp vs control [95%] | static INT8 vs own fp [95%] | goal met |")
    print("|---|---|---|---|---|")
    for model, row in sorted(fp.items()):
        static = next(r for r in rows if r["model"] == model and r["quant"] == STATIC and r["metric"] == "ppl")
        s_mid, s_lo, s_hi = (100 * float(static[c]) for c in ("rel_delta", "ci_low", "ci_high"))
        if model == CONTROL:
            cost, met = "(the control)", "-"
        else:
            iv = rel_change_interval(nll[CONTROL], nll[model])
            change = float(row["value"]) / float(fp[CONTROL]["value"]) - 1
            cost = f"{100 * change:+.1f}% [{100 * iv.low:+.1f}, {100 * iv.high:+.1f}]"
            met = "yes" if s_hi <= 5 and 100 * iv.high <= 3 else "no"
        print(f"| {model} | {float(row['value']):.2f} | {cost} | {s_mid:+.1f}% [{s_lo:+.1f}, {s_hi:+.1f}] | {met} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/published/tune400-step400.csv")))
