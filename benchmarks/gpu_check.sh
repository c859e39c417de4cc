#!/usr/bin/env bash
# The GPU paths, checked in one go when a CUDA machine is lent (none of them has run on a GPU before this script).
#
#   bash benchmarks/gpu_check.sh                       # tests + a short real-model pass of every path, <= 8 minutes
#   bash benchmarks/gpu_check.sh --install             # first: pip install -c constraints.txt -e .[...] (see below)
#   bash benchmarks/gpu_check.sh --model path/to/folder --out /tmp/gpu   # a local model folder; where results go
#   bash benchmarks/gpu_check.sh --cpu-tests           # also the backend test files' CPU tests, time permitting
#   bash benchmarks/gpu_check.sh --dry-run             # print the plan, run nothing
#
# 1. `pytest -m gpu` (every test that needs CUDA, on tiny models: each backend against sim, the refusals, the KV
#    cache under eager and SDPA in fp32/bf16/fp16 and inside bnb/torchao models, transforms on the GPU, bf16
#    training with accumulation and its resume, every retrofit);
# 2. benchmarks/gpu_runs.py: one process, ~35 short `qharness run --device cuda --limit 2` / `qharness train --from`
#    calls through the CLI: each library backend and scheme, MXFP8/MXFP4/NVFP4 (refused below compute capability
#    10.0, sim under auto), the g128 W4A8/W4A4 schemes, --kv alone and with bnb/torchao, --transform rotate and
#    smoothquant with each backend, fp16, continued training of every retrofit in bf16 with accumulation and the
#    trained model evaluated with a quantized cache; a table of each run's status (ok, refused with its one-line
#    reason, failed, skipped), what ran it (backend/device/dtype, read from the leaderboard row), value and change.
#    Without the real model (device machines have no network and the carried tree has no weights) a tiny random
#    Llama stands in: every path runs, the values mean nothing, and the table says so.
# 3. with --cpu-tests, the backend test files' CPU tests, if the budget has room left.
# GPU time: probe ~15 s, step 1 <= 230 s, step 2 until the budget (GPU_CHECK_BUDGET, default 480 s) minus one run's
# cap; nothing starts past it, and whatever did not fit is listed as skipped (the runs are ordered new paths first).
# It installs nothing unless --install is given, and then only this package and its extras under constraints.txt
# (torch==2.13.0 matches the machine's CUDA build 2.13.0+cuXXX, so pip keeps it; it needs the package index).
set -uo pipefail

cd "$(dirname "$0")/.."
MODEL=smollm2-135m
OUT_DIR=${OUT_DIR:-${OUT:-$(mktemp -d /tmp/qharness-gpu-check.XXXXXX)}}
BUDGET=${GPU_CHECK_BUDGET:-480}
RUN_CAP=90  # one run's limit inside gpu_runs.py (RUN_SECONDS)
INSTALL=0
DRY_RUN=0
CPU_TESTS=0
while [ $# -gt 0 ]; do
    case "$1" in
        --install) INSTALL=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --cpu-tests) CPU_TESTS=1 ;;
        --model) MODEL=$2; shift ;;
        --out) OUT_DIR=$2; shift ;;
        *) echo "gpu_check.sh: unknown argument '$1'; known: --install --dry-run --cpu-tests --model NAME --out DIR" >&2
           exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DRY_RUN" = 1 ]; then
    echo "would run: python -m pytest -m gpu tests --ignore=tests/quant/test_quanto.py (timeout 170 s)"
    echo "would run: python -m pytest -m gpu tests/quant/test_quanto.py (timeout 60 s)"
    python benchmarks/gpu_runs.py --out "$OUT_DIR" --model "$MODEL" --dry-run
    [ "$CPU_TESTS" = 1 ] && echo "would run: python -m pytest -m 'not gpu and not slow' tests/quant (if time is left)"
    exit 0
fi

if [ "$INSTALL" = 1 ]; then
    python -m pip install -q -c constraints.txt -e ".[bnb,torchao,quanto,gptq,test]" || exit 2
fi

START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }

timeout 60 python - <<'EOF' || exit 2
import importlib, importlib.util, shutil, sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA GPU visible (torch %s); run it on a GPU machine" % torch.__version__)
major, minor = torch.cuda.get_device_capability(0)
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), f"sm {major}.{minor}")
if (major, minor) < (10, 0):
    print("  below 10.0: torchao's MXFP8/MXFP4/NVFP4 W4A4 kernels are refused (sim runs them under auto)")
for package in ("bitsandbytes", "torchao", "optimum.quanto", "gptqmodel", "transformers", "accelerate"):
    try:
        found = importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:
        found = False
    version = importlib.import_module(package.split(".")[0]).__version__ if found else "MISSING"
    print(f"{package:15} {version}")
print("nvcc", shutil.which("nvcc") or "not found (quanto fp8 on CUDA will be refused)")
EOF

echo "== 1. pytest -m gpu ($(left) s left)"
# quanto's last: with nvcc present its fp8 test builds the Marlin kernel at first use (minutes, maybe), which must
# not eat the time of every test after it
timeout 170 python -m pytest -m gpu tests --ignore=tests/quant/test_quanto.py -q -rfEs -p no:cacheprovider \
    > "$OUT_DIR/pytest-gpu.txt" 2>&1
GPU_TESTS=$?
tail -40 "$OUT_DIR/pytest-gpu.txt"
[ "$GPU_TESTS" = 124 ] && echo "pytest -m gpu: timed out after 170 s (the tests after that point did not run)"
timeout 60 python -m pytest -m gpu tests/quant/test_quanto.py -q -rfEs -p no:cacheprovider \
    > "$OUT_DIR/pytest-gpu-quanto.txt" 2>&1
QUANTO_TESTS=$?
tail -8 "$OUT_DIR/pytest-gpu-quanto.txt"
[ "$QUANTO_TESTS" = 124 ] && echo "pytest -m gpu (quanto): timed out after 60 s, most likely building Marlin"
[ "$QUANTO_TESTS" != 0 ] && [ "$GPU_TESTS" = 0 ] && GPU_TESTS=$QUANTO_TESTS

RUNS_HARD=$(( $(left) - 15 ))
RUNS_SOFT=$(( RUNS_HARD - RUN_CAP ))
[ "$RUNS_SOFT" -lt 30 ] && RUNS_SOFT=30
echo "== 2. the real-model pass, $MODEL on CUDA (new runs start until ${RUNS_SOFT} s from now)"
timeout "$RUNS_HARD" python benchmarks/gpu_runs.py --out "$OUT_DIR" --model "$MODEL" --budget "$RUNS_SOFT" \
    2> "$OUT_DIR/runs-progress.txt" | tee "$OUT_DIR/runs-summary.txt"
RUNS=${PIPESTATUS[0]}
if [ "$RUNS" = 124 ]; then
    echo "gpu_runs.py: killed at the budget; the runs that finished:"
    grep -E ': (ok|refused|failed)' "$OUT_DIR/runs-progress.txt"
fi

QUANT_TESTS=skipped
if [ "$CPU_TESTS" = 1 ]; then
    if [ "$(left)" -ge 90 ]; then
        echo "== 3. the backend test files on CPU ($(left) s left)"
        timeout $(( $(left) - 10 )) python -m pytest -m "not gpu and not slow" tests/quant -q -p no:cacheprovider 2>&1 \
            | tail -15 | tee "$OUT_DIR/pytest-quant.txt"
        QUANT_TESTS="exit ${PIPESTATUS[0]}"
    else
        echo "== 3. skipped: $(left) s left of the ${BUDGET} s budget"
    fi
fi

echo "pytest -m gpu: exit $GPU_TESTS; real-model pass: exit $RUNS; CPU tests: $QUANT_TESTS; $((SECONDS - START)) s" \
     "in all; results in $OUT_DIR"
[ "$GPU_TESTS" = 0 ] && [ "$RUNS" = 0 ]
