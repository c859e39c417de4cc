"""The findings' published tables: each table of docs/findings.md between `<!-- generated: NAME -->` and
`<!-- end: NAME -->` is regenerated from a leaderboard shipped under results/published/.

Why: a number typed into the findings drifts from the run that made it and carries no interval. Here each table
is data (TABLES: its name, the leaderboard it reads, the rows or pairs it shows) rendered by the report's own
machinery: degradation.py for a row against its fp row with the row's paired interval, noise.py for the paired
interval of two rows' difference, curves.py for training curves. `python -m qharness.report.publish` rewrites the
text between the markers and nothing else; `--check` changes nothing, prints the diff and exits 1 when the
document and the shipped rows disagree (tests/report/test_publish.py runs it). Nothing here computes a model:
the rows come from `qharness run --results results/published/<name>.csv`, a folder no default run reads or writes.

Adding a table: compute its rows into a leaderboard under results/published/ (its `.units/` folder, the per-token
NLLs the intervals are drawn from, is shipped with it), add a `Table` to TABLES, put the two markers where the
table goes in docs/findings.md, and run the module.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from qharness.activations.profile import Profile
from qharness.core.errors import DataError, QHarnessError
from qharness.data.results import SCAN_TASK, Row, key, read_rows, write_atomic
from qharness.data.units import fp_key
from qharness.report.curves import build_curves, curves_table
from qharness.report.degradation import Degradation, degradations, number, percent_interval
from qharness.report.goal import Goal, goal_text, header, over_seeds, scheme_label, seeds_header, unjudged, verdicts
from qharness.report.noise import Noise, verdict
from qharness.report.profile_text import format_scan
from qharness.report.seeds import seed_contrasts, seed_groups, seeds_markdown

# relative to where it runs, the checkout's root (as `results/leaderboard.csv` is for `run`): an installed package
# has no docs or shipped results beside it
DOC = Path("docs/findings.md")
PUBLISHED = Path("results/published")
# a marker is a line of its own (a marker quoted inside a sentence, as the findings' header quotes one, is text)
START = re.compile(r"^<!-- generated: ([\w.-]+) -->$", re.M)
MARKERS = re.compile(r"^<!-- generated: (?P<name>[\w.-]+) -->\n(?P<body>.*?)^<!-- end: (?P<end>[\w.-]+) -->$",
                     re.S | re.M)
WIDTH = 118  # the findings' line width
BLOCK_NOTE = "paired block bootstrap: blocks of 128 tokens, 2,000 resamples"


@dataclass(frozen=True)
class Pick:
    """One quantized row of a leaderboard: a scheme and what was added to it (empty: nothing), as its columns say."""

    quant: str
    keep: str = ""  # the keep column: pos:0, ch:507, lin:q_proj,k_proj,v_proj
    kv: str = ""
    transform: str = ""

    def matches(self, d: Degradation) -> bool:
        return (d.quant, d.keep, d.kv, d.transform) == (self.quant, self.keep, self.kv, self.transform)

    @property
    def label(self) -> str:
        return Degradation("", self.quant, "", self.keep, "", "", 0.0, 1.0, False, self.kv, self.transform).label


@dataclass(frozen=True)
class Pair:
    """Two rows on the same tokens and what their difference tests; `recovery`: b is a fix of a, and the table
    also gives the share of a's loss that b recovers."""

    a: Pick
    b: Pick
    finding: str
    recovery: bool = False


@dataclass(frozen=True)
class Table:
    name: str  # the marker's NAME
    leaderboard: str  # a CSV under results/published/
    kind: Literal["rows", "pairs", "curves", "goal", "seeds", "grid", "matrix", "scan"]  # scan: `leaderboard` is a
    # shipped profile.json, printed as `qharness scan` prints it
    rows: tuple[Pick, ...] = ()  # kind rows: in this order; kind seeds: the schemes shown (fp and the scan always);
    # kind grid: the columns, one row per model of the leaderboard
    pairs: tuple[Pair, ...] = ()  # kind pairs
    goal: Goal | None = None  # kind goal
    scan: tuple[str, ...] = ()  # kind grid: scan measures (SCAN_COLUMNS) shown before the fp perplexity
    fp_vs_base: bool = False  # kind grid: each model's fp change against its family's model without a mitigation
    models: tuple[str, ...] = ()  # kind grid: only these models, in this order (empty: every model)
    columns: tuple[tuple[str, Pick], ...] = ()  # kind matrix: (header, fix) per column, its quant left empty; each
    # cell is the row's scheme and KV setting (`rows`) with the column's transform and kept positions
    layers: tuple[int, ...] = ()  # kind scan: the layers shown (empty: all)
    task: str = "kjv-heldout"
    metric: str = "ppl"
    note: str = ""  # printed under the table (what is left out of it and why)


def _p(quant: str, **settings: str) -> Pick:
    return Pick(quant, **settings)


BOS = "pos:0"
QKV = "lin:q_proj,k_proj,v_proj"
SQ = "smoothquant:0.5"

ZOO_SCHEMES = (_p("int8-w8a8-tensor"), _p("int8-w8a8-tensor-static"), _p("int8-w8a8-token"), _p("int4-weight-g128"),
               _p("nf4"), _p("fp8-e4m3-w8a8-tensor"), _p("fp8-e5m2-w8a8-tensor"))
ZOO_SCAN = ("massive_max", "massive_ratio", "bos_holds_max")

TABLES: tuple[Table, ...] = (
    Table("smollm2-scan", "scan/smollm2-135m/profile.json", "scan", layers=(1, 2, 10, 11, 12, 29),
          note="Made by `qharness scan --model smollm2-135m --out results/published/scan --intervention-limit 4` "
               "(the intervention on all 4 windows of held-out KJV; the default is 1)."),
    Table("smollm2-schemes", "smollm2-schemes.csv", "rows", rows=(
        _p("int8-weight-channel"), _p("int8-w8a8-token"), _p("llm-int8"),
        _p("int8-w8a8-tensor"), _p("int8-w8a8-tensor", keep=BOS), _p("int8-w8a8-tensor", keep="ch:507"),
        _p("int8-w8a8-tensor-static"), _p("int8-w8a8-tensor-static", keep=BOS), _p("int8-w8a8-tensor-static-p9999"),
        _p("int4-weight-g128"), _p("gptq-int4-g128"), _p("nf4"), _p("int4-w4a8-token"), _p("int4-w4a4-token"),
        _p("int4-w4a4-token", keep=BOS), _p("int4-w4a4-tensor"), _p("int4-w4a4-tensor", keep=BOS),
        _p("fp8-e4m3-weight"), _p("fp8-e4m3-w8a8-tensor"), _p("fp8-e4m3-w8a8-token"), _p("fp8-e5m2-w8a8-tensor"),
        _p("fp8-e4m3-unscaled"), _p("fp8-e5m2-unscaled"))),
    Table("smollm2-scheme-pairs", "smollm2-schemes.csv", "pairs", pairs=(
        Pair(_p("int8-w8a8-token"), _p("llm-int8"), "LLM.int8() against per-token INT8"),
        Pair(_p("int8-weight-channel"), _p("int8-w8a8-token"), "INT8 activations per token against weight-only"),
        Pair(_p("int8-w8a8-tensor"), _p("int8-w8a8-tensor-static"), "static per-tensor INT8 against dynamic"),
        Pair(_p("int8-w8a8-tensor"), _p("int8-w8a8-tensor", keep=BOS), "keep BOS, dynamic per-tensor INT8",
             recovery=True),
        Pair(_p("int8-w8a8-tensor-static"), _p("int8-w8a8-tensor-static", keep=BOS),
             "keep BOS, static per-tensor INT8", recovery=True),
        Pair(_p("int8-w8a8-tensor"), _p("int8-w8a8-tensor", keep="ch:507"), "keep channel 507, per-tensor INT8",
             recovery=True),
        Pair(_p("int8-w8a8-tensor-static"), _p("int8-w8a8-tensor-static-p9999"),
             "99.99th-percentile static scale against the max"),
        Pair(_p("int8-w8a8-token"), _p("fp8-e4m3-w8a8-tensor"), "FP8 E4M3 per tensor against INT8 per token"),
        Pair(_p("fp8-e4m3-w8a8-tensor"), _p("fp8-e4m3-w8a8-token"), "FP8 E4M3 per token against per tensor"),
        Pair(_p("fp8-e4m3-w8a8-tensor"), _p("fp8-e5m2-w8a8-tensor"), "FP8 E5M2 against E4M3, per tensor"),
        Pair(_p("nf4"), _p("int4-weight-g128"), "INT4 g128 round-to-nearest against NF4"),
        Pair(_p("int4-weight-g128"), _p("gptq-int4-g128"), "GPTQ against round-to-nearest, INT4 g128"),
        Pair(_p("int4-w4a4-token"), _p("int4-w4a4-token", keep=BOS), "keep BOS, W4A4 per token", recovery=True),
        Pair(_p("int4-w4a4-tensor"), _p("int4-w4a4-tensor", keep=BOS), "keep BOS, W4A4 per tensor",
             recovery=True))),
    Table("smollm2-fixes", "smollm2-schemes.csv", "pairs", pairs=(
        Pair(_p("int8-w8a8-tensor"), _p("int8-w8a8-tensor", transform="smoothquant:0.5"),
             "SmoothQuant, per-tensor INT8", recovery=True),
        Pair(_p("int8-w8a8-tensor"), _p("int8-w8a8-tensor", transform="rotate"), "rotation, per-tensor INT8",
             recovery=True),
        Pair(_p("int8-w8a8-tensor", keep=BOS), _p("int8-w8a8-tensor", transform="smoothquant:0.5"),
             "SmoothQuant against keeping BOS, per-tensor INT8"),
        Pair(_p("int8-w8a8-tensor", transform="smoothquant:0.5"), _p("int8-w8a8-tensor", transform="rotate"),
             "rotation against SmoothQuant, per-tensor INT8"),
        Pair(_p("int8-w8a8-tensor", transform="rotate"), _p("int8-w8a8-tensor", transform="rotate", keep=BOS),
             "keep BOS after rotation, per-tensor INT8", recovery=True),
        Pair(_p("int4-w4a4-token"), _p("int4-w4a4-token", transform="rotate"), "rotation, W4A4 per token",
             recovery=True),
        Pair(_p("nvfp4-w4a4"), _p("nvfp4-w4a4", transform="rotate"), "rotation, NVFP4 W4A4"),
        Pair(_p("int4-w4a8-token"), _p("int4-w4a8-token", transform="smoothquant:0.5"), "SmoothQuant, W4A8 per token",
             recovery=True),
        Pair(_p("int4-w4a8-token"), _p("int4-w4a8-token", transform="rotate"), "rotation under W4A8 per token"),
        Pair(_p("int4-w4a8-token", keep=QKV), _p("int4-w4a8-token", keep=QKV, transform="rotate"),
             "rotation under W4A8, q/k/v kept in full precision"),
        *(Pair(_p("int4-w4a8-token", keep=f"lin:{kept}"), _p("int4-w4a8-token", keep=f"lin:{kept}", transform="rotate"),
               f"rotation under W4A8, {what} kept in full precision")
          for kept, what in (("gate_proj,up_proj", "gate/up"), ("down_proj", "down_proj"), ("o_proj", "o_proj"))),
        Pair(_p("int4-w4a8-token"), _p("int4-w4a8-token", keep=QKV), "keep q/k/v, W4A8 per token",
             recovery=True),
        Pair(_p("int4-w4a8-token", transform="rotate"), _p("int4-w4a8-token", keep=QKV, transform="rotate"),
             "keep q/k/v, W4A8 per token after rotation", recovery=True))),
    Table("smollm2-kv-keep0", "smollm2-schemes.csv", "pairs", pairs=tuple(
        Pair(_p(quant, kv="int4-token"), _p(quant, kv="int4-token+keep0"), f"keep the first token's K/V, {what}",
             recovery=True)
        for quant, what in (("none", "fp weights"), ("int8-w8a8-tensor", "per-tensor INT8"),
                            ("int4-w4a8-token", "W4A8 per token"))),
        note="The KV setting `int4-token` quantizes keys and values per token to INT4; `+keep0` leaves the first "
             "token's keys and values exact. Each row's change is against the fp model with an fp cache."),
    Table("smollm2-microscaling", "smollm2-schemes.csv", "pairs", pairs=(
        Pair(_p("fp8-e4m3-w8a8-tensor"), _p("mxfp8-w8a8"), "MXFP8 (a power-of-two scale per 32) against FP8 E4M3 "
             "per tensor"),
        Pair(_p("mxfp4-w4a4"), _p("nvfp4-w4a4"), "NVFP4 (an E4M3 scale per 16) against MXFP4 (E8M0 per 32)"),
        Pair(_p("mxfp4-w4a4"), _p("mxfp4-w4a4", keep=BOS), "keep BOS, MXFP4 W4A4", recovery=True),
        Pair(_p("nvfp4-w4a4"), _p("nvfp4-w4a4", keep=BOS), "keep BOS, NVFP4 W4A4", recovery=True))),
    Table("smollm2-kivi", "smollm2-schemes.csv", "pairs", pairs=(
        *(Pair(_p(quant, kv="int4-token"), _p(quant, kv="int4-kivi"), f"KIVI against INT4 per token, {what}",
               recovery=True)
          for quant, what in (("none", "fp weights"), ("int8-w8a8-tensor", "per-tensor INT8"))),
        Pair(_p("none", kv="int4-token"), _p("none", kv="int8-token"), "INT8 against INT4 per token, fp weights",
             recovery=True)),
        note="`int4-kivi` quantizes keys per channel and values per token to INT4, keeping the open block of up to 31 "
             "keys in fp (KIVI, arXiv 2402.02750); `int4-token` and `int8-token` both per token. Each row's change "
             "is against the fp model with an fp cache."),
    # sweeps/zoo-mitigations.yaml: every zoo model, its scan and the fp change against its family's baseline
    *(Table(name, "zoo-mitigations.csv", "grid", rows=ZOO_SCHEMES, scan=ZOO_SCAN, fp_vs_base=True, task=task)
      for name, task in (("zoo-mitigations", "kjv-heldout"), ("zoo-mitigations-wordnet", "wordnet-heldout"))),
    # sweeps/zoo-recipes.yaml: the zoo's recipe against a decayed, clipped one
    Table("zoo-recipes", "zoo-recipes.csv", "grid", rows=ZOO_SCHEMES[:3], scan=ZOO_SCAN),
    # sweeps/smollm2-kv-fixes.yaml: each scheme and KV setting under each post-hoc fix, 2 windows
    Table("smollm2-kv-fixes", "smollm2-kv-fixes.csv", "matrix",
          rows=tuple(_p(q, kv=kv) for q in ("int8-w8a8-tensor", "int4-w4a8-token", "int4-w4a4-token", "nvfp4-w4a4")
                     for kv in ("", "int4-token", "int4-token+keep0", "int4-kivi")),
          columns=(("alone", _p("")), ("keep BOS", _p("", keep=BOS)), ("smoothquant", _p("", transform=SQ)),
                   ("smoothquant + keep BOS", _p("", keep=BOS, transform=SQ)), ("rotate", _p("", transform="rotate")),
                   ("rotate + keep BOS", _p("", keep=BOS, transform="rotate")))),
    # sweeps/seeds.yaml: the zoo's baseline and gated attention, 3 training seeds each
    Table("zoo-seeds", "zoo-seeds.csv", "seeds", rows=(
        _p("int8-w8a8-tensor"), _p("int8-w8a8-tensor-static"), _p("int4-weight-g128"))),
    # the runs of sweeps/tune400.yaml as `python -m qharness.experiment.curve_sweep` evaluated them
    Table("tune400", "tune400.csv", "curves"),
    # issue #20's goal on the finished 400-step models, evaluated again with per-token NLLs kept
    Table("tune400-goal", "tune400-step400.csv", "goal", goal=Goal(control="tune400:smollm2-135m-none")),
    # the same goal with QuaRot's rotation applied after training (the fp rows, and so the fp cost, are unchanged)
    Table("tune400-goal-rotated", "tune400-step400.csv", "goal",
          goal=Goal(control="tune400:smollm2-135m-none", transform="rotate")),
    # sweeps/tune40.yaml: SmolLM2 trained 40 steps further (constant lr) with each mitigation, 2 windows
    Table("tune40", "tune40.csv", "grid", rows=(
        _p("int8-w8a8-tensor"), _p("int8-w8a8-tensor-static"), _p("int8-w8a8-token"), _p("fp8-e4m3-w8a8-tensor"),
        _p("fp8-e5m2-w8a8-tensor"), _p("int4-weight-g128")), scan=ZOO_SCAN, fp_vs_base=True,
        note="fp vs base: against the control (`tune:smollm2-135m-none`, trained the same 40 steps without a "
             "mitigation); the pretrained model, of no family, has no base. A name ending `:strength=S` is the "
             "penalty's strength (`--penalty-strength S`; 1 otherwise)."),
    # sweeps/tune400-seeds.yaml: the control and the headline with training seeds 0-2; the goal after a rotation,
    # each seed against the control of its seed, then over seeds; and each recipe's spread
    Table("tune400-seeds-goal", "tune400-seeds.csv", "goal",
          goal=Goal(control="tune400:smollm2-135m-none", transform="rotate")),
    Table("tune400-seeds", "tune400-seeds.csv", "seeds", rows=(
        _p("int8-w8a8-tensor"), _p("int8-w8a8-tensor-static"), _p("int8-w8a8-tensor-static", transform="rotate"))),
    # per-tensor static INT8 on the finished 400-step models with each post-hoc fix
    Table("tune400-static-fixes", "tune400-step400.csv", "grid", rows=(
        _p("int8-w8a8-tensor"), _p("int8-w8a8-tensor-static"), _p("int8-w8a8-tensor-static-p9999"),
        _p("int8-w8a8-tensor-static", keep=BOS), _p("int8-w8a8-tensor-static", transform="smoothquant:0.5"),
        _p("int8-w8a8-tensor-static", transform="rotate"),
        _p("int8-w8a8-tensor-static", transform="rotate", keep=BOS)),
        note="`rotate` leaves a gated model's heads unrotated (the gate multiplies them channel by channel); its "
             "residual stream and down_proj input are rotated as any other model's."),
    # which Linear's input per-tensor static INT8 loses on: one kind kept in full precision at a time
    Table("tune400-keep-linears", "tune400-step400.csv", "grid", rows=(
        _p("int8-w8a8-tensor-static"),
        *(_p("int8-w8a8-tensor-static", keep=f"lin:{kept}")
          for kept in ("down_proj", "q_proj,k_proj,v_proj", "o_proj", "gate_proj,up_proj"))),
        models=("tune400:smollm2-135m-none", "tune400:smollm2-135m-lp_penalty:power=4:strength=1:threshold=64")),
)


def table_of(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _source(table: Table) -> str:
    change = "scan again" if table.kind == "scan" else "change the rows"
    return (f"Generated by `python -m qharness.report.publish` from `results/published/{table.leaderboard}` (not "
            f"edited here: {change}, or TABLES in qharness/report/publish.py).")


def _wrapped(lines: list[str]) -> list[str]:
    """Prose lines filled to the findings' width (118); tables, code blocks and blank lines as they are."""
    out, fenced = [], False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        keep = fenced or line.startswith(("|", "```")) or not line
        out.append(line if keep else textwrap.fill(line, WIDTH, break_on_hyphens=False, break_long_words=False))
    return out


def _tokens(n: str) -> str:
    return f"{int(n):,} tokens" if n else "an unknown number of tokens"


class Leaderboard:
    """One shipped leaderboard: its rows, their degradations and the noise between them."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise DataError(f"{path}: no such published leaderboard; compute its rows with `qharness run --results "
                            f"{path}` or remove its table from TABLES")
        self.path = path
        self.rows = read_rows(path)
        self.by_key = {key(r): r for r in self.rows}
        self.items = degradations(self.rows)
        self.noise = Noise(path)

    def find(self, pick: Pick, table: Table, model: str | None = None) -> Degradation | None:
        """The one row `pick` names on the table's task (of `model`, where the leaderboard holds several)."""
        found = [d for d in self.items if d.task == table.task and d.metric == table.metric and pick.matches(d)
                 and model in (None, d.model)]
        if len(found) > 1:
            raise DataError(f"{self.path}: {len(found)} rows for {pick.label} on {table.task}"
                            + (f" of {model}" if model else "") + " (several backends or evaluation settings); a "
                            "published table takes one, so keep one in the leaderboard")
        return found[0] if found else None

    def fp_row(self, d: Degradation) -> Row | None:
        return self.by_key.get(fp_key(d.row_key))


def _check_one_setting(found: list[Degradation], table: Table) -> None:
    if len({d.setting for d in found}) > 1:
        raise DataError(f"table {table.name}: its rows were measured at different evaluation settings (limit, "
                        "context, task data) and cannot be set side by side; recompute them at one")


def _evaluated(board: Leaderboard, found: list[Degradation], table: Table) -> str:
    """'kjv-heldout, 7,435 tokens (4 windows, the whole text), fp perplexity 23.10 [20.05, 26.41]'."""
    first = found[0]
    fp = board.fp_row(first)
    windows = fp.get("windows", "") if fp else ""
    limit = first.setting[3] if len(first.setting) == 4 else ""
    scope = f"the first {limit} windows" if limit else "the whole text"
    size = f"{_tokens(first.n)} ({windows + ' windows, ' if windows else ''}{scope})"
    fp_text = f"fp perplexity {number(first.fp_value)}"
    if fp and fp.get("ci_of") == "value" and fp.get("ci_low"):
        fp_text += f" [{number(float(fp['ci_low']))}, {number(float(fp['ci_high']))}]"
    return f"{table.task}, token-level perplexity on {size}; {fp_text}"


def _missing(picks: list[Pick]) -> str:
    return ("Not computed yet (no row in the leaderboard): " + ", ".join(f"`{p.label}`" for p in picks) + "."
            if picks else "")


def _mib(d: Degradation, board: Leaderboard) -> str:
    row = board.by_key.get(d.row_key)
    return f"{float(row['weight_bytes']) / 2**20:.0f}" if row and row.get("weight_bytes") else ""


def render_rows(table: Table, board: Leaderboard) -> list[str]:
    found = [(pick, board.find(pick, table)) for pick in table.rows]
    present = [d for _, d in found if d is not None]
    if not present:
        return [_source(table), "", _missing([p for p, _ in found])]
    _check_one_setting(present, table)
    lines = [_source(table) + f" {_evaluated(board, present, table)}. change: against fp, with its 95% interval in "
             f"points of percent ({BLOCK_NOTE}, paired with the fp row on the same tokens); backend: `sim` is the "
             "reference arithmetic, any other name a library kernel; weights: storage of the decoder-layer Linears.",
             ""]
    lines.append(table_of(["scheme", "backend", "ppl", "change [95% interval]", "weights MiB"],
                          [[f"`{d.label}`", d.backend, number(d.value), percent_interval(d.rel, d.ci), _mib(d, board)]
                           for d in present]))
    extra = [text for text in (_missing([p for p, d in found if d is None]), table.note) if text]
    return lines + ([""] + [" ".join(extra)] if extra else [])


# a scan measure's column: its label and how its value prints (bos_holds_max is a share of layer-sequence pairs)
SCAN_COLUMNS: dict[str, tuple[str, Callable[[float], str]]] = {
    "massive_max": ("max abs", lambda v: f"{v:.1f}"), "massive_ratio": ("max/median", lambda v: f"{v:.0f}"),
    "bos_holds_max": ("BOS holds max", lambda v: f"{v:.0%}")}


def _scan_cell(board: Leaderboard, model: str, metric: str) -> str:
    found = [r for r in board.rows if (r["model"], r["task"], r["metric"]) == (model, SCAN_TASK, metric)
             and r.get("value", "") != ""]
    if len(found) > 1:
        raise DataError(f"{board.path}: {len(found)} scan rows of {model} {metric} (scanned with different settings); "
                        "a published table takes one, so keep one in the leaderboard")
    return SCAN_COLUMNS[metric][1](float(found[0]["value"])) if found else ""


def _vs_base_cell(board: Leaderboard, fp: Row | None) -> str:
    """The fp change of a model against its family's model without a mitigation and with its training seed (the
    zoo's `-base`, a tune family's control), paired on the same tokens; '-' for that model itself, empty for a
    model of no family (a pretrained model: it has no base to be set against)."""
    if fp is None or not fp.get("family"):
        return ""
    if fp.get("mitigation", "") in ("", "none"):
        return "-"
    bases = {r["model"] for r in board.rows if r.get("family") and r.get("family") == fp.get("family")
             and r.get("mitigation") == "none" and r.get("train_seed", "") == fp.get("train_seed", "")}
    found = [board.by_key[k] for k in ((m, *key(fp)[1:]) for m in sorted(bases)) if k in board.by_key]
    if len(found) != 1:
        return "?" if not found else "? (several bases)"
    cost = float(fp["value"]) / float(found[0]["value"]) - 1
    interval = board.noise.rows_change(key(fp), key(found[0]))
    return percent_interval(cost, None if interval is None else (interval.low, interval.high))


def render_grid(table: Table, board: Leaderboard) -> list[str]:
    """One row per model (in the leaderboard's order), one column per pick: each model's change under each scheme
    or fix against its own fp perplexity, with the row's interval; an empty cell was not computed (or cannot be: a
    transform that does not know the model's layout)."""
    models = list(dict.fromkeys(d.model for d in board.items if d.task == table.task and d.metric == table.metric))
    if table.models:
        models = [m for m in table.models if m in models]
    cells = {m: [board.find(pick, table, m) for pick in table.rows] for m in models}
    present = [d for row in cells.values() for d in row if d is not None]
    if not present:
        return [_source(table), "", _missing(list(table.rows))]
    _check_one_setting(present, table)
    lines = [_source(table) + _evaluated_on(board, table.task) + " Each cell: the change against the model's own fp "
             f"perplexity with its 95% interval ({BLOCK_NOTE}, paired with the fp row on the same tokens); empty: "
             f"not computed. {_backends(present)}", ""]
    columns = ["model", *(SCAN_COLUMNS[m][0] for m in table.scan), "fp ppl",
               *(["fp vs base [95%]"] if table.fp_vs_base else []), *(f"`{pick.label}`" for pick in table.rows)]
    rows = []
    for model, row in cells.items():
        first = next((d for d in row if d is not None), None)
        if first is None:
            continue
        rows.append([f"`{model}`", *(_scan_cell(board, model, metric) for metric in table.scan),
                     number(first.fp_value), *([_vs_base_cell(board, board.fp_row(first))] if table.fp_vs_base else []),
                     *(percent_interval(d.rel, d.ci) if d is not None else "" for d in row)])
    if table.fp_vs_base:
        lines[0] += (" fp vs base: the fp perplexity against the family's model without a mitigation (same training "
                     f"seed), with its 95% interval ({BLOCK_NOTE}, paired on the same tokens).")
    if table.scan:
        lines[0] += " Scan columns: `qharness scan`'s largest |h| over the decoder layers, its max/median, and the " \
                    "share of (layer, sequence) pairs whose largest entry is on BOS."
    return lines + [table_of(columns, rows)] + (["", table.note] if table.note else [])


def _backends(found: list[Degradation]) -> str:
    """Who computed a pairs table's rows (its columns have no room for it): 'Every row computed by sim ...'."""
    names = sorted({d.backend for d in found if d.backend})
    if names == ["sim"]:
        return "Every row computed by `sim`, the reference arithmetic."
    listed = ", ".join(f"`{n}`" for n in names)
    return f"Rows computed by {listed} (`sim`: the reference arithmetic; any other: a library kernel)."


def _recovered(board: Leaderboard, a: Degradation, b: Degradation) -> str:
    if a.rel <= 0:
        return "no loss to recover"
    share = board.noise.recovered(a, b)
    value = (a.rel - b.rel) / a.rel
    return f"{value:.0%}" + (f" [{share.low:.0%}, {share.high:.0%}]" if share is not None else "")


def render_pairs(table: Table, board: Leaderboard) -> list[str]:
    found = [(pair, board.find(pair.a, table), board.find(pair.b, table)) for pair in table.pairs]
    present = [(pair, a, b) for pair, a, b in found if a is not None and b is not None]
    missing = sorted({p for pair, a, b in found for p, d in ((pair.a, a), (pair.b, b)) if d is None},
                     key=lambda p: p.label)
    if not present:
        return [_source(table), "", _missing(missing)]
    _check_one_setting([d for _, a, b in present for d in (a, b)], table)
    has_recovery = any(pair.recovery for pair, _, _ in present)
    lines = [_source(table) + f" {_evaluated(board, [present[0][1]], table)}. Each change is against the fp row "
             "with its own interval; B - A is the difference of the two changes in points of percent (two decimals, so "
             "that an end near 0 shows its side) with its 95% "
             f"interval ({BLOCK_NOTE}, the same blocks for every model: the text's difficulty cancels); within "
             "noise: that interval covers 0." + (" recovered: the share of A's loss that B takes back, with its "
                                                  "interval from the same resamples." if has_recovery else "")
             + f" {_backends([d for _, a, b in present for d in (a, b)])}", ""]
    rows = []
    for pair, a, b in present:
        interval = board.noise.difference(b, a)
        diff = f"{(b.rel - a.rel) * 100:+.2f}" + (f" [{interval.low * 100:+.2f}, {interval.high * 100:+.2f}]"
                                                   if interval is not None else " (no units: no interval)")
        rows.append([pair.finding, f"`{a.label}`", percent_interval(a.rel, a.ci), f"`{b.label}`",
                     percent_interval(b.rel, b.ci), diff, verdict(interval, "B", "A") or "",
                     *([_recovered(board, a, b) if pair.recovery else ""] if has_recovery else [])])
    lines.append(table_of(["comparison", "A", "A change", "B", "B change", "B - A (pts)", "verdict",
                           *(["recovered"] if has_recovery else [])], rows))
    extra = [text for text in (_missing(missing), table.note) if text]
    return lines + ([""] + [" ".join(extra)] if extra else [])


def _evaluated_on(board: Leaderboard, task: str | None) -> str:
    """' Evaluated on 7435 tok, all of kjv-heldout.': the sizes the table's perplexity rows were measured on."""
    sizes = sorted({d.evaluated for d in board.items if d.task == task and d.metric == "ppl"})
    return f" Evaluated on {', '.join(sizes)} of {task}." if sizes else ""


def render_curves(table: Table, board: Leaderboard) -> list[str]:
    curves, task = build_curves(board.rows, board.items)
    if not curves:
        return [_source(table), "", "No run in the leaderboard has rows at two steps yet."]
    return [_source(table) + _evaluated_on(board, task), "",
            *curves_table(curves, task, table_of)]


def render_goal(table: Table, board: Leaderboard) -> list[str]:
    assert table.goal is not None, f"table {table.name} of kind goal names no Goal"
    found = verdicts(board.path, table.goal)
    missing = unjudged(board.rows, board.path, table.goal, found)
    not_judged = ["", f"Not judged (no {scheme_label(table.goal)} row with an interval: not computed, or refused): "
                  + ", ".join(f"`{m}`" for m in missing) + "."] if missing else []
    if not found:
        return [_source(table), "", "No model has both its fp row and the scheme's row yet.", *not_judged]
    lines = [_source(table) + _evaluated_on(board, table.goal.task)
             + f" {goal_text(table.goal)} The fp cost is a {BLOCK_NOTE} of the model's per-token NLLs against the "
             "control's on the same tokens.", "", table_of(header(table.goal), [v.cells() for v in found])]
    seeds, left_out = over_seeds(found, table.goal)
    if seeds:
        lines += ["", "Over training seeds (each seed's model against the control trained with the same seed): the "
                      "mean of the per-seed changes; its 95% interval adds in quadrature the seeds' spread (Student's "
                      "t on the mean's standard error), which the rows above cannot show, and the evaluation text's "
                      "(the mean of the seeds' own half-widths), which every seed shares:", "",
                  table_of(seeds_header(table.goal), [s.cells() for s in seeds])]
    if left_out:
        lines += ["", "Left out of the verdict over seeds: " + "; ".join(left_out) + "."]
    return lines + not_judged


def render_seeds(table: Table, board: Leaderboard) -> list[str]:
    """The spread over training seeds of each recipe (report/seeds.py), for fp, the scan's max |h| and the schemes
    named in `table.rows`; then, per task, each recipe's mean fp perplexity against the first recipe's."""
    shown = {(p.quant, p.keep, p.kv, p.transform) for p in table.rows} | {("none", "", "", "")}
    groups = [g for g in seed_groups(board.rows)
              if (g["task"] == SCAN_TASK and g["metric"] == "massive_max")
              or (g["metric"] == table.metric and (g["quant"], g["keep"], g["kv"], g["transform"]) in shown)]
    if not groups:
        return [_source(table), "", "No recipe has rows for two or more training seeds yet."]
    lines = [_source(table) + " Mean, sample standard deviation and range over the seeds of each recipe (the seeds "
             "of a recipe: rows with the same train_recipe, the recipe's digest without its seed); rel: the change "
             "against each seed's own fp row.", "", seeds_markdown(groups, table_of)[-1]]
    contrasts = seed_contrasts(groups)
    if contrasts:
        lines += ["", table_of(["task", "recipe", "against", "fp ppl difference of means", "Welch 95% interval",
                                "verdict"], contrasts)]
    return lines


def render_matrix(table: Table, board: Leaderboard) -> list[str]:
    """One model's grid of schemes and KV settings (rows) against fixes (columns): each cell the change against the
    fp model with its interval; empty: not computed."""
    def cell_pick(row: Pick, column: Pick) -> Pick:
        return Pick(row.quant, keep=column.keep, kv=row.kv, transform=column.transform)

    cells = [[board.find(cell_pick(row, column), table) for _, column in table.columns] for row in table.rows]
    present = [d for line in cells for d in line if d is not None]
    if not present:
        return [_source(table), "", _missing([cell_pick(r, c) for r in table.rows for _, c in table.columns])]
    _check_one_setting(present, table)
    computed = f"{len(present)} of {len(table.rows) * len(table.columns)} cells computed"
    lines = [_source(table) + _evaluated_on(board, table.task) + f" fp perplexity {number(present[0].fp_value)}. Each "
             f"cell: the change against the fp model (fp weights, fp KV cache) with its 95% interval ({BLOCK_NOTE}, "
             f"paired on the same tokens); empty: not computed ({computed}). {_backends(present)}", ""]
    header = ["scheme", "KV cache", *(name for name, _ in table.columns)]
    body = [[f"`{row.quant}`", row.kv or "fp", *(percent_interval(d.rel, d.ci) if d is not None else "" for d in line)]
            for row, line in zip(table.rows, cells, strict=True)]
    return lines + [table_of(header, body)] + (["", table.note] if table.note else [])


RENDER: dict[str, Callable[[Table, Leaderboard], list[str]]] = {"rows": render_rows, "pairs": render_pairs,
                                                                  "curves": render_curves, "goal": render_goal,
                                                                  "seeds": render_seeds, "grid": render_grid,
                                                                  "matrix": render_matrix}


def render_scan(table: Table, path: Path) -> list[str]:
    """A shipped scan profile as `qharness scan` printed it (its chosen layers), in a code block."""
    if not path.is_file():
        raise DataError(f"{path}: no such published scan profile; write it with `qharness scan --out "
                        f"{path.parent.parent}` or remove its table from TABLES")
    profile = Profile.read(path)
    shown = (f"layers {', '.join(map(str, table.layers))} of {len(profile.layers)} (the profile holds every layer)"
             if table.layers else "every layer")
    lines = [_source(table) + f" `qharness scan --model {profile.model}`, {shown}. The intervention's perplexities "
             "are on the text named, the original's with its own 95% interval, zero and mean with their change "
             f"against it ({BLOCK_NOTE}, paired on the same tokens).", "", "```",
             *format_scan(profile, layers=table.layers or None).splitlines(), "```"]
    return lines + (["", table.note] if table.note else [])


def render(table: Table, published: Path) -> str:
    """The text that goes between the table's markers (ending in a newline)."""
    path = published / table.leaderboard
    lines = render_scan(table, path) if table.kind == "scan" else RENDER[table.kind](table, Leaderboard(path))
    return "\n".join(_wrapped(lines)) + "\n"


def regenerate(text: str, tables: tuple[Table, ...], published: Path) -> str:
    """`text` with the body between each pair of markers replaced by its table; everything else untouched. A marker
    without its end, an end naming another table, or a name TABLES does not hold is a DataError."""
    by_name = {t.name: t for t in tables}
    starts = START.findall(text)
    matched = list(MARKERS.finditer(text))
    for m in matched:
        if m["end"] != m["name"]:
            raise DataError(f"<!-- generated: {m['name']} --> is closed by <!-- end: {m['end']} -->; each table ends "
                            "with its own name")
        if m["name"] not in by_name:
            raise DataError(f"no published table named {m['name']!r}; known: {', '.join(sorted(by_name))}")
    if len(matched) != len(starts):
        unclosed = sorted(set(starts) - {m["name"] for m in matched})
        raise DataError(f"<!-- generated: {unclosed[0]} --> has no <!-- end: {unclosed[0]} --> after it")
    return MARKERS.sub(lambda m: f"<!-- generated: {m['name']} -->\n{render(by_name[m['name']], published)}"
                                 f"<!-- end: {m['name']} -->", text)


def unplaced(text: str, tables: tuple[Table, ...]) -> list[str]:
    """Tables of TABLES that the document has no markers for (each must be placed exactly once)."""
    placed = START.findall(text)
    return [t.name for t in tables if placed.count(t.name) != 1]


DELIMITER_ROW = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)+\|?\s*$")  # |---|---|, with or without pipes
FENCE = re.compile(r"^\s*(```|~~~).*?^\s*(```|~~~)\s*$", re.M | re.S)
TYPED_NOTE = "not yet generated"
NOTE_REACH = 8  # lines above a typed table in which its note must stand (and never above the table before it)


def _blanked(text: str, pattern: re.Pattern[str]) -> str:
    """The text with every match replaced by as many empty lines: line numbers hold, the content is gone."""
    return pattern.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def unmarked_typed_tables(text: str) -> list[int]:
    """Line numbers (1-based, the header row) of tables outside generated blocks and code fences whose preceding
    lines, back to the table before, do not say "not yet generated": a reader must be able to tell a typed number,
    which has no interval, from a published one."""
    lines = _blanked(_blanked(text, MARKERS), FENCE).splitlines()
    found, previous_end = [], 0
    for at, line in enumerate(lines):
        if at == 0 or not DELIMITER_ROW.match(line):
            continue
        header = at - 1  # 0-based; the table's own rows follow the delimiter
        note = " ".join(lines[max(previous_end, header - NOTE_REACH):header]).lower()
        if TYPED_NOTE not in note:
            found.append(header + 1)
        previous_end = at + 1
        while previous_end < len(lines) and "|" in lines[previous_end]:
            previous_end += 1
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qharness.report.publish", description=__doc__.split("\n\n")[0],
                                     epilog="examples:\n  python -m qharness.report.publish          # rewrite the "
                                            "tables\n  python -m qharness.report.publish --check  # the test: exit "
                                            "1 and a diff when they are stale",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 and print the diff if "
                                                             "regenerating would change the document")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"the document (default: {DOC})")
    parser.add_argument("--published", type=Path, default=PUBLISHED,
                        help=f"the shipped leaderboards (default: {PUBLISHED})")
    args = parser.parse_args(argv)
    try:
        text = args.doc.read_text(encoding="utf-8")
        missing = unplaced(text, TABLES)
        if missing:
            raise DataError(f"{args.doc} has no (or more than one) markers for the tables {missing}: add "
                            f"<!-- generated: {missing[0]} --> and <!-- end: {missing[0]} --> where it goes")
        typed = unmarked_typed_tables(text)
        if typed:
            raise DataError(f"{args.doc}: the table at line {typed[0]} is neither generated nor marked: put it between "
                            f"generated markers, or say \"{TYPED_NOTE}\" in the {NOTE_REACH} lines above it")
        new = regenerate(text, TABLES, args.published)
    except (QHarnessError, OSError) as exc:
        print(f"qharness: error: {exc}", file=sys.stderr)
        return 2
    if new == text:
        print(f"{args.doc}: its {len(TABLES)} generated tables match {args.published}")
        return 0
    if args.check:
        sys.stdout.writelines(difflib.unified_diff(text.splitlines(keepends=True), new.splitlines(keepends=True),
                                                   str(args.doc), f"{args.doc} regenerated"))
        print(f"{args.doc}: generated tables differ from {args.published}; run python -m qharness.report.publish",
              file=sys.stderr)
        return 1
    write_atomic(args.doc, new)
    print(f"{args.doc}: regenerated {len(TABLES)} tables from {args.published}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
