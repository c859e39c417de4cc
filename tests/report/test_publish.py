"""The findings' generated tables: docs/findings.md against the shipped leaderboards, and the marker replacement,
the tables and their intervals on tiny synthetic leaderboards."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qharness.core.errors import DataError
from qharness.data.results import append_rows, key, make_row
from qharness.data.units import Units, write_units
from qharness.report import publish
from qharness.report.publish import Pair, Pick, Table, regenerate, render

TOKENS = 4094
REPO = Path(__file__).resolve().parents[2]  # the checkout: the tests may run against an installed wheel


def test_the_findings_tables_are_what_the_shipped_leaderboards_give(capsys):
    """The doc's generated tables, regenerated from results/published/ (no model: rows and units only), change
    nothing; on failure the diff is printed: rerun `python -m qharness.report.publish` or fix the rows."""
    doc, published = REPO / publish.DOC, REPO / publish.PUBLISHED
    assert publish.unplaced(doc.read_text(encoding="utf-8"), publish.TABLES) == []
    assert publish.main(["--check", "--doc", str(doc), "--published", str(published)]) == 0, \
        capsys.readouterr().out[-4000:]


def test_a_typed_table_must_say_it_is_not_generated(tmp_path, capsys):
    """Every table of the findings is generated or says it is not (its numbers carry no interval), each table its
    own note; publish refuses a document with a bare one before rendering anything."""
    assert publish.unmarked_typed_tables((REPO / publish.DOC).read_text(encoding="utf-8")) == []
    table = "| a | b |\n|---|---|\n| 1 | 2 |\n"
    generated = f"<!-- generated: t -->\n{table}<!-- end: t -->\n"
    typed = publish.unmarked_typed_tables
    assert typed(f"intro\n\n{generated}\ntext\n") == []
    assert typed(f"(Not yet generated from results/published):\n\n{table}") == []
    assert typed(f"{generated}\nsome typed numbers:\n\n{table}") == [9]
    assert typed(table) == [1]
    assert typed("a | b\n--- | ---\n1 | 2\n") == [1], "a table without outer pipes is a table"
    reach = publish.NOTE_REACH
    assert typed("(not yet generated)\n" + "\n" * (reach - 1) + table) == []  # exactly in reach
    assert typed("(not yet generated)\n" + "\n" * reach + table) == [reach + 2]  # one line too far
    # one note covers one table: the next table needs its own
    assert typed(f"not yet generated:\n\n{table}\nmore prose\n\n{table}") == [9]
    assert typed(f"an example:\n\n```\n{table}```\n") == [], "a table in a code fence is an example"
    assert typed("|h| and max/median, a sentence, not a table\n") == []
    doc = tmp_path / "findings.md"
    findings = (REPO / publish.DOC).read_text(encoding="utf-8")
    doc.write_text(findings + "\nnumbers typed by hand:\n\n" + table, encoding="utf-8")
    assert publish.main(["--check", "--doc", str(doc), "--published", str(REPO / publish.PUBLISHED)]) == 2
    assert f"the table at line {findings.count(chr(10)) + 4} is neither generated nor marked" in capsys.readouterr().err


def test_the_published_folder_is_tracked_and_default_runs_write_elsewhere():
    from qharness.experiment.settings import RunSettings

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing to say about what git tracks")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0

    assert not ignored("results/published/smollm2-schemes.csv")
    assert not ignored("results/published/smollm2-schemes.units/0123.npz")
    assert ignored("results/published/smollm2-schemes.csv.lock") and ignored("results/leaderboard.csv")
    assert RunSettings().results == Path("results/leaderboard.csv")  # the quick start never reads the shipped rows


def ppl_row(results, nll, fp_nll, quant="none", limit="", **settings):
    row = make_row(float(np.exp(nll.mean())), float(np.exp(fp_nll.mean())), model="m", quant=quant,
                   backend="" if quant == "none" else "sim", task="kjv-heldout", task_hash="h", metric="ppl",
                   bos=True, context_length=2048, limit=limit, dtype="fp32", device_type="cpu", higher_is_better=False,
                   metric_kind="token-level", n=TOKENS, windows=2, weight_bytes=2**20 * 3, **settings)
    write_units(results, key(row), Units(nll, "nll", "kjv"))
    return row


@pytest.fixture()
def board(tmp_path):
    """A shipped folder with one leaderboard: fp, a scheme that loses 35%, and BOS kept taking back most of it."""
    published = tmp_path / "published"
    published.mkdir()
    results = published / "lb.csv"
    rng = np.random.default_rng(0)
    fp = rng.gamma(2.0, 1.5, size=TOKENS)
    plain = fp + 0.3 + rng.normal(0, 0.3, TOKENS)
    kept = fp + 0.05 + rng.normal(0, 0.3, TOKENS)
    fp_row = ppl_row(results, fp, fp)
    fp_row.update(ci_of="value", ci_low="20.5", ci_high="23.5")
    append_rows(results, [fp_row, ppl_row(results, plain, fp, quant="int8-w8a8-tensor", ci_of="rel_delta",
                                          ci_low="0.31", ci_high="0.39"),
                          ppl_row(results, kept, fp, quant="int8-w8a8-tensor", keep="pos:0")])
    return published


TABLES = (
    Table("schemes", "lb.csv", "rows", rows=(Pick("int8-w8a8-tensor"), Pick("int8-w8a8-tensor", keep="pos:0"),
                                             Pick("nf4")), note="A note."),
    Table("keep-bos", "lb.csv", "pairs", pairs=(Pair(Pick("int8-w8a8-tensor"), Pick("int8-w8a8-tensor", keep="pos:0"),
                                                     "keep BOS", recovery=True),)),
)

DOC = """# Findings

Text before, with a typed number 54.32 that stays; a quoted `<!-- generated: NAME -->` inside a line is text.

<!-- generated: schemes -->
stale table
<!-- end: schemes -->

Between the tables.
<!-- generated: keep-bos -->
<!-- end: keep-bos -->
After.
"""


def test_markers_are_replaced_and_the_text_outside_them_is_untouched(board):
    out = regenerate(DOC, TABLES, board)
    outside = [part.split("<!-- end: ")[-1] for part in out.split("<!-- generated: ")]
    assert outside == [part.split("<!-- end: ")[-1] for part in DOC.split("<!-- generated: ")]
    assert "stale table" not in out and out.count("\n<!-- generated:") == 2
    assert "`<!-- generated: NAME -->` inside" in out  # a quoted marker is text
    assert regenerate(out, TABLES, board) == out  # regenerating twice changes nothing

    schemes = out.split("<!-- generated: schemes -->\n")[1].split("<!-- end: schemes -->")[0]
    assert max(len(line) for line in schemes.splitlines() if not line.startswith("|")) <= publish.WIDTH
    prose = " ".join(line for line in schemes.splitlines() if not line.startswith("|"))
    assert "`results/published/lb.csv`" in prose and "4,094 tokens (2 windows, the whole text)" in prose
    assert "fp perplexity" in prose and "[20.50, 23.50]" in prose
    assert "| `int8-w8a8-tensor` | sim |" in schemes and "[+31.0, +39.0] | 3 |" in schemes
    assert "Not computed yet (no row in the leaderboard): `nf4`. A note." in prose

    pairs = out.split("<!-- generated: keep-bos -->\n")[1].split("<!-- end: keep-bos -->")[0]
    assert "Every row computed by `sim`" in " ".join(pairs.splitlines())
    (line,) = [row for row in pairs.splitlines() if row.startswith("| keep BOS")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "`int8-w8a8-tensor`" and cells[3] == "`int8-w8a8-tensor (keep pos:0)`"
    low, high = (float(x) for x in cells[5].split("[")[1].rstrip("]").split(","))
    assert low < float(cells[5].split()[0]) < high < 0 and cells[6] == "B lower"
    share, interval = cells[7].split(" ", 1)
    low, high = (float(x.rstrip("%")) for x in interval.strip("[]").split(","))
    assert 0 < low < float(share.rstrip("%")) < high < 100


def test_the_check_mode_fails_with_a_diff_and_writes_nothing(board, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(publish, "TABLES", TABLES)
    doc = tmp_path / "findings.md"
    doc.write_text(DOC)
    assert publish.main(["--check", "--doc", str(doc), "--published", str(board)]) == 1
    assert "-stale table" in capsys.readouterr().out and doc.read_text() == DOC
    assert publish.main(["--doc", str(doc), "--published", str(board)]) == 0
    assert publish.main(["--check", "--doc", str(doc), "--published", str(board)]) == 0
    doc.write_text(DOC.replace("<!-- generated: keep-bos -->\n<!-- end: keep-bos -->\n", ""))
    assert publish.main(["--check", "--doc", str(doc), "--published", str(board)]) == 2
    assert "no (or more than one) markers for the tables ['keep-bos']" in capsys.readouterr().err


@pytest.mark.parametrize(("doc", "message"), [
    ("<!-- generated: schemes -->\nx\n", "<!-- generated: schemes --> has no <!-- end: schemes --> after it"),
    ("<!-- generated: schemes -->\nx\n<!-- end: keep-bos -->\n", "is closed by <!-- end: keep-bos -->"),
    ("<!-- generated: nope -->\n<!-- end: nope -->\n", "no published table named 'nope'; known: keep-bos, schemes"),
])
def test_broken_markers_are_one_line_errors(board, doc, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[")):
        regenerate(doc, TABLES, board)


def test_a_row_measured_twice_or_rows_of_two_settings_are_refused(board):
    results = board / "lb.csv"
    rng = np.random.default_rng(1)
    fp = rng.gamma(2.0, 1.5, size=TOKENS)
    append_rows(results, [ppl_row(results, fp, fp, limit="2"), ppl_row(results, fp + 0.1, fp, quant="nf4", limit="2"),
                          ppl_row(results, fp + 0.2, fp, quant="int8-w8a8-tensor", limit="2")])
    with pytest.raises(DataError, match=r"2 rows for int8-w8a8-tensor on kjv-heldout \(several backends or evaluation"):
        render(TABLES[0], board)
    mixed = Table("mixed", "lb.csv", "rows", rows=(Pick("int8-w8a8-tensor", keep="pos:0"), Pick("nf4")))
    with pytest.raises(DataError, match="table mixed: its rows were measured at different evaluation settings"):
        render(mixed, board)


def test_a_table_whose_leaderboard_is_not_shipped_says_how_to_make_it(tmp_path):
    with pytest.raises(DataError, match=r"no such published leaderboard; compute its rows with `qharness run"):
        render(Table("x", "missing.csv", "rows", rows=(Pick("nf4"),)), tmp_path)


def curve_row(model, quant, value, fp_value, mitigation):
    return make_row(value, fp_value, model=model, quant=quant, backend="" if quant == "none" else "sim",
                    task="kjv-heldout", task_hash="h", metric="ppl", bos=True, context_length=2048, limit="",
                    dtype="fp32", device_type="cpu", higher_is_better=False, metric_kind="token-level", n=7435,
                    mitigation=mitigation)


def test_a_training_curve_table_renders_from_a_curve_leaderboard(tmp_path):
    """The tune400 table, once results/published/tune400.csv is shipped, is one more Table of kind curves."""
    rows = []
    for mitigation, fps in (("none", (23.73, 21.03)), ("kv_bias", (24.0, 21.5))):
        for step, fp in zip((40, 400), fps, strict=True):
            model = f"tune400:smollm2-135m-{mitigation}@step{step}"
            rows += [curve_row(model, "none", fp, fp, mitigation),
                     curve_row(model, "int8-w8a8-tensor", fp * 1.8, fp, mitigation)]
    append_rows(tmp_path / "tune400.csv", rows)
    text = render(Table("tune400", "tune400.csv", "curves"), tmp_path)
    prose = " ".join(line for line in text.splitlines() if not line.startswith("|"))
    assert "`results/published/tune400.csv`" in prose and "Evaluated on 7435 tok, all of kjv-heldout." in prose
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| run | steps | fp ppl | fp vs control | int8-w8a8-tensor |"
    assert table[2] == ("| tune400:smollm2-135m-none | 40, 400 | 21.03 (23.73 at 40) | +0.0% (+0.0% at 40) "
                        "| +80.0% (+80.0% at 40) |")
    assert table[3].startswith("| tune400:smollm2-135m-kv_bias | 40, 400 | 21.50 (24.00 at 40) | +2.2% (+1.1% at 40) |")


def test_the_goal_table_judges_each_bar_on_its_interval(tmp_path):
    """Issue #20's goal: met only when the upper end of both intervals is within its bar (static INT8 <= +5% over the
    model's own fp, fp <= +3% against the control), never on a point estimate. The fp cost's interval comes from the
    units, paired by token; without paired units the verdict is unknown, not "no"."""
    from qharness.report.goal import Goal, verdicts

    rng = np.random.default_rng(1)
    control = rng.gamma(2.0, 1.5, size=TOKENS)
    noise = rng.normal(0, 0.3, TOKENS)  # the same per-token noise for each model: only the shift moves the cost
    results = tmp_path / "step400.csv"
    rows = []
    cases = (("control", None, 0.90), ("meets", 0.015, 0.045), ("static-over", 0.005, 0.051),
             ("fp-upper-over", 0.026, 0.02), ("fp-far-over", 0.06, 0.02), ("no-units", 0.005, 0.02))
    for model, shift, static_high in cases:
        fp = control if shift is None else control + shift + noise - noise.mean()
        fp_row, static = ppl_row(results, fp, fp), ppl_row(results, fp + 0.01, fp, quant="int8-w8a8-tensor-static")
        for row in (fp_row, static):
            row["model"] = model
        static.update(ci_of="rel_delta", ci_low=str(static_high - 0.02), ci_high=str(static_high))
        if model != "no-units":
            write_units(results, key(fp_row), Units(fp, "nll", "kjv"))
        rows += [fp_row, static]
    append_rows(results, rows)
    found = {v.model: v for v in verdicts(results, Goal(control="control"))}
    assert list(found)[0] == "control" and found["control"].is_control and found["control"].met is None
    upper = {m: found[m].fp_interval.high for m in ("meets", "fp-upper-over")}
    assert found["fp-upper-over"].fp_cost < 0.03 < upper["fp-upper-over"]  # the point is under the bar, the end not
    assert upper["meets"] < 0.03
    assert {m: v.met for m, v in found.items() if not v.is_control} == {
        "meets": True, "static-over": False, "fp-upper-over": False, "fp-far-over": False, "no-units": None}
    text = render(Table("goal", "step400.csv", "goal", goal=Goal(control="control")), tmp_path)
    assert "| `meets` | " in text and text.count("| yes |") == 1 and text.count("| no |") == 3
    assert "| ? (no paired units) |" in text
    # the scheme after a post-hoc transform is a goal of its own: its rows never stand in for the plain ones
    rotated = [{**rows[i], "transform": "rotate", "ci_low": "0.001", "ci_high": "0.004"} for i in (1, 5)]
    append_rows(results, rotated)
    assert {v.model: v.met for v in verdicts(results, Goal(control="control"))} == {m: found[m].met for m in found}
    after = {v.model: v for v in verdicts(results, Goal(control="control", transform="rotate"))}
    assert list(after) == ["control", "static-over"] and after["static-over"].met is True
    assert after["static-over"].scheme_interval == (0.001, 0.004)
    text = render(Table("goal", "step400.csv", "goal", goal=Goal(control="control", transform="rotate")), tmp_path)
    assert "`int8-w8a8-tensor-static` after `rotate` vs own fp [95%]" in text
    # the models without a rotated row are named, not dropped; the plain goal judges every model
    assert ("Not judged (no `int8-w8a8-tensor-static` after `rotate` row with an interval: not computed, or refused): "
            "`fp-far-over`, `fp-upper-over`, `meets`, `no-units`.") in " ".join(text.split())
    assert "Not judged" not in render(Table("goal", "step400.csv", "goal", goal=Goal(control="control")), tmp_path)
    none_yet = render(Table("goal", "step400.csv", "goal", goal=Goal(control="control", transform="smoothquant:0.5")),
                      tmp_path)
    assert "No model has both" in none_yet and "`control`, `fp-far-over`" in " ".join(none_yet.split())
    append_rows(results, [{**rows[2], "limit": "2"}])  # the same model and scheme measured twice
    with pytest.raises(DataError, match="2 rows of meets none on kjv-heldout"):
        verdicts(results, Goal(control="control"))


def test_a_broken_models_verdict_prints_in_the_reports_notation():
    """A model that no longer models the text (fp perplexity 1e16) gets a row that reads, not 17 digits."""
    from qharness.report.goal import Verdict
    from qharness.stats.bootstrap import Interval

    cells = Verdict("dyt", 1.2829e16, 6.1e14, Interval(2.8e14, 1.3e15, 58, 2000, 128), 31.9, (14.8, 69.3),
                    False).cells()
    assert cells == ["`dyt`", "1.28e+16", "+6.1e+16% [+2.8e+16, +1.3e+17]", "+3190.0% [+1480.0, +6930.0]", "no"]
    ordinary = Verdict("lp", 21.51, 0.024, Interval(0.018, 0.031, 58, 2000, 128), 0.005, (0.002, 0.008), False)
    assert ordinary.cells()[1:4] == ["21.51", "+2.4% [+1.8, +3.1]", "+0.5% [+0.2, +0.8]"]


def test_the_goal_over_training_seeds_pairs_each_seed_with_its_own_control(tmp_path):
    """Seeds 0-2 of a control and of three mitigations, and a mitigation's seed 3 whose control was never trained.
    Each seed's fp cost is against the control of the same seed (the controls differ by 0.2 nats, so pairing with
    another seed's control would be off by ~20%). A recipe's verdict over seeds is the mean, its half-width the seeds'
    (Student's t) and the text's (the mean of the seeds' own half-widths) in quadrature, by hand for `t:mit`: fp costs
    1%, 2%, 3% (constant shifts: their own bootstrap has no width) -> mean 2%, t(2) x 1 pt / sqrt(3) = 2.48 pts ->
    [-0.5, +4.5], over the +3% bar though each seed's point is at most +3%; static changes 0.4, 0.5, 0.6%, each +-0.1 ->
    sqrt(0.248^2 + 0.1^2) = 0.268 pts -> +0.5% [+0.2, +0.8]."""
    from qharness.report.goal import Goal, over_seeds, verdicts

    rng = np.random.default_rng(3)
    base = rng.gamma(2.0, 1.5, size=TOKENS)
    results = tmp_path / "seeds.csv"
    rows = []

    def model(name, recipe, seed, nll, static_change):
        fp_row = ppl_row(results, nll, nll)
        static = ppl_row(results, nll + np.log1p(static_change), nll, quant="int8-w8a8-tensor-static")
        for row in (fp_row, static):
            row.update(model=name, train_recipe=recipe, train_seed=str(seed), ci_of="rel_delta")
        static.update(ci_low=str(static_change - 0.001), ci_high=str(static_change + 0.001))
        write_units(results, key(fp_row), Units(nll, "nll", "kjv"))
        rows.extend([fp_row, static])

    def seeded(name, seed):
        return name + (f":seed={seed}" if seed else "")

    for seed in range(3):
        control = base + 0.2 * seed
        model(seeded("t:none", seed), "r-none", seed, control, 0.8)
        model(seeded("t:mit", seed), "r-mit", seed, control + np.log(1 + 0.01 * (seed + 1)), 0.004 + 0.001 * seed)
        # tight seeds: fp 1.0-1.2%, static 0.4-0.6% -> met; and the same fp with static 4.8-5.0% -> its upper end over
        model(seeded("t:good", seed), "r-good", seed, control + np.log(1.01 + 0.001 * seed), 0.004 + 0.001 * seed)
        model(seeded("t:over", seed), "r-over", seed, control + np.log(1.01 + 0.001 * seed), 0.048 + 0.001 * seed)
    model("t:mit:seed=3", "r-mit", 3, base, 0.004)
    # a snapshot of seed 1 (same recipe and seed, another step) and a pretrained model (no recipe, no seed)
    model("t:none:seed=1@step100", "r-none", 1, base + 0.5, 0.9)
    model("t:mit:seed=1@step100", "r-mit", 1, base + 0.5 + np.log(1.05), 0.01)
    model("pre", "", "", base - 0.1, 0.9)
    append_rows(results, rows)
    found = {v.model: v for v in verdicts(results, Goal(control="t:none"))}
    assert [m for m, v in found.items() if v.is_control] == [
        "t:none", "t:none:seed=1", "t:none:seed=1@step100", "t:none:seed=2"]
    for seed in range(3):
        assert found[seeded("t:mit", seed)].fp_cost == pytest.approx(0.01 * (seed + 1), abs=1e-9)
    assert found["t:mit:seed=1@step100"].fp_cost == pytest.approx(0.05)  # against the control's step 100
    assert found["pre"].fp_cost == pytest.approx(np.exp(-0.1) - 1)  # not trained here: against the named control
    assert found["t:mit:seed=3"].fp_cost is None and found["t:mit:seed=3"].met is None
    assert found["t:mit"].met is True and found["t:mit:seed=1"].met is True  # each seed alone meets the bar
    text = render(Table("goal", "seeds.csv", "goal", goal=Goal(control="t:none")), tmp_path)
    assert "| ? (no control of seed 3) |" in text
    assert "Left out of the verdict over seeds: `t:mit` (no control of seed 3)." in text
    assert "| `t:good` | 0, 1, 2 | +1.1% [+0.9, +1.3] | +0.5% [+0.2, +0.8] | yes |" in text
    # without seed 3 the recipe is averaged over its three controlled seeds; no group mixes steps
    without_3 = [v for v in found.values() if v.seed != "3"]
    by_recipe = {s.recipe: s for s in over_seeds(without_3, Goal(control="t:none"))[0]}
    assert sorted(by_recipe) == ["t:good", "t:mit", "t:none", "t:over"]
    assert by_recipe["t:mit"].fp_cost == pytest.approx((0.02, 0.02 - 4.303 * 0.01 / 3**0.5,
                                                        0.02 + 4.303 * 0.01 / 3**0.5), abs=1e-6)
    half = ((4.303 * 0.001 / 3**0.5) ** 2 + 0.001**2) ** 0.5
    assert by_recipe["t:mit"].scheme_change == pytest.approx((0.005, 0.005 - half, 0.005 + half))
    assert by_recipe["t:mit"].met is False and by_recipe["t:none"].met is None
    assert by_recipe["t:mit"].cells() == ["`t:mit`", "0, 1, 2", "+2.0% [-0.5, +4.5]", "+0.5% [+0.2, +0.8]", "no"]
    assert by_recipe["t:good"].met is True
    assert by_recipe["t:over"].scheme_change[0] < 0.05 < by_recipe["t:over"].scheme_change[2]
    assert by_recipe["t:over"].met is False  # its mean is under the bar, the interval's upper end is not
    append_rows(results, [{**rows[0], "model": "t:none:seed=0"}])  # a second row of the control's seed 0
    with pytest.raises(DataError, match="t:none and t:none:seed=0 are both the control's seed '0'"):
        verdicts(results, Goal(control="t:none"))


def test_a_grid_table_gives_each_models_change_under_each_pick(tmp_path):
    """Kind grid: a row per model in the leaderboard's order, a column per pick, each cell the row's own change and
    interval against that model's fp row; a pick a model lacks is an empty cell, not another model's number."""
    results = tmp_path / "grid.csv"
    rng = np.random.default_rng(2)
    rows = []
    fp_ppl = {}
    for model, changes in (("b-control", (0.8, 0.05)), ("a-mitigated", (0.2, None))):
        fp = rng.gamma(2.0, 1.5, size=TOKENS) + (0.5 if model == "a-mitigated" else 0.0)
        fp_ppl[model] = f"{np.exp(fp.mean()):.2f}"
        fp_row = ppl_row(results, fp, fp)
        fp_row["model"] = model
        rows.append(fp_row)
        for transform, change in zip(("", "rotate"), changes, strict=True):
            if change is None:
                continue
            row = ppl_row(results, fp + np.log1p(change), fp, quant="int8-w8a8-tensor-static")
            row.update(model=model, transform=transform, ci_of="rel_delta", ci_low=str(change - 0.01),
                       ci_high=str(change + 0.01))
            rows.append(row)
    append_rows(results, rows)
    grid = Table("grid", "grid.csv", "grid", rows=(Pick("int8-w8a8-tensor-static"),
                                                    Pick("int8-w8a8-tensor-static", transform="rotate")))
    table = [line for line in render(grid, tmp_path).splitlines() if line.startswith("|")]
    assert table[0] == ("| model | fp ppl | `int8-w8a8-tensor-static` | `int8-w8a8-tensor-static (transform rotate)` |")
    control, mitigated = table[2].split(" | "), table[3].split(" | ")
    assert control[0] == "| `b-control`" and mitigated[0] == "| `a-mitigated`"
    assert (control[1], mitigated[1]) == (fp_ppl["b-control"], fp_ppl["a-mitigated"])  # each its own fp
    assert control[2].endswith("[+79.0, +81.0]") and control[3].endswith("[+4.0, +6.0] |")
    assert mitigated[2].endswith("[+19.0, +21.0]") and mitigated[3] == " |"
    # `models` picks the rows and their order; a named model the leaderboard lacks is left out, not an empty row
    only = Table("grid", "grid.csv", "grid", rows=grid.rows, models=("a-mitigated", "not-run"))
    assert [line.split(" | ")[0] for line in render(only, tmp_path).splitlines()[2:] if line.startswith("| `")] == [
        "| `a-mitigated`"]


def test_a_matrix_table_sets_each_scheme_and_kv_setting_against_each_fix(tmp_path):
    """Kind matrix (the KV-fixes grid): a row per (scheme, KV cache), a column per fix; each cell is the row that has
    exactly that scheme, KV setting, transform and kept positions, never a neighbour's; a missing one is empty."""
    from qharness.report.publish import BOS

    results = tmp_path / "kv.csv"
    rng = np.random.default_rng(3)
    fp = rng.gamma(2.0, 1.5, size=TOKENS)
    rows = [ppl_row(results, fp, fp)]
    cells = {("", "", ""): 0.80, ("int4-token", "", ""): 0.90, ("", "rotate", ""): 0.10, ("", "rotate", BOS): 0.02,
             ("int4-token", "", BOS): 0.30}
    for (kv, transform, keep), change in cells.items():
        row = ppl_row(results, fp + np.log1p(change), fp, quant="int8-w8a8-tensor", kv=kv, transform=transform,
                      keep=keep)
        row.update(ci_of="rel_delta", ci_low=str(change - 0.01), ci_high=str(change + 0.01))
        rows.append(row)
    append_rows(results, rows)
    fixes = (("alone", Pick("")), ("keep BOS", Pick("", keep=BOS)), ("rotate", Pick("", transform="rotate")),
             ("rotate + keep BOS", Pick("", keep=BOS, transform="rotate")))
    matrix = Table("m", "kv.csv", "matrix", rows=(Pick("int8-w8a8-tensor"), Pick("int8-w8a8-tensor", kv="int4-token")),
                   columns=fixes)
    text = render(matrix, tmp_path)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| scheme | KV cache | alone | keep BOS | rotate | rotate + keep BOS |"
    assert table[2] == ("| `int8-w8a8-tensor` | fp | +80.0% [+79.0, +81.0] |  | +10.0% [+9.0, +11.0] | "
                        "+2.0% [+1.0, +3.0] |")
    assert table[3] == "| `int8-w8a8-tensor` | int4-token | +90.0% [+89.0, +91.0] | +30.0% [+29.0, +31.0] |  |  |"
    assert "5 of 8 cells computed" in " ".join(text.split())


def test_a_grid_table_can_show_scan_measures_and_the_fp_change_against_the_familys_base(tmp_path):
    """The zoo's mitigations table as a grid: per model its scan measures, fp perplexity, fp change against the base of
    its own family (llama's base for a llama, gpt2's for a gpt2: the two bases differ by 0.3 nats, so the wrong one
    is off by a third) and its schemes' changes."""
    results = tmp_path / "zoo.csv"
    rng = np.random.default_rng(4)
    rows = []
    bases = {"zoo:llama": rng.gamma(2.0, 1.5, size=TOKENS)}
    bases["zoo:gpt2"] = bases["zoo:llama"] + 0.3
    bases[""] = bases["zoo:llama"]  # a pretrained model: no family, no base
    for family, mitigation, shift, scan in (("", "none", 0.1, (700.0, 27.0, 0.5)),
                                            ("zoo:llama", "none", 0.0, (640.8, 26.0, 0.34)),
                                            ("zoo:llama", "kv_bias", np.log(1.036), (447.9, 22.0, 0.34)),
                                            ("zoo:gpt2", "none", 0.0, (279.6, 25.0, 0.41)),
                                            ("zoo:gpt2", "dyt", np.log(8.767), (56.7, 2.0, 0.0))):
        name = f"{family}-{'base' if mitigation == 'none' else mitigation}" if family else "pretrained"
        fp = bases[family] + shift
        common = {"model": name, "family": family, "mitigation": mitigation, "train_seed": "0"}
        fp_row = {**ppl_row(results, fp, fp), **common}
        write_units(results, key(fp_row), Units(fp, "nll", "kjv"))
        static = {**ppl_row(results, fp + 0.003, fp, quant="int8-w8a8-tensor-static"), **common,
                  "ci_of": "rel_delta", "ci_low": "0.001", "ci_high": "0.005"}
        scans = [{**fp_row, "task": "scan", "metric": metric, "value": str(value), "fp_value": str(value)}
                 for metric, value in zip(("massive_max", "massive_ratio", "bos_holds_max"), scan, strict=True)]
        rows += [fp_row, static, *scans]
    append_rows(results, rows)
    grid = Table("zoo", "zoo.csv", "grid", rows=(Pick("int8-w8a8-tensor-static"),),
                 scan=("massive_max", "massive_ratio", "bos_holds_max"), fp_vs_base=True)
    table = [line for line in render(grid, tmp_path).splitlines() if line.startswith("|")]
    assert table[0] == ("| model | max abs | max/median | BOS holds max | fp ppl | fp vs base [95%] | "
                        "`int8-w8a8-tensor-static` |")
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in table[2:]}
    assert cells["`zoo:llama-base`"][:5] == ["640.8", "26", "34%", f"{np.exp(bases['zoo:llama'].mean()):.2f}", "-"]
    assert cells["`zoo:gpt2-dyt`"][:3] == ["56.7", "2", "0%"]
    assert cells["`pretrained`"][3:5] == [f"{np.exp(bases[''].mean() + 0.1):.2f}", ""]  # no family: no base
    assert cells["`zoo:llama-kv_bias`"][4].startswith("+3.6% [+3.6, +3.6]")  # a constant shift: a zero-width interval
    assert cells["`zoo:gpt2-dyt`"][4].startswith("+776.7% [+776.7, +776.7]")  # against gpt2's base, not llama's
    assert cells["`zoo:llama-kv_bias`"][5] == "+0.3% [+0.1, +0.5] |"


def test_the_seeds_table_gives_each_recipes_spread_and_welchs_interval_between_them(tmp_path):
    """Two recipes with 3 training seeds each: mean and sd over seeds per row kind, and the difference of the recipes'
    mean fp perplexity with Welch's interval, by hand: a = (70, 71, 72), b = (69, 70.5, 71.5): diff -0.667,
    se = sqrt(1/3 + 1.5833/3) = 0.928, Welch dof = 3.72 -> t(3) = 3.182, half-width 2.953: within noise."""
    rows = []
    for recipe, mitigation, fps in (("r-base", "none", (70.0, 71.0, 72.0)), ("r-gate", "gated_attention",
                                                                            (69.0, 70.5, 71.5))):
        for seed, fp in enumerate(fps):
            common = {"model": f"zoo:{mitigation}:{seed}", "train_recipe": recipe, "train_seed": str(seed),
                      "mitigation": mitigation}
            rows += [{**curve_row(common["model"], "none", fp, fp, mitigation), **common},
                     {**curve_row(common["model"], "int8-w8a8-tensor", fp * 1.01, fp, mitigation), **common},
                     {**curve_row(common["model"], "nf4", fp * 1.02, fp, mitigation), **common}]
    no_value = {**rows[0], "quant": "none", "task": "scan", "metric": "first_massive_layer", "value": "",
                "fp_value": "", "rel_delta": ""}  # a scan row of a model without massive activations: no number
    append_rows(tmp_path / "seeds.csv", [*rows, no_value, {**no_value, "train_seed": "1"}])
    text = render(Table("seeds", "seeds.csv", "seeds", rows=(Pick("int8-w8a8-tensor"),)), tmp_path)
    table = [line for line in text.splitlines() if line.startswith("| r-")]
    assert len(table) == 4 and not any("nf4" in line for line in table)  # fp and the scheme named, per recipe
    assert "| r-base | none | none | kjv-heldout | ppl | all | 0, 1, 2 | 71 | 1 | 70 to 72 |" in text
    contrast = next(line for line in text.splitlines() if line.startswith("| kjv-heldout | gated_attention"))
    assert "| -0.67 | [-3.62, +2.29] | within noise |" in contrast


def scan_profile(intervals: bool):
    from qharness.activations.profile import InterventionResult, LayerProfile, Profile, ProfileSummary, TopHit

    layers = [LayerProfile(i, m, 1.0, m, 3.0, [TopHit(m, 0, 7, "<bos>")], float(m > 100), {}, {}, 0, 0.5)
              for i, m in enumerate((2.0, 900.0, 2500.0))]
    summary = ProfileSummary(2500.0, 2, 2500.0, 1, 1, [7], 1.0, 0.0, 7, 1.0, [], None,
                             sequence_max=[2400.0, 2500.0] if intervals else [])
    rows = [InterventionResult("original", 20.0, 1, [7], "kjv-heldout"),
            InterventionResult("mean", 20.2, 1, [7], "kjv-heldout")]
    if intervals:
        rows = [dataclasses.replace(rows[0], ci_low=18.0, ci_high=22.5, tokens=4094),
                dataclasses.replace(rows[1], change=0.01, ci_low=-0.002, ci_high=0.021, tokens=4094)]
    return Profile({"length": 32, "bos": True}, 2, layers, summary, model="tiny", intervention_table=rows)


def test_a_scan_table_prints_the_shipped_profile_with_its_intervals(tmp_path):
    import json

    folder = tmp_path / "scan" / "tiny"
    folder.mkdir(parents=True)
    (folder / "profile.json").write_text(json.dumps(scan_profile(True).to_json()))
    text = render(Table("s", "scan/tiny/profile.json", "scan", layers=(1, 2)), tmp_path)
    assert "```\nmodel: tiny" in text and text.endswith("```\n")
    assert "max |h| 2500.0 at layer 2 (each sequence's largest: 2400.0 to 2500.0)" in text
    assert "original ppl 20.00 [18.00, 22.50] (kjv-heldout, token-level, 4,094 tokens)" in text
    assert "mean     ppl 20.20, +1.0% [-0.2, +2.1] vs original" in text
    shown = [line.split()[0] for line in text.splitlines() if line[:1].isdigit()]
    assert shown == ["1", "2"]  # layer 0 left out, as asked
    with pytest.raises(DataError, match="no such published scan profile"):
        render(Table("s", "scan/none/profile.json", "scan"), tmp_path)


def test_a_profile_written_before_intervals_prints_its_perplexities_alone():
    from qharness.activations.profile import Profile
    from qharness.report.profile_text import format_scan

    old = scan_profile(False).to_json()
    for row in old["intervention_table"]:
        for name in ("change", "ci_low", "ci_high", "tokens"):
            del row[name]
    del old["summary"]["sequence_max"]
    text = format_scan(Profile.from_json(old))
    assert "mean     ppl 20.20 (kjv-heldout, token-level)" in text and "vs original" not in text
    assert "max |h| 2500.0 at layer 2;" in text


def test_a_max_every_sequence_shares_says_so():
    from qharness.report.profile_text import summary_lines

    profile = scan_profile(True)
    same = dataclasses.replace(profile, summary=dataclasses.replace(profile.summary, sequence_max=[2500.0] * 8))
    assert "max |h| 2500.0 at layer 2 (the same in each of the 8 sequences);" in summary_lines(same)[1]
