"""Plant plausible bugs in a copy of the tree, one at a time, and report which the fast tests catch.

    python benchmarks/planted_bugs.py            # every bug: about 10 minutes on 2 cores
    python benchmarks/planted_bugs.py attn bos   # the bugs whose name contains any of the words

Each bug is a textual patch (the text must occur exactly once in the file, else the bug is reported stale and
the script fails: the code moved and the patch must follow it) and the tests that should catch it. The copy is
the working tree's tracked and untracked-but-not-ignored files, so uncommitted changes are measured too. The
chosen tests must pass on the unpatched copy first; then each bug is applied alone and its tests run with
`pytest -x`: caught when they fail. Exit status 0 only when every bug is caught. Not part of CI (minutes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    name: str  # short label for the table
    file: str  # path in the tree
    old: str  # text that must occur exactly once in `file`
    new: str  # what it becomes
    tests: tuple[str, ...]  # pytest paths or node ids expected to catch it


ZERO_SHOT = "tests/tasks/test_zeroshot.py::test_acc_and_acc_norm_match_hand_computed_picks"
BUGS = (
    # the four that no test caught on 5d7fa20 (issue 22)
    Bug("attn@0 reads key 1", "qharness/activations/scan.py",
        "attention[0, :, 1:, 0].mean()", "attention[0, :, 1:, 1].mean()", ("tests/activations/test_scan.py",)),
    Bug("attn@0 counts query 0", "qharness/activations/scan.py",
        "attention[0, :, 1:, 0].mean()", "attention[0, :, :, 0].mean()", ("tests/activations/test_scan.py",)),
    Bug("percentile observer: max over batches", "qharness/quant/sim.py",
        'ranges.max() if self.activations.observer == "minmax" else ranges.mean()', "ranges.max()",
        ("tests/quant/test_sim.py", "tests/quant/test_mixed_precision.py")),
    Bug("fp8-e4m3-w8a8-token: per-tensor activations", "qharness/quant/schemes.py",
        'activations=TensorQuant("fp8_e4m3", PerToken()),\n        description="FP8 E4M3, per-channel',
        'activations=TensorQuant("fp8_e4m3", PerTensor()),\n        description="FP8 E4M3, per-channel',
        ("tests/quant/test_schemes.py", "tests/quant/test_sim.py")),
    Bug("Spearman: ties at their lowest rank", "qharness/stats/rankstats.py",
        "ranks[order[k]] = (i + j) / 2", "ranks[order[k]] = i", ("tests/report/test_compare.py",)),
    # definitions and arithmetic
    Bug("int8-w8a8-token: per-tensor weights", "qharness/quant/schemes.py",
        'weights=TensorQuant("int8", PerChannel()),\n        activations=TensorQuant("int8", PerToken()),\n'
        '        description="INT8 weights per output channel',
        'weights=TensorQuant("int8", PerTensor()),\n        activations=TensorQuant("int8", PerToken()),\n'
        '        description="INT8 weights per output channel', ("tests/quant/test_schemes.py",)),
    Bug("per-token scales over the batch axis", "qharness/quant/sim.py",
        "        return (-1,)  # a weight row", "        return (0,)  # a weight row", ("tests/quant/test_sim.py",)),
    Bug("int8 scale amax/128", "qharness/quant/sim.py",
        "amax.to(xf.dtype)) / qmax)", "amax.to(xf.dtype)) / (qmax + 1))", ("tests/quant/test_sim.py",)),
    Bug("asymmetric zero point off by one", "qharness/quant/sim.py",
        "zero = qmin - torch.round(lo / scale)", "zero = qmin + 1 - torch.round(lo / scale)",
        ("tests/quant/test_sim.py",)),
    Bug("E4M3 saturates at 240 (the fnuz max)", "qharness/quant/sim.py",
        "    fmax = torch.finfo(dtype).max\n",
        "    fmax = 240.0 if dtype == torch.float8_e4m3fn else torch.finfo(dtype).max\n",
        ("tests/quant/test_sim.py", "tests/quant/test_sim_microscaling.py")),
    Bug("LLM.int8 keeps only positive outliers", "qharness/quant/sim.py",
        "        magnitude = x.abs()\n", "        magnitude = x\n",
        ("tests/quant/test_sim.py", "tests/quant/test_mixed_precision.py")),
    Bug("kept position off by one", "qharness/quant/sim.py",
        "            mask[positions] = True",
        "            mask[[p + 1 for p in positions if p + 1 < x.shape[-2]]] = True",
        ("tests/quant/test_mixed_precision.py",)),
    Bug("half-span divides instead of x * (1/s)", "qharness/quant/sim.py",
        "torch.round(xf * (1.0 / scale))", "torch.round(xf / scale)", ("tests/quant/test_torchao.py",)),
    # metrics
    Bug("perplexity: mean of per-window means", "qharness/tasks/perplexity.py",
        "math.exp(float(nll.sum()) / len(nll))",
        "math.exp(float(np.mean([nll[sum(len(w) - 1 for w in windows[:i]):][:len(windows[i]) - 1].mean() "
        "for i in range(len(windows))])))", ("tests/tasks/test_perplexity.py",)),
    Bug("perplexity: BOS dropped", "qharness/tasks/perplexity.py",
        "prefix = [] if bos_id is None else [bos_id]", "prefix = []", ("tests/tasks/test_perplexity.py",)),
    Bug("acc_norm reported from acc", "qharness/tasks/zeroshot.py",
        'value = results.get(f"{name},none")', 'value = results.get("acc,none")',
        (ZERO_SHOT,)),
    Bug("zero-shot: lm-eval's second space before a choice", "qharness/tasks/zeroshot.py",
        '        "target_delimiter": "",\n', "", (ZERO_SHOT,)),
    Bug("scan summary: BOS share counts position 1", "qharness/activations/scan.py",
        "bos_holds_max=sum(entry.position == 0 for", "bos_holds_max=sum(entry.position <= 1 for",
        ("tests/activations/test_scan.py",)),
    Bug("scan summary: shares over every layer", "qharness/activations/scan.py",
        "after = records[first_outlier:] if first_outlier is not None else records", "after = records",
        ("tests/activations/test_scan.py",)),
    # backends: replaced by the unquantized model, or running another grid under the scheme's name
    Bug("bnb LLM.int8: outlier columns kept in int8", "qharness/quant/backends/bnb.py",
        '"llm-int8-bnb": lambda linear, scheme: _int8_linear(linear, scheme.outlier_threshold or 0.0)',
        '"llm-int8-bnb": lambda linear, scheme: _int8_linear(linear, 0.0)', ("tests/quant/test_bnb.py",)),
    Bug("bnb: Linears left unquantized", "qharness/quant/backends/bnb.py",
        "    for name, linear in targets.items():\n        # in training mode",
        "    for name, linear in {}.items():\n        # in training mode", ("tests/quant/test_bnb.py",)),
    Bug("torchao: Linears left unquantized", "qharness/quant/backends/torchao.py",
        "filter_fn=lambda module, fqn: fqn in names", "filter_fn=lambda module, fqn: False",
        ("tests/quant/test_torchao.py",)),
    Bug("quanto: Linears left unquantized", "qharness/quant/backends/quanto.py",
        "activations=getattr(optimum.quanto, activations) if activations else None, include=list(targets))",
        "activations=getattr(optimum.quanto, activations) if activations else None, include=['none'])",
        ("tests/quant/test_quanto.py",)),
    Bug("torchao runs its amax/127.5 grid as int8-weight-channel", "qharness/quant/backends/torchao.py",
        '"int8-weight-channel-halfspan": (everywhere(), _int8_weight_only)',
        '"int8-weight-channel": (everywhere(), _int8_weight_only)',
        ("tests/quant/test_torchao.py::test_int8_under_sims_amax_over_127_is_not_what_torchao_computes",)),
    Bug("quanto: calibrated by its own Calibration pass", "qharness/quant/backends/quanto.py",
        "        _calibrate_as_sim(model, modules, context.calibration_batches(scheme.name))",
        "        import torch\n\n        with torch.inference_mode(), optimum.quanto.Calibration(momentum=0.0):\n"
        "            model(input_ids=torch.cat(context.calibration_batches(scheme.name)))",
        ("tests/quant/test_quanto.py",)),
    Bug("KV cache: not quantized at all", "qharness/quant/kv.py",
        "        return fake_quantize_kv(self.setting, query, key, value, mask)", "        return key, value, mask",
        ("tests/quant/test_kv.py",)),
    Bug("KV cache: values left in fp", "qharness/models/attention.py",
        "key, value, attention_mask = kv_quant(query, key, value, attention_mask)",
        "key, _, attention_mask = kv_quant(query, key, value, attention_mask)",
        ("tests/quant/test_kv.py::test_the_model_computes_with_exactly_the_quantized_cache[int8-token]",)),
    # the goal and grid tables, and the rotation of a mitigated model
    Bug("goal: the fp bar judged on the point estimate", "qharness/report/goal.py",
        "hi <= goal.scheme_bar and interval.high <= goal.fp_bar", "hi <= goal.scheme_bar and cost <= goal.fp_bar",
        ("tests/report/test_publish.py::test_the_goal_table_judges_each_bar_on_its_interval",)),
    Bug("goal: every seed against the seed-0 control", "qharness/report/goal.py",
        "control_fp = controls.get((seed, common[\"step\"]))", "control_fp = controls.get((\"0\", common[\"step\"]))",
        ("tests/report/test_publish.py::test_the_goal_over_training_seeds_pairs_each_seed_with_its_own_control",)),
    Bug("goal: a snapshot against the finished control", "qharness/report/goal.py",
        "    return stepped[1] if stepped else 0", "    return 0",
        ("tests/report/test_publish.py::test_the_goal_over_training_seeds_pairs_each_seed_with_its_own_control",)),
    Bug("goal over seeds: a z interval, not Student's t", "qharness/report/goal.py",
        "seeds = t975(len(values) - 1) *", "seeds = 1.96 *",
        ("tests/report/test_publish.py::test_the_goal_over_training_seeds_pairs_each_seed_with_its_own_control",)),
    Bug("goal over seeds: the text's noise left out", "qharness/report/goal.py",
        "half = (seeds**2 + text**2) ** 0.5", "half = seeds",
        ("tests/report/test_publish.py::test_the_goal_over_training_seeds_pairs_each_seed_with_its_own_control",)),
    Bug("grid: a cell from any model", "qharness/report/publish.py",
        "cells = {m: [board.find(pick, table, m) for pick in table.rows] for m in models}",
        "cells = {m: [board.find(pick, table, None if pick.transform else m) for pick in table.rows] for m in models}",
        ("tests/report/test_publish.py::test_a_grid_table_gives_each_models_change_under_each_pick",)),
    Bug("seeds: a record older than a setting gets a recipe of its own", "qharness/data/recipe.py",
        '        unseeded.setdefault("retrofit", "")', "        pass",
        ("tests/test_train_seed.py::test_a_record_written_before_a_setting_existed_shares_its_recipes_digest",)),
    Bug("grid: fp vs base from the first base of any family", "qharness/report/publish.py",
        '    bases = {r["model"] for r in board.rows if r.get("family") and r.get("family") == fp.get("family")',
        '    bases = {min(r["model"] for r in board.rows if r.get("mitigation") == "none")} or {r["model"] for r in '
        'board.rows if r.get("family") and r.get("family") == fp.get("family")',
        ("tests/report/test_publish.py::test_a_grid_table_can_show_scan_measures_and_the_fp_change_against_the_"
         "familys_base",)),
    Bug("rotate: kv_bias's v' left unturned", "qharness/quant/transforms/rotate.py",
        "        _set_(kv_bias.v, kv_bias.v.double() @ h)", "        pass",
        ("tests/quant/test_transforms.py::test_rotate_turns_a_mitigations_attention_parts_with_the_model",)),
    Bug("matrix: a cell from the scheme's fp-cache row", "qharness/report/publish.py",
        "return Pick(row.quant, keep=column.keep, kv=row.kv, transform=column.transform)",
        'return Pick(row.quant, keep=column.keep, kv="", transform=column.transform)',
        ("tests/report/test_publish.py::test_a_matrix_table_sets_each_scheme_and_kv_setting_against_each_fix",)),
    Bug("typed tables: one note covers the tables below it", "qharness/report/publish.py",
        'note = " ".join(lines[max(previous_end, header - NOTE_REACH):header]).lower()',
        'note = " ".join(lines[max(0, header - NOTE_REACH):header]).lower()',
        ("tests/report/test_publish.py::test_a_typed_table_must_say_it_is_not_generated",)),
    Bug("goal: a model without the scheme's row dropped unnamed", "qharness/report/publish.py",
        "    missing = unjudged(board.rows, board.path, table.goal, found)", "    missing = []",
        ("tests/report/test_publish.py::test_the_goal_table_judges_each_bar_on_its_interval",)),
    Bug("curves: a broken run drawn among the others", "qharness/report/curves.py",
        "    if all(flags):", "    if True:",
        ("tests/report/test_curves.py::"
         "test_a_run_far_worse_than_its_control_at_every_step_is_broken_and_left_out_of_the_change_plots",)),
    Bug("seeds: a call's time budget splits a recipe's seeds", "qharness/data/recipe.py",
        'if k not in ("seed", "budget_minutes")}}', 'if k != "seed"}}',
        ("tests/test_train_seed.py::test_a_record_written_before_a_setting_existed_shares_its_recipes_digest",)),
    Bug("intervention: the change's interval taken the wrong way round", "qharness/experiment/scanning.py",
        "rel_change_interval(original, units)", "rel_change_interval(units, original)",
        ("tests/experiment/test_scanning.py::test_the_interventions_intervals_in_closed_form",)),
    Bug("scan: each layer's largest entry kept instead of each sequence's", "qharness/activations/scan.py",
        "sequence_max=[max(r.stats[s].max for r in records) for s in range(len(records[0].stats))],",
        "sequence_max=[max(s.max for s in r.stats) for r in records],",
        ("tests/activations/test_scan.py::test_summary_shares_and_attention_on_position_0_by_hand",)),
)


def copy_tree(destination: Path) -> None:
    """The working tree as git sees it: tracked files and untracked ones that are not ignored."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def run_tests(tree: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    """(pytest's exit status, what failed or its summary line) for `tests` run from `tree`, fast tests only."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               COLUMNS="400")  # pytest cuts its summary lines to the terminal width
    env.pop("QHARNESS_REQUIRE", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                             "--tb=line", *tests], cwd=tree, env=env, capture_output=True, text=True)
    failed = re.search(r"^(?:FAILED|ERROR) \S+::(\S+)", result.stdout, re.MULTILINE)
    raised = re.search(r"^\S+:\d+: ([\w.]+)", result.stdout, re.MULTILINE)  # --tb=line: path:line: Exception
    if failed:  # which test, and whether an assertion or a crash
        return result.returncode, f"{failed.group(1)}: {raised.group(1) if raised else 'error'}"
    lines = [line for line in result.stdout.splitlines() if re.search(r"\b(passed|failed|error|no tests ran)\b", line)]
    return result.returncode, (lines[-1].strip("= ") if lines else result.stderr.strip()[-200:])


def stale(tree: Path, bug: Bug) -> str | None:
    path = tree / bug.file
    if not path.is_file():
        return f"{bug.file} does not exist"
    count = path.read_text(encoding="utf-8").count(bug.old)
    return None if count == 1 else f"the text to patch occurs {count} times in {bug.file}, not once"


def main(words: list[str]) -> int:
    bugs = [b for b in BUGS if not words or any(w.lower() in b.name.lower() for w in words)]
    with tempfile.TemporaryDirectory(prefix="planted-") as folder:
        tree = Path(folder)
        copy_tree(tree)
        problems = {b.name: reason for b in bugs if (reason := stale(tree, b))}
        for name, reason in problems.items():
            print(f"STALE: {name}: {reason}; update its patch in benchmarks/planted_bugs.py")
        if problems:
            return 2
        every_test = tuple(dict.fromkeys(t for b in bugs for t in b.tests))
        code, summary = run_tests(tree, every_test)
        if code != 0:
            print(f"the chosen tests fail without any bug ({summary}): fix them first")
            return 2
        print(f"unpatched: {summary}\n")
        rows = []
        for bug in bugs:
            path = tree / bug.file
            original = path.read_text(encoding="utf-8")
            path.write_text(original.replace(bug.old, bug.new), encoding="utf-8")
            start = time.monotonic()
            try:
                code, summary = run_tests(tree, bug.tests)
            finally:
                path.write_text(original, encoding="utf-8")
            verdict = "caught" if code == 1 else ("MISSED" if code == 0 else f"error (pytest exit {code})")
            rows.append((bug.name, verdict, summary, time.monotonic() - start))
            print(f"{bug.name}: {verdict} ({summary})", flush=True)
    print("\n| planted bug | fast tests | the first failure | s |\n|---|---|---|---|")
    for name, verdict, summary, seconds in rows:
        print(f"| {name} | {verdict} | {summary} | {seconds:.0f} |")
    caught = sum(verdict == "caught" for _, verdict, _, _ in rows)
    print(f"\n{caught} of {len(rows)} planted bugs caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
