"""Writes leaderboard.csv and report.md here with qharness as it was at ebb4a33 (before the arch / mitigation /
family columns and the one row builder): `git archive ebb4a33 qharness | tar -x -C /tmp/old` and then
`PYTHONPATH=/tmp/old python tests/data/legacy_leaderboard/make.py`. tests/test_compare.py checks that today's
`compare` reads that file and writes the same report.md."""

from __future__ import annotations

import tempfile
from pathlib import Path

from qharness.compare import compare
from qharness.results import KEY_COLUMNS, append_rows

HERE = Path(__file__).resolve().parent


def row(model: str, quant: str, value: float, fp: float, keep: str = "", task: str = "kjv-heldout",
        metric: str = "ppl", higher: str = "False") -> dict[str, str]:
    r = dict.fromkeys(KEY_COLUMNS, "")
    r.update(model=model, quant=quant, backend="" if quant == "none" else "sim", keep=keep, task=task,
             metric=metric, bos="True", value=repr(value), fp_value=repr(fp), delta=repr(value - fp),
             rel_delta=repr((value - fp) / fp), higher_is_better=higher, metric_kind="token-level")
    return r


def scan(model: str, metric: str, value: float) -> dict[str, str]:
    r = dict.fromkeys(KEY_COLUMNS, "")
    r.update(model=model, quant="none", task="scan", metric=metric, bos="True", value=repr(value),
             fp_value=repr(value), delta="0", rel_delta="0", metric_kind="activation")
    return r


def rows() -> list[dict[str, str]]:
    models = {"zoo:llama-base": (71.06, 640.8, 26.0, 0.34), "zoo:llama-kv_bias": (73.64, 447.9, 22.0, 0.34),
              "zoo:llama-tvr": (120.37, 10.4, 41.0, 0.75), "zoo:gpt2-base": (90.68, 279.6, 25.0, 0.41),
              "zoo:gpt2-dyt": (794.99, 56.7, 2.0, 0.0), "smollm2-135m": (23.09, 24926.2, 14191.0, 0.82)}
    out = []
    for i, (model, (fp, peak, ratio, bos)) in enumerate(models.items()):
        out += [scan(model, "massive_max", peak), scan(model, "massive_ratio", ratio),
                scan(model, "bos_holds_max", bos), row(model, "none", fp, fp)]
        for j, quant in enumerate(("int8-w8a8-tensor", "int8-w8a8-token", "fp8-e4m3-w8a8-tensor", "nf4")):
            out.append(row(model, quant, fp * (1 + 0.003 * (i + 1) * (j + 1)), fp))
        out.append(row(model, "int8-w8a8-tensor", fp * (1 + 0.001 * (i + 1)), fp, keep="pos:0"))
        out.append(row(model, "int8-w8a8-token", fp * 1.01, fp * 1.1, task="wordnet-heldout"))
    out.append(row("smollm2-135m", "int8-w8a8-tensor", 0.40, 0.52, task="wordnet-definition", metric="acc",
                   higher="True"))
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "leaderboard.csv"
        append_rows(results, rows())
        compare(results, Path(tmp) / "out")
        (HERE / "leaderboard.csv").write_text(results.read_text())
        (HERE / "report.md").write_text((Path(tmp) / "out" / "report.md").read_text())
