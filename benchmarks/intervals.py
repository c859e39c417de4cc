"""Intervals from a leaderboard's units files: their cost, the autocorrelation behind the block size, and how much
text a given interval width needs. Nothing here runs a model: it reads what `qharness run` stored.

    qharness run --quant int8-w8a8-token,int8-w8a8-tensor --results /tmp/iv/leaderboard.csv   # once, ~10 min
    python benchmarks/intervals.py /tmp/iv/leaderboard.csv

Prints four tables:
- cost: per row, the run's own evaluation time (the `seconds` column) against writing its units file and
  computing its interval (timed here, the same calls the runner makes), as a share of the run;
- autocorrelation of the per-token NLL difference (quantized - fp) at lags 1..256 on the first 2 windows of each
  text (4,094 tokens: what most findings use), with the +-2/sqrt(T) band that independent tokens would stay in;
- block size: the interval's half-width against the block length on the same tokens; it grows while blocks are
  shorter than the dependence and levels off past it, which is where the block length should be;
- how much text is enough: the half-width of rel_delta's 95% interval against the tokens evaluated (whole
  windows, as `--limit` takes them), for every quantized row.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qharness.data.results import key, read_rows
from qharness.data.units import fp_key, interval_columns, read_units, units_of, write_units
from qharness.stats import bootstrap
from qharness.tasks.metrics import Metric

LAGS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BLOCKS = (1, 8, 32, 64, 128, 256, 512)
WINDOW = 2047  # text tokens per window at the default context of 2,048 with BOS


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in
                               enumerate(zip(line, widths, strict=True))) for line in lines)


def pairs(results: Path) -> list[tuple[dict[str, str], np.ndarray, np.ndarray]]:
    """(row, fp NLLs, quantized NLLs) for every perplexity row whose units and fp units are stored."""
    out = []
    for row in read_rows(results):
        if row["quant"] in ("", "none") or row["metric"] != "ppl":
            continue
        q, fp = read_units(results, key(row)), read_units(results, fp_key(key(row)))
        if q is not None and q.pairs_with(fp):
            out.append((row, fp.values, q.values))
    return out


def label(row: dict[str, str]) -> str:
    return f"{row['task']} {row['quant']}" + (f" keep {row['keep']}" if row["keep"] else "")


def cost_table(results: Path, repeats: int = 3) -> str:
    rows = []
    scratch = Path(tempfile.mkdtemp()) / "leaderboard.csv"
    run_seconds = total_extra = 0.0
    for row in read_rows(results):
        units = read_units(results, key(row))
        if units is None or row["metric"] != "ppl":
            continue
        fp = read_units(results, fp_key(key(row)))
        metric = Metric("ppl", float(row["value"]), False, "token-level", len(units.values), units=units.values,
                        units_hash=units.units_hash, windows=int(row["windows"] or 0))
        is_fp = row["quant"] == "none"
        start = time.perf_counter()
        for _ in range(repeats):
            interval_columns(metric, fp, is_fp, seed=0)
            write_units(scratch, key(row), units_of(metric))
        extra = (time.perf_counter() - start) / repeats
        seconds = float(row["seconds"])
        run_seconds += seconds
        total_extra += extra
        rows.append([label(row), f"{len(units.values)}", f"{seconds:.1f}", f"{extra * 1000:.1f}",
                     f"{extra / seconds:.3%}"])
    rows.append(["all rows", "", f"{run_seconds:.1f}", f"{total_extra * 1000:.1f}", f"{total_extra / run_seconds:.3%}"])
    return table(["row", "tokens", "eval s", "units+interval ms", "share"], rows)


def autocorrelation_table(found: list[tuple[dict[str, str], np.ndarray, np.ndarray]], tokens: int) -> str:
    rows = []
    for row, fp, q in found:
        diff = (q - fp)[:tokens]
        acf = bootstrap.autocorrelation(diff, list(LAGS))
        # 1 + 2 sum of the autocorrelations up to lag 127: how much the dependence inflates the variance of a mean
        summed = bootstrap.autocorrelation(diff, list(range(1, bootstrap.BLOCK)))
        inflation = 1 + 2 * sum(summed.values())
        rows.append([label(row), str(len(diff)), *[f"{acf[lag]:+.3f}" for lag in LAGS], f"{inflation:.2f}"])
    band = 2 / math.sqrt(tokens)
    return (table(["row", "tokens", *[f"lag {lag}" for lag in LAGS], "1+2*sum(lag 1..127)"], rows)
            + f"\n(independent tokens stay within +-{band:.3f} at each lag)")


def block_table(found: list[tuple[dict[str, str], np.ndarray, np.ndarray]], tokens: int) -> str:
    rows = []
    for row, fp, q in found:
        widths = [bootstrap.rel_change_interval(fp[:tokens], q[:tokens], block=b).half_width for b in BLOCKS]
        rows.append([label(row), *[f"{w * 100:.2f}" for w in widths]])
    return table(["row (half-width, pts)", *[f"block {b}" for b in BLOCKS]], rows)


def text_table(found: list[tuple[dict[str, str], np.ndarray, np.ndarray]]) -> str:
    rows = []
    for row, fp, q in found:
        for windows in range(1, math.ceil(len(fp) / WINDOW) + 1):
            n = min(len(fp), windows * WINDOW)
            interval = bootstrap.rel_change_interval(fp[:n], q[:n])
            rel = math.expm1(float(np.mean(q[:n] - fp[:n])))
            rows.append([label(row), str(windows), str(n), f"{rel * 100:+.2f}",
                         f"[{interval.low * 100:+.2f}, {interval.high * 100:+.2f}]", f"{interval.half_width * 100:.2f}",
                         str(interval.blocks)])
    return table(["row", "windows", "tokens", "rel %", "95% interval", "half-width pts", "blocks"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a leaderboard written with units (qharness run)")
    parser.add_argument("--tokens", type=int, default=2 * WINDOW, help="tokens for the autocorrelation and block "
                        "tables (default: 2 windows)")
    args = parser.parse_args(argv)
    found = pairs(args.results)
    if not found:
        print(f"{args.results}: no quantized perplexity row with units; run `qharness run` into it first",
              file=sys.stderr)
        return 2
    print("## cost of the units file and the interval, against the run's evaluation time\n")
    print(cost_table(args.results))
    print(f"\n## autocorrelation of the per-token NLL difference (first {args.tokens} tokens)\n")
    print(autocorrelation_table(found, args.tokens))
    print(f"\n## half-width of the 95% interval against the block length (first {args.tokens} tokens)\n")
    print(block_table(found, args.tokens))
    print("\n## how much text is enough: half-width against tokens evaluated\n")
    print(text_table(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
