#!/usr/bin/env bash
# The GPU paths, checked in one go when a CUDA machine is lent (first run on an H200 on 2026-12-04: benchmarks/README.md).
#
#   bash benchmarks/gpu_check.sh                       # tests + a short real-model pass of every path, <= 8 minutes
#   bash benchmarks/gpu_check.sh --install             # first: pip install -c constraints.txt -e .[...] (see below)
#   bash benchmarks/gpu_check.sh --model path/to/folder --out /tmp/gpu   # a local model folder; where results go
#   bash benchmarks/gpu_check.sh --cpu-tests           # also the backend test files' CPU tests, time permitting
#   bash benchmarks/gpu_check.sh --dry-run             # run the probe here and print the plan (no GPU needed)
#
# 0. benchmarks/gpu_probe.py: the GPU and every library's version, read from package metadata (never an import that
#    can fail); no GPU: exit 2, nothing else runs. Each later step runs whatever the one before did, and the summary
#    lists every step's status and what failed.
# 1. `pytest -m gpu` (every test that needs CUDA, on tiny models: each backend against sim, the refusals, the KV
#    cache under eager and SDPA in fp32/bf16/fp16 and inside bnb/torchao models, transforms on the GPU, bf16
#    training with accumulation and its resume, every retrofit);
# 2. benchmarks/kernel_agreement.py: each kernel's distance from sim beside the dtype's gap and the scheme's effect;
# 2b. benchmarks/train_speed.py --tune400: continued training's throughput and peak memory in bf16 (issue #20);
# 3. benchmarks/gpu_runs.py: one process, ~35 short `qharness run --device cuda --limit 2` / `qharness train --from`
#    calls through the CLI: each library backend and scheme, MXFP8/MXFP4/NVFP4 (refused below compute capability
#    10.0, sim under auto), the g128 W4A8/W4A4 schemes, --kv alone and with bnb/torchao, --transform rotate and
#    smoothquant with each backend, fp16, continued training of every retrofit in bf16 with accumulation and the
#    trained model evaluated with a quantized cache; a table of each run's status (ok, refused with its one-line
#    reason, failed, skipped), what ran it (backend/device/dtype, read from the leaderboard row), value and change.
#    Without the real model (device machines have no network and the carried tree has no weights) a tiny random
#    Llama stands in: every path runs, the values mean nothing, and the table says so.
# 4. kernels compiled at first use (quanto's Marlin fp8), if at least 150 s of the budget is left;
# 5. with --cpu-tests, the backend test files' CPU tests, if the budget has room left.
# GPU time: probe ~15 s, step 1 <= 200 s (50 s on an H200), step 2 <= 120 s, step 3 until the budget
# (GPU_CHECK_BUDGET, default 480 s) minus one run's cap; nothing starts past it, and whatever did not fit is listed as
# skipped (the runs are ordered new paths first).
# On a machine without network (a lent GPU), carry wheels for its Python instead of --install: README, "On a GPU".
# PYTHON names the interpreter that has torch (default python3).
# It installs nothing unless --install is given, and then only this package and its extras under constraints.txt
# (torch==2.13.0 matches the machine's CUDA build 2.13.0+cuXXX, so pip keeps it; it needs the package index).
set -uo pipefail
PY=${PYTHON:-python3}  # the interpreter that has torch (a device image may have no `python`)

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

STEPS=()     # "name: status" lines for the summary
FAILED=()
record() {  # record NAME EXIT_CODE [TIMEOUT_SECONDS]
    local status="ok"
    if [ "$2" = 124 ]; then status="timed out after ${3:-?} s"; elif [ "$2" != 0 ]; then status="failed (exit $2)"; fi
    STEPS+=("$1: $status")
    [ "$status" = ok ] || FAILED+=("$1")
}

if [ "$DRY_RUN" = 1 ]; then
    echo "== 0. the probe, run here (no GPU needed for a dry run)"
    timeout 60 "$PY" benchmarks/gpu_probe.py --no-cuda-ok || echo "the probe itself failed: fix it before a GPU run"
    echo "would run: $PY -m pytest -m gpu tests (timeout 200 s)"
    echo "would run: $PY benchmarks/kernel_agreement.py (timeout 120 s)"
    echo "would run: $PY benchmarks/train_speed.py --tune400 --precision bf16 --random-weights --steps 40 (timeout 90 s)"
    "$PY" benchmarks/gpu_runs.py --out "$OUT_DIR" --model "$MODEL" --dry-run
    echo "would run: QHARNESS_KERNEL_BUILDS=1 $PY -m pytest -m gpu tests/quant/test_cuda_agreement.py -k quanto-fp8"
    [ "$CPU_TESTS" = 1 ] && echo "would run: $PY -m pytest -m 'not gpu and not slow' tests/quant (if time is left)"
    exit 0
fi

if [ "$INSTALL" = 1 ]; then
    "$PY" -m pip install -q -c constraints.txt -e ".[bnb,torchao,quanto,gptq,test]" || exit 2
fi

START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }

echo "== 0. the machine"
timeout 60 "$PY" benchmarks/gpu_probe.py > "$OUT_DIR/probe.txt" 2>&1
PROBE=$?
cat "$OUT_DIR/probe.txt"
if [ "$PROBE" = 2 ]; then
    echo "gpu_check.sh: no CUDA device: nothing here can run (use --dry-run to check the script on a CPU)"
    exit 2
fi
record "probe" "$PROBE" 60

# each step runs whatever the one before did; the summary lists what failed
echo "== 1. pytest -m gpu ($(left) s left)"
# kernels compiled at first use (quanto's Marlin fp8: over 90 s on an H200) are skipped here, and built last
timeout 200 "$PY" -m pytest -m gpu tests -q -rfEs -p no:cacheprovider > "$OUT_DIR/pytest-gpu.txt" 2>&1
record "pytest -m gpu" $? 200
grep -E "^(FAILED|ERROR|XFAIL)|passed|failed" "$OUT_DIR/pytest-gpu.txt" | tail -30

echo "== 2. every kernel against sim, the numbers behind step 1's tolerances ($(left) s left)"
timeout 120 "$PY" benchmarks/kernel_agreement.py > "$OUT_DIR/kernel-agreement.txt" 2>&1
record "kernel agreement table" $? 120
grep -vE "^(W[0-9]{4}|Failed to load)" "$OUT_DIR/kernel-agreement.txt"

echo "== 2b. continued training at the tune400 recipe in bf16: tokens/s, peak memory, the 400-step table ($(left) s left)"
timeout 90 "$PY" benchmarks/train_speed.py --tune400 --precision bf16 --random-weights --steps 40 \
    > "$OUT_DIR/train-throughput.txt" 2>&1
record "tune400 training throughput" $? 90
grep -vE "^(W[0-9]{4}|Failed to load)" "$OUT_DIR/train-throughput.txt" | tail -3

RUNS_HARD=$(( $(left) - 15 ))
RUNS_SOFT=$(( RUNS_HARD - RUN_CAP ))
[ "$RUNS_SOFT" -lt 30 ] && RUNS_SOFT=30
[ "$RUNS_HARD" -lt 45 ] && RUNS_HARD=45
echo "== 3. the real-model pass, $MODEL on CUDA (new runs start until ${RUNS_SOFT} s from now)"
timeout "$RUNS_HARD" "$PY" benchmarks/gpu_runs.py --out "$OUT_DIR" --model "$MODEL" --budget "$RUNS_SOFT" \
    2> "$OUT_DIR/runs-progress.txt" | tee "$OUT_DIR/runs-summary.txt"
RUNS=${PIPESTATUS[0]}
record "real-model pass" "$RUNS" "$RUNS_HARD"
if [ "$RUNS" = 124 ]; then
    echo "gpu_runs.py: killed at the budget; the runs that finished:"
    grep -E ': (ok|refused|failed)' "$OUT_DIR/runs-progress.txt"
fi

if [ "$(left)" -ge 150 ]; then
    echo "== 4. kernels compiled at first use ($(left) s left)"
    QHARNESS_KERNEL_BUILDS=1 timeout 140 "$PY" -m pytest -m gpu tests/quant/test_cuda_agreement.py -k quanto-fp8 -q \
        -rfEs -p no:cacheprovider > "$OUT_DIR/pytest-gpu-builds.txt" 2>&1
    record "kernel builds (quanto fp8)" $? 140
    tail -4 "$OUT_DIR/pytest-gpu-builds.txt"
else
    STEPS+=("kernel builds: skipped, $(left) s left of the ${BUDGET} s budget")
fi

if [ "$CPU_TESTS" = 1 ]; then
    if [ "$(left)" -ge 90 ]; then
        echo "== 5. the backend test files on CPU ($(left) s left)"
        timeout $(( $(left) - 10 )) "$PY" -m pytest -m "not gpu and not slow" tests/quant -q -p no:cacheprovider \
            > "$OUT_DIR/pytest-quant.txt" 2>&1
        record "CPU tests" $? "$(left)"
        tail -15 "$OUT_DIR/pytest-quant.txt"
    else
        STEPS+=("CPU tests: skipped, $(left) s left of the ${BUDGET} s budget")
    fi
fi

echo "== summary ($((SECONDS - START)) s; logs in $OUT_DIR)"
printf '  %s\n' "${STEPS[@]}"
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "failed: ${FAILED[*]}"
    exit 1
fi
echo "every step passed"
