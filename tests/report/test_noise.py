"""compare with per-unit results: within-noise marks, tied best fixes, paired differences, evaluation sizes."""

import numpy as np
import pytest

from qharness.data.results import append_rows, key, make_row
from qharness.data.units import Units, write_units
from qharness.report.compare import compare

TOKENS = 4094


def text_nll(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).gamma(2.0, 1.5, size=TOKENS)


def ppl_row(results, nll, model="m", quant="int8-w8a8-tensor", keep="", transform="", limit="2", fp_nll=None,
            units_hash="kjv", **extra):
    """A perplexity row and its units file, as a run writes them (value and fp value from the NLLs)."""
    fp_nll = nll if fp_nll is None else fp_nll
    is_fp = quant == "none"
    row = make_row(float(np.exp(nll.mean())), float(np.exp(fp_nll.mean())), model=model, quant=quant,
                   backend="" if is_fp else "sim", keep=keep, transform=transform, task="kjv-heldout",
                   task_hash="h", metric="ppl", bos=True, context_length=2048, limit=limit, dtype="fp32",
                   device_type="cpu", higher_is_better=False, metric_kind="token-level", n=TOKENS, **extra)
    write_units(results, key(row), Units(nll, "nll", units_hash))
    return row


def noisy(base: np.ndarray, shift: float, sd: float, seed: int) -> np.ndarray:
    return base + shift + np.random.default_rng(seed).normal(0, sd, size=len(base))


def test_fixes_within_noise_are_tied_and_marked(tmp_path):
    results = tmp_path / "lb.csv"
    fp = text_nll()
    plain = noisy(fp, 0.30, 0.3, 1)
    rows = [ppl_row(results, fp, quant="none"),
            ppl_row(results, plain, fp_nll=fp),
            ppl_row(results, noisy(fp, 0.10, 0.3, 2), keep="pos:0", fp_nll=fp),  # a real fix
            ppl_row(results, noisy(fp, 0.101, 0.3, 3), transform="rotate", fp_nll=fp),  # as good: a tie
            ppl_row(results, noisy(plain, 0.0, 0.01, 4), transform="smoothquant:0.5", fp_nll=fp)]  # no better
    append_rows(results, rows)
    summary = compare(results, tmp_path / "out")
    (fix,) = summary["fixes"]["rows"]
    assert fix["evaluated"] == f"{TOKENS} tok, limit 2"
    assert {fix["best"], *fix["tied"]} == {"keep pos:0", "transform rotate"}  # never a winner inside the noise
    assert fix["within_noise_of_plain"] == ["transform smoothquant:0.5"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "tied: " in report and " ≈" in report
    # the degradation table says what each number was measured on and carries the row's interval when it has one
    assert f"| {TOKENS} tok, limit 2 |" in report
    pairs = summary["paired_differences"]
    verdicts = {(p["a"], p["b"]): p["verdict"] for p in pairs}
    assert ("int8-w8a8-tensor (keep pos:0)", "int8-w8a8-tensor (transform rotate)") not in verdicts  # two changes
    assert verdicts[("int8-w8a8-tensor", "int8-w8a8-tensor (transform smoothquant:0.5)")] == "within noise"
    assert verdicts[("int8-w8a8-tensor", "int8-w8a8-tensor (keep pos:0)")] == "int8-w8a8-tensor (keep pos:0) lower"
    (check,) = summary["causal_checks"]
    assert check["within_noise"] is False and check["difference"][1] < 0


def test_a_recovery_inside_the_noise_says_so(tmp_path):
    results = tmp_path / "lb.csv"
    fp = text_nll()
    plain = noisy(fp, 0.05, 0.3, 1)
    append_rows(results, [ppl_row(results, fp, quant="none"), ppl_row(results, plain, fp_nll=fp),
                          ppl_row(results, noisy(plain, 0.0, 0.05, 2), keep="pos:0", fp_nll=fp)])
    (check,) = compare(results, tmp_path / "out")["causal_checks"]
    assert check["within_noise"] is True
    assert "within noise" in (tmp_path / "out" / "report.md").read_text()


def test_rows_of_different_evaluation_settings_are_never_set_side_by_side(tmp_path):
    results = tmp_path / "lb.csv"
    whole, first = text_nll(), text_nll()[:2047]
    rows = []
    for nll, limit in ((whole, ""), (first, "1")):
        rows += [ppl_row(results, nll, quant="none", limit=limit),
                 ppl_row(results, nll + 0.3, fp_nll=nll, limit=limit),
                 ppl_row(results, nll + 0.1, fp_nll=nll, keep="pos:0", limit=limit)]
    append_rows(results, [{**r, "n": str(len(first) if r["limit"] else TOKENS)} for r in rows])
    summary = compare(results, tmp_path / "out")
    assert sorted(r["evaluated"] for r in summary["fixes"]["rows"]) == ["2047 tok, limit 1", f"{TOKENS} tok, all"]
    assert len(summary["causal_checks"]) == 2  # each kept row against the plain row of its own setting


def test_no_pairing_across_different_tokens_and_none_without_units(tmp_path):
    results = tmp_path / "lb.csv"
    fp = text_nll()
    rows = [ppl_row(results, fp, quant="none"), ppl_row(results, fp + 0.3, fp_nll=fp),
            ppl_row(results, fp + 0.1, fp_nll=fp, keep="pos:0", units_hash="another text")]
    append_rows(results, rows)
    summary = compare(results, tmp_path / "out")
    assert summary["paired_differences"] == [] and summary["causal_checks"][0]["difference"] is None
    for path in (results.parent / "lb.units").iterdir():
        path.unlink()
    summary = compare(results, tmp_path / "out")  # an old leaderboard: no units, no verdicts, same tables
    assert summary["fixes"]["rows"][0]["tied"] == [] and summary["causal_checks"][0]["within_noise"] is None


def test_mitigations_within_noise_of_their_control(tmp_path):
    results = tmp_path / "lb.csv"
    rows = []
    fp_control = text_nll(5)
    members = {"tune:m-none": (fp_control, 0.5), "tune:m-kv_bias": (noisy(fp_control, 0.0, 0.02, 6), 0.5),
               "tune:m-outlier_penalty": (noisy(fp_control, 0.05, 0.02, 7), 0.2)}
    for model, (fp, shift) in members.items():
        mitigation = model.rsplit("-", 1)[1]
        extra = {"family": "tune:m", "mitigation": mitigation}
        rows += [ppl_row(results, fp, model=model, quant="none", **extra),
                 ppl_row(results, noisy(fp, shift, 0.2, 8), model=model, fp_nll=fp, **extra)]
    append_rows(results, rows)
    table = compare(results, tmp_path / "out")["mitigations"]
    marks = {r["model"]: r["within_noise"] for r in table["rows"]}
    assert marks["tune:m-kv_bias"] == ["fp_vs_base", "int8-w8a8-tensor"]  # a mitigation that changed nothing
    assert marks["tune:m-outlier_penalty"] == []  # a real change on both
    assert table["evaluated"] == f"{TOKENS} tok, limit 2"


def test_seeds_of_one_recipe_are_grouped_with_mean_and_spread(tmp_path):
    from qharness.data.results import make_row

    results = tmp_path / "lb.csv"
    rows = []
    for seed, (fp, q) in enumerate([(20.0, 30.0), (22.0, 30.8), (21.0, 29.4)]):
        common = dict(model=f"runs/s{seed}/model", task="kjv-heldout", metric="ppl", bos=True, train_seed=seed,
                      train_recipe="abc", mitigation="none", higher_is_better=False)
        rows += [make_row(fp, fp, quant="none", **common), make_row(q, fp, quant="int8-w8a8-tensor", backend="sim",
                                                                   **common)]
        rows.append(make_row(1000.0 * (seed + 1), 1000.0 * (seed + 1), quant="none",
                             **{**common, "task": "scan", "metric": "massive_max"}))  # the scan's max |h|
    rows.append(make_row(50.0, 20.0, model="other", quant="int8-w8a8-tensor", task="kjv-heldout", metric="ppl",
                         train_seed=0, train_recipe="xyz"))  # one seed of another recipe: no group
    append_rows(results, rows)
    groups = {(g["quant"], g["metric"]): g for g in compare(results, tmp_path / "out")["seeds"]}
    assert set(groups) == {("none", "ppl"), ("none", "massive_max"), ("int8-w8a8-tensor", "ppl")}
    assert groups[("none", "massive_max")]["value_mean"] == 2000.0  # max |h| over seeds, from the scan rows
    fp, q = groups[("none", "ppl")], groups[("int8-w8a8-tensor", "ppl")]
    assert fp["seeds"] == [0, 1, 2] and fp["value_mean"] == 21.0 and fp["value_sd"] == 1.0
    assert q["rel_mean"] == pytest.approx(1.3 / 3) and q["rel_min"] == pytest.approx(0.4)
    assert q["rel_max"] == pytest.approx(0.5) and q["rel_sd"] == pytest.approx(np.std([0.5, 0.4, 0.4], ddof=1))
    assert "## Training seeds" in (tmp_path / "out" / "report.md").read_text()


def test_schemes_are_ranked_with_each_step_real_or_within_noise(tmp_path):
    results = tmp_path / "lb.csv"
    fp = text_nll()
    token = noisy(fp, 0.035, 0.3, 1)
    rows = [ppl_row(results, fp, quant="none"),
            ppl_row(results, token, quant="int8-w8a8-token", fp_nll=fp),
            ppl_row(results, noisy(token, 0.0, 0.01, 2), quant="llm-int8", fp_nll=fp),  # a tie with per token
            ppl_row(results, noisy(fp, 0.85, 0.3, 3), quant="int8-w8a8-tensor", fp_nll=fp)]
    append_rows(results, rows)
    ranked = compare(results, tmp_path / "out")["ranked_schemes"]
    steps = {(r["milder"], r["worse"]): r["verdict"] for r in ranked}
    assert len(steps) == 2 and "within noise" in steps.values() and "real" in steps.values()
    tie = next(pair for pair, verdict in steps.items() if verdict == "within noise")
    assert set(tie) == {"int8-w8a8-token", "llm-int8"}
    assert "## Schemes ranked" in (tmp_path / "out" / "report.md").read_text()
