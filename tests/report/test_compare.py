import itertools

import pytest

from qharness.cli import main
from qharness.data.results import KEY_COLUMNS, append_rows
from qharness.report.compare import causal_checks, compare, degradations, model_families, spearman, with_model_columns


def row(model, quant, value, fp, keep="", task="t", metric="ppl", higher="False"):
    r = dict.fromkeys(KEY_COLUMNS, "")
    r.update(model=model, quant=quant, keep=keep, task=task, metric=metric, value=str(value), fp_value=str(fp),
             higher_is_better=higher, bos="True")
    return r


def scan_row(model, max_act):
    r = dict.fromkeys(KEY_COLUMNS, "")
    r.update(model=model, quant="none", task="scan", metric="massive_max", value=str(max_act), bos="True")
    return r


def brute_spearman(x, y):
    """Spearman for distinct values: 1 - 6 sum d^2 / (n (n^2 - 1))."""
    n = len(x)
    rx = {v: i for i, v in enumerate(sorted(x))}
    ry = {v: i for i, v in enumerate(sorted(y))}
    d2 = sum((rx[a] - ry[b]) ** 2 for a, b in zip(x, y, strict=True))
    return 1 - 6 * d2 / (n * (n * n - 1))


@pytest.mark.parametrize("perm", list(itertools.permutations([1.0, 5.0, 2.0, 9.0]))[:8])
def test_spearman_matches_the_textbook_formula(perm):
    x = [10.0, 20.0, 30.0, 40.0]
    assert spearman(x, list(perm)) == pytest.approx(brute_spearman(x, list(perm)))


def test_spearman_averages_ties():
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    # by hand: x ranks 0, 1.5, 1.5, 3 (the tie shares its mean rank), y ranks 0, 2, 1, 3; both centred on 1.5:
    # cov = 1.5 * 1.5 + 0 + 0 + 1.5 * 1.5 = 4.5, |x| = sqrt(4.5), |y| = sqrt(2.25 + 0.25 + 0.25 + 2.25) = sqrt(5),
    # rho = 4.5 / sqrt(22.5) = 3 / sqrt(10); ties at their lowest rank (0, 1, 1, 3) would give 4.5 / sqrt(23.75)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / 10**0.5, abs=1e-12)


def test_causal_check_reports_the_share_of_loss_recovered():
    rows = [row("m", "int8-w8a8-tensor", 30.0, 20.0), row("m", "int8-w8a8-tensor", 22.5, 20.0, keep="pos:0"),
            row("m", "int8", 21.0, 20.0)]
    (check,) = causal_checks(degradations(rows))
    assert check["recovered"] == pytest.approx(0.75)  # loss 10 -> 2.5
    acc = [row("m", "q", 0.4, 0.6, metric="acc", higher="True"),
           row("m", "q", 0.55, 0.6, keep="pos:0", metric="acc", higher="True")]
    assert causal_checks(degradations(acc))[0]["recovered"] == pytest.approx(0.75)


def test_a_causal_check_of_a_scheme_that_lost_nothing_says_so_instead_of_nan(tmp_path):
    results = tmp_path / "lb.csv"
    append_rows(results, [row("m", "int8-w8a8-token", 20.0, 20.0), row("m", "int8-w8a8-token", 20.0, 20.0,
                                                                       keep="pos:0")])
    (check,) = compare(results, tmp_path / "out")["causal_checks"]
    assert check["recovered"] is None
    report = (tmp_path / "out" / "report.md").read_text()
    assert "no loss to recover" in report and "nan" not in report


def test_kv_rows_are_schemes_of_their_own_and_quant_none_with_a_kv_cache_is_not_a_baseline():
    rows = [row("m", "none", 20.0, 20.0), row("m", "int8", 21.0, 20.0), row("m", "int8", 24.0, 20.0, keep="pos:0"),
            {**row("m", "none", 23.0, 20.0), "kv": "int4-token"}, {**row("m", "int8", 25.0, 20.0), "kv": "int4-token"}]
    assert sorted(d.label for d in degradations(rows)) == ["int8", "int8 (keep pos:0)", "int8 (kv int4-token)",
                                                           "none (kv int4-token)"]
    (check,) = causal_checks(degradations(rows))  # the kept run is set against plain int8, not int8 with the cache
    assert check["plain"] == 21.0


def test_compare_writes_report_html_and_plots(tmp_path):
    results = tmp_path / "lb.csv"
    rows = [scan_row(f"m{i}", 10.0 ** (i + 1)) for i in range(3)]
    rows += [row(f"m{i}", "int8-w8a8-tensor", 20.0 * (1 + 0.1 * (i + 1)), 20.0) for i in range(3)]
    rows += [row("m0", "int8-w8a8-tensor", 21.0, 20.0, keep="pos:0")]
    append_rows(results, rows)
    summary = compare(results, tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Causal check" in report and "| m0 | int8-w8a8-tensor | t | ppl | pos:0 |" in report
    (corr,) = [c for c in summary["correlations"] if c["measure"] == "massive_max"]
    assert corr["models"] == 3 and corr["spearman"] == pytest.approx(1.0)
    # a perfectly monotone relation stays one in every resample that has two distinct models: [+1, +1]
    assert (corr["low"], corr["high"]) == (pytest.approx(1.0), pytest.approx(1.0))
    assert "| int8-w8a8-tensor | t | ppl | massive_max | 3 | +1.00 | [+1.00, +1.00] |" in report
    page = (tmp_path / "out" / "report.html").read_text()
    # degradation, fixes (m0 kept BOS), causal check, correlation, predictors
    assert page.count("<table>") == 5 and "degradation_heatmap.png" in page
    assert "| m0 | t | int8-w8a8-tensor | +10.0% | +5.0% | keep pos:0 |" in report
    assert "| massive_ratio | 0 | 0 |  |  | too few points to conclude (n = 0, needs 8) |" in report
    assert "No model of a family" in report
    assert "Run `qharness run --layer-errors` to measure it." in report
    assert (tmp_path / "out" / "degradation_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "degradation_vs_activation.png").is_file()


def test_compare_cli_without_a_leaderboard_is_one_line(capsys, tmp_path):
    assert main(["compare", "--results", str(tmp_path / "none.csv"), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("qharness: error: leaderboard not found: ")


def test_layer_errors_from_a_run_reach_the_report(tiny_model_dir, tiny_task_dir, tmp_path):
    from qharness.experiment.runner import run
    from qharness.experiment.settings import RunSettings

    results = tmp_path / "lb.csv"
    run(RunSettings(model=str(tiny_model_dir), quants=("int8-w8a8-tensor",),
                    tasks=(str(tiny_task_dir / "short.yaml"),), results=results, layer_errors=True),
        say=lambda m: None, progress=False)
    (entry_file,) = (tmp_path / "layers").iterdir()
    entry_file.unlink()  # asking again later measures the layers without recomputing the rows
    again = run(RunSettings(model=str(tiny_model_dir), quants=("int8-w8a8-tensor",),
                            tasks=(str(tiny_task_dir / "short.yaml"),), results=results, layer_errors=True),
                say=lambda m: None, progress=False)
    assert again.computed == 0 and entry_file.is_file()
    summary = compare(results, tmp_path / "out")
    (layers,) = summary["layer_errors"]
    assert layers["quant"] == "int8-w8a8-tensor" and 0 < layers["worst_error"] < 1
    assert (tmp_path / "out" / "layer_error_vs_activation.png").is_file()
    assert "| int8-w8a8-tensor |" in (tmp_path / "out" / "report.md").read_text().split("## Per layer")[1]


def test_mitigation_table_sets_each_zoo_model_against_its_baseline(tmp_path):
    from qharness.report.compare import mitigation_table, profile_measures

    rows = [scan_row("zoo:llama-base", 190.0), scan_row("zoo:llama-dyt", 20.0), scan_row("smollm2-135m", 2e4)]
    rows += [row("zoo:llama-base", "int8-w8a8-tensor", 30.0, 20.0, task="kjv-heldout"),
             row("zoo:llama-dyt", "int8-w8a8-tensor", 22.5, 22.0, task="kjv-heldout"),
             row("zoo:llama-dyt", "int8-w8a8-tensor", 22.1, 22.0, keep="pos:0", task="kjv-heldout"),
             row("zoo:llama-dyt", "int8-w8a8-tensor", 99.0, 22.0, task="other"),
             row("smollm2-135m", "int8-w8a8-tensor", 54.0, 23.0, task="kjv-heldout")]
    # rows without the arch / mitigation / family columns: the zoo's names fill them in
    table = mitigation_table(profile_measures(rows), degradations(rows), model_families(with_model_columns(rows)))
    assert table["task"] == "kjv-heldout" and table["schemes"] == ["int8-w8a8-tensor"]
    base, dyt = table["rows"]  # zoo models only, the baseline first
    assert (base["model"], dyt["model"]) == ("zoo:llama-base", "zoo:llama-dyt")
    assert dyt["massive_max"] == 20.0 and dyt["fp_ppl"] == 22.0
    assert dyt["fp_vs_base"] == pytest.approx(0.10) and base["fp_vs_base"] == pytest.approx(0.0)
    assert dyt["int8-w8a8-tensor"] == pytest.approx(0.5 / 22.0) and base["int8-w8a8-tensor"] == pytest.approx(0.5)
    append_rows(tmp_path / "lb.csv", rows)
    compare(tmp_path / "lb.csv", tmp_path / "out")
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| zoo:llama-dyt | 20.0 |  | none |  |  | 22.00 | +10.0% | +2.3% |" in report


def test_mitigation_table_reads_families_from_the_columns_not_the_names(tmp_path):
    """A family named by its rows' columns (as a model continued with a mitigation would be) is grouped with its
    own baseline; a model of no family stays out, whatever its name looks like."""
    from qharness.report.compare import mitigation_table, profile_measures

    def member(model, mitigation, value, fp):
        return {**row(model, "int8-w8a8-tensor", value, fp, task="kjv-heldout"), "arch": "llama",
                "mitigation": mitigation, "family": "tune:smollm2-135m"}

    rows = [member("my-plain-run", "none", 40.0, 20.0), member("another-run", "kv_bias", 21.0, 20.0),
            {**row("zoo:llama-base", "int8-w8a8-tensor", 30.0, 20.0, task="kjv-heldout"), "arch": "llama",
             "mitigation": "none", "family": ""}]
    rows = with_model_columns(rows)
    table = mitigation_table(profile_measures(rows), degradations(rows), model_families(rows))
    assert [r["model"] for r in table["rows"]] == ["my-plain-run", "another-run"]
    assert table["rows"][1]["fp_vs_base"] == pytest.approx(0.0) and table["rows"][0]["int8-w8a8-tensor"] == 1.0


def test_a_tuned_family_shows_the_model_it_came_from_and_its_training_curve(tmp_path, monkeypatch):
    from qharness.models import sources

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 5, "max_abs": 900.0}\n{"step": 10, "max_abs": 90.0}\n')
    monkeypatch.setattr(sources, "related", lambda name: (("base",), log) if name.startswith("tune:") else ((), None))

    def member(model, mitigation, value, fp):
        return {**row(model, "int8-w8a8-tensor", value, fp, task="kjv-heldout"), "arch": "llama",
                "mitigation": mitigation, "family": "tune:base" if model.startswith("tune:") else ""}

    rows = [member("base", "none", 60.0, 20.0), member("tune:base-none", "none", 44.0, 22.0),
            member("tune:base-outlier_penalty", "outlier_penalty", 23.0, 22.0)]
    append_rows(tmp_path / "lb.csv", rows)
    summary = compare(tmp_path / "lb.csv", tmp_path / "out")
    assert [r["model"] for r in summary["mitigations"]["rows"]] == [
        "base (trained from)", "tune:base-none", "tune:base-outlier_penalty"]
    assert summary["mitigations"]["rows"][0]["fp_vs_base"] == pytest.approx(20.0 / 22.0 - 1)
    assert (tmp_path / "out" / "max_activation_in_training.png").read_bytes()[:4] == b"\x89PNG"


def test_a_leaderboard_from_before_the_model_columns_gives_the_same_report(tmp_path, monkeypatch):
    """tests/fixtures/legacy_leaderboard: a leaderboard and its report.md, both written by qharness at ebb4a33."""
    monkeypatch.setenv("QHARNESS_CACHE", str(tmp_path / "cache"))  # no trained zoo model adds a training plot
    import shutil
    from pathlib import Path

    from qharness.data.results import COLUMNS, read_rows

    legacy = Path(__file__).parents[1] / "fixtures" / "legacy_leaderboard"
    results = tmp_path / "leaderboard.csv"
    shutil.copy(legacy / "leaderboard.csv", results)
    assert "arch" not in results.read_text().splitlines()[0]
    rows = read_rows(results)
    assert all(set(COLUMNS) <= set(r) and r["arch"] == "" for r in rows)
    compare(results, tmp_path / "out")
    # Every section the old report had reads the same today, but for the mitigations table, which gained columns
    # (massive criterion, attention on position 0) and a heading for tune: models: its numbers are the same.
    old, new = _sections((legacy / "report.md").read_text()), _sections((tmp_path / "out" / "report.md").read_text())
    mitigations = "Mitigations: activations, quality and quantizability"
    correlation = "Rank correlation: massive activations vs degradation across models"
    for heading, body in old.items():
        if heading.startswith(mitigations) or heading == correlation:
            continue
        assert new[heading] == body, heading
    # the per-scheme correlations gained an interval column (and a sentence saying what it is): every old row is the
    # new row without its last cell
    old_rows = [line for line in old[correlation].splitlines() if line.startswith("| ")]
    new_rows = [line.rsplit(" |", 2)[0] + " |" for line in new[correlation].splitlines() if line.startswith("| ")]
    assert old_rows == new_rows and "95% interval |" in new[correlation]
    (old_table,) = [body for heading, body in old.items() if heading.startswith(mitigations)]
    (new_table,) = [body for heading, body in new.items() if heading.startswith(mitigations)]
    assert _cells(old_table) <= _cells(new_table)
    append_rows(results, [row("new", "int8", 2.0, 1.0)])  # the old rows survive a write in the new layout
    assert len(read_rows(results)) == len(rows) + 1 and "arch" in results.read_text().splitlines()[0]


@pytest.mark.skipif(not __import__("shutil").which("chromium"), reason="needs chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    import subprocess

    results = tmp_path / "lb.csv"
    append_rows(results, [scan_row(f"m{i}", 10.0 ** (i + 1)) for i in range(3)]
                + [row(f"m{i}", "int8-w8a8-tensor", 20.0 * (1 + 0.1 * (i + 1)), 20.0) for i in range(3)])
    compare(results, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").as_uri()
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu"]
    dom = subprocess.run([*common, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<table>") == 3 and "Degradation per scheme" in dom  # degradation, correlation, predictors
    shot = tmp_path / "page.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1000,1400", page], capture_output=True,
                   timeout=120, check=True)
    from PIL import Image

    pixels = Image.open(shot).convert("L")
    assert pixels.getextrema()[0] < 100  # dark text and plot ink, not a blank page


def _sections(markdown: str) -> dict[str, str]:
    return {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in markdown.split("\n## ")[1:]}


def _cells(section: str) -> set[str]:
    return {cell.strip() for line in section.splitlines() if line.startswith("| ") for cell in line.split("|")}


def test_fixes_set_keep_transform_and_trained_mitigations_side_by_side():
    from qharness.report.degradation import number, percent
    from qharness.report.fixes import fixes_table

    def member(model, quant, value, fp, mitigation, **extra):
        return {**row(model, quant, value, fp, task="kjv-heldout"), "mitigation": mitigation,
                "family": "tune:base" if model.startswith("tune:") else "", **extra}

    rows = [member("base", "int8-w8a8-tensor", 40.0, 20.0, "none"),  # +100%
            member("base", "int8-w8a8-tensor", 24.0, 20.0, "none", keep="pos:0"),  # +20%
            member("base", "int8-w8a8-tensor", 30.0, 20.0, "none", transform="smoothquant"),  # +50%
            member("base", "int8-w8a8-tensor", 21.0, 20.0, "none", kv="int4-token"),  # another scheme: not a fix
            member("tune:base-none", "int8-w8a8-tensor", 33.0, 22.0, "none"),  # +50%
            member("tune:base-kv_bias", "int8-w8a8-tensor", 23.1, 22.0, "kv_bias"),  # +5%
            member("tune:base-dyt", "int8-w8a8-tensor", 30.3, 30.0, "dyt"),  # +1%, but its fp is 36% worse
            member("other", "int8-w8a8-tensor", 30.0, 20.0, "none")]  # no fix: not in the table
    families = {"tune:base-none": ("tune:base", "none"), "tune:base-kv_bias": ("tune:base", "kv_bias"),
                "tune:base-dyt": ("tune:base", "dyt"), "base": ("tune:base", "reference")}
    table = fixes_table(degradations(rows), families)
    assert table["columns"] == ["plain", "keep pos:0", "transform smoothquant", "trained: none", "trained: dyt",
                                "trained: kv_bias"]
    (only,) = table["rows"]
    assert only["model"] == "base" and only["best"] == "trained: kv_bias" and only["costly"] == ["trained: dyt"]
    assert only["cells"] == pytest.approx({"plain": 1.0, "keep pos:0": 0.2, "transform smoothquant": 0.5,
                                           "trained: none": 0.5, "trained: kv_bias": 0.05, "trained: dyt": 0.01})
    assert percent(0.123) == "+12.3%" and percent(5.6e33) == "+5.6e+35%" and number(5.6e35) == "5.6e+35"


def test_a_broken_models_change_keeps_its_interval():
    from qharness.report.degradation import percent_interval

    assert percent_interval(0.035, (0.028, 0.042)) == "+3.5% [+2.8, +4.2]"
    assert percent_interval(289.65, (262.1, 318.4)) == "+2.9e+04% [+2.6e+04, +3.2e+04]"  # W4A4 once dropped it
    assert percent_interval(289.65, None) == "+2.9e+04%"


def test_predictors_pool_every_model_and_scheme_with_an_interval():
    from qharness.report.degradation import Degradation
    from qharness.report.predictors import error_growth, predictor_points, predictors
    from qharness.stats.rankstats import bootstrap_interval

    assert error_growth([{"layer": 0, "rel_error": 0.01}, {"layer": 2, "rel_error": 0.04},
                         {"layer": 1, "rel_error": 0.5}]) == pytest.approx(2.0)  # (0.04 / 0.01) ** (1 / 2)
    assert error_growth([{"layer": 0, "rel_error": 0.0}, {"layer": 1, "rel_error": 0.1}]) is None
    models = [f"m{i}" for i in range(6)]
    measures = {m: {"massive_ratio": 10.0 ** i, "max_kurtosis": float(i % 2)} for i, m in enumerate(models)}
    items = [Degradation(m, q, "sim", "", "t", "ppl", 20.0 * (1 + 0.1 * i * s), 20.0, False)
             for i, m in enumerate(models) for s, q in ((1, "a"), (2, "b"))]
    items.append(Degradation("m0", "a", "sim", "pos:0", "t", "ppl", 99.0, 20.0, False))  # a fix: not a point
    layers = [{"model": m, "quant": "a", "layers": [{"layer": 0, "rel_error": 0.1}, {"layer": 1, "rel_error": 0.1}]}
              for m in models[:3]]
    points = predictor_points(items, measures, layers)
    assert len(points) == 12
    by = {r["measure"]: r for r in predictors(points, resamples=500)}
    ratio = by["massive_ratio"]
    assert ratio["n"] == 12 and ratio["models"] == 6 and ratio["spearman"] > 0.5
    assert ratio["low"] <= ratio["spearman"] <= ratio["high"] and ratio["verdict"].startswith("predicts it")
    assert by["error_growth"]["n"] == 3 and by["error_growth"]["verdict"].startswith("too few points")
    assert bootstrap_interval([1, 2, 3, 4], [1, 2, 3, 4], resamples=50) == pytest.approx((1.0, 1.0))
    low, high = bootstrap_interval(list(range(30)), [(7 * i) % 30 for i in range(30)], resamples=300)
    assert low < 0 < high  # unrelated: the interval spans 0


def test_a_measure_that_does_not_vary_has_no_rho_and_says_why():
    """One model under ten schemes: its massive ratio is one value, so there are no ranks to correlate (nan)."""
    from qharness.report.degradation import Degradation
    from qharness.report.predictors import predictor_points, predictors, predictors_markdown

    items = [Degradation("m", f"q{i}", "sim", "", "t", "ppl", 20.0 + i, 20.0, False) for i in range(10)]
    points = predictor_points(items, {"m": {"massive_ratio": 1e4, "max_kurtosis": 30.0}}, [])
    ratio = {r["measure"]: r for r in predictors(points, resamples=50)}["massive_ratio"]
    assert ratio["n"] == 10 and ratio["spearman"] is None and ratio["low"] is None
    assert ratio["verdict"] == "the measure or the loss does not vary over these 10 points (one model: a per-model " \
                               "measure is one value)"
    table = "\n".join(predictors_markdown(predictors(points, resamples=50), lambda head, rows: repr(rows)))
    assert "nan" not in table
