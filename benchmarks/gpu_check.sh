#!/usr/bin/env bash
# The GPU paths, checked in one go when a CUDA machine is lent (none of them has run on a GPU before this script).
#
#   bash benchmarks/gpu_check.sh                       # tests + a short real-model pass per backend, < 10 minutes
#   bash benchmarks/gpu_check.sh --install             # first: pip install -c constraints.txt -e .[...] (see below)
#   bash benchmarks/gpu_check.sh --model path/to/folder --out /tmp/gpu   # a local model folder; where results go
#   bash benchmarks/gpu_check.sh --dry-run             # print the plan, run nothing
#
# 1. `pytest -m gpu` (every test that needs CUDA: each backend against sim on a tiny model, the refusals) and the
#    backend test files' CPU tests, on the installed stack;
# 2. per backend and scheme, `qharness run --device cuda --limit 2 --task kjv-heldout` on the real model (the fp
#    baseline is computed once and read back from the leaderboard by the later runs);
# 3. a summary table: each run's status (ok, refused with its one-line reason, failed), value, fp and change.
# It installs nothing unless --install is given, and then only this package and its extras under constraints.txt
# (torch==2.13.0 matches the machine's CUDA build 2.13.0+cuXXX, so pip keeps it). The device machines have no
# network: the built-in model must already be in $QHARNESS_CACHE (~/.cache/qharness), or pass --model FOLDER.
set -uo pipefail

cd "$(dirname "$0")/.."
MODEL=smollm2-135m
OUT_DIR=${OUT_DIR:-${OUT:-$(mktemp -d /tmp/qharness-gpu-check.XXXXXX)}}
INSTALL=0
DRY_RUN=0
while [ $# -gt 0 ]; do
    case "$1" in
        --install) INSTALL=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --model) MODEL=$2; shift ;;
        --out) OUT_DIR=$2; shift ;;
        *) echo "gpu_check.sh: unknown argument '$1'; known: --install --dry-run --model NAME --out DIR" >&2; exit 2 ;;
    esac
    shift
done
mkdir -p "$OUT_DIR"
STATUS="$OUT_DIR/status.tsv"
: > "$STATUS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# backend scheme: every scheme each library backend declares, plus sim and auto as references. On SmolLM2 (hidden
# 576) torchao int4 is expected to be refused (576 is not whole groups of 128) and auto to fall back to sim.
RUNS=(
    "sim int8-w8a8-token"
    "bnb llm-int8"
    "bnb nf4"
    "torchao int8-weight-channel"
    "torchao int8-w8a8-token"
    "torchao int4-weight-g128"
    "torchao fp8-e4m3-weight"
    "torchao fp8-e4m3-w8a8-tensor"
    "torchao fp8-e4m3-w8a8-token"
    "quanto int8-weight-channel"
    "quanto fp8-e4m3-weight"
    "quanto int8-w8a8-tensor-static"
    "gptq gptq-int4-g128"
    "auto int4-weight-g128"
)

if [ "$DRY_RUN" = 1 ]; then
    echo "would run: python -m pytest -m gpu tests; python -m pytest -m 'not gpu and not slow' tests/quant"
    for run in "${RUNS[@]}"; do
        set -- $run
        echo "would run: python -m qharness run --model $MODEL --device cuda --quant $2 --backend $1 --limit 2" \
             "--task kjv-heldout --results $OUT_DIR/leaderboard.csv --quiet"
    done
    exit 0
fi

if [ "$INSTALL" = 1 ]; then
    python -m pip install -q -c constraints.txt -e ".[bnb,torchao,quanto,gptq,test]" || exit 2
fi

python - <<'EOF' || exit 2
import importlib, importlib.util, shutil, sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA GPU visible (torch %s); run it on a GPU machine" % torch.__version__)
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0),
      "sm %d.%d" % torch.cuda.get_device_capability(0))
for package in ("bitsandbytes", "torchao", "optimum.quanto", "gptqmodel", "transformers"):
    try:
        found = importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:
        found = False
    version = importlib.import_module(package.split(".")[0]).__version__ if found else "MISSING"
    print(f"{package:15} {version}")
print("nvcc", shutil.which("nvcc") or "not found (quanto fp8 on CUDA will be refused)")
EOF
START=$SECONDS

echo "== 1. pytest -m gpu, then the backend test files on CPU"
timeout 300 python -m pytest -m gpu tests -q -rfEs -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT_DIR/pytest-gpu.txt"
GPU_TESTS=${PIPESTATUS[0]}
timeout 180 python -m pytest -m "not gpu and not slow" tests/quant -q -p no:cacheprovider 2>&1 | tail -15 \
    | tee "$OUT_DIR/pytest-quant.txt"
CPU_TESTS=${PIPESTATUS[0]}

echo "== 2. $MODEL on CUDA, one short run per backend and scheme"
if ! timeout 180 python -c "from qharness import ModelSpec, load_model; load_model(ModelSpec('$MODEL', device='cuda'))" \
        > "$OUT_DIR/model-load.txt" 2>&1; then
    echo "cannot load $MODEL here (no network on device machines?): $(tail -1 "$OUT_DIR/model-load.txt")"
    echo "pass --model path/to/local/folder, or fill \$QHARNESS_CACHE first; skipping the real-model pass"
    RUNS=()
fi
for run in "${RUNS[@]}"; do
    set -- $run
    backend=$1 scheme=$2
    if [ $((SECONDS - START)) -gt 540 ]; then
        printf '%s\t%s\tskipped\tout of the 10-minute budget\n' "$backend" "$scheme" >> "$STATUS"
        continue
    fi
    log="$OUT_DIR/run-$backend-$scheme.txt"
    began=$SECONDS
    timeout 150 python -m qharness run --model "$MODEL" --device cuda --quant "$scheme" --backend "$backend" \
        --limit 2 --task kjv-heldout --results "$OUT_DIR/leaderboard.csv" --quiet > "$log" 2>&1
    rc=$?
    case $rc in
        0) state=ok; why="" ;;
        2) state=refused; why=$(grep -m1 'qharness: error:' "$log" | sed 's/^qharness: error: //') ;;
        124) state=failed; why="timed out after 150 s" ;;
        *) state=failed; why=$(grep -E 'Error|error' "$log" | tail -1) ;;
    esac
    printf '%s\t%s\t%s\t%s (%ds)\n' "$backend" "$scheme" "$state" "$why" $((SECONDS - began)) >> "$STATUS"
    echo "$backend $scheme: $state $why"
done

echo "== 3. summary ($OUT_DIR)"
python - "$STATUS" "$OUT_DIR/leaderboard.csv" <<'EOF'
import csv, os, sys
status_path, board_path = sys.argv[1:3]
rows = list(csv.DictReader(open(board_path))) if os.path.exists(board_path) else []
fp = next((r["value"] for r in rows if r["quant"] == "none"), "")
print(f"fp (no quantization) ppl: {float(fp):.4f}" if fp else "fp: no baseline row")
print(f"{'backend':9} {'scheme':26} {'status':8} {'ran on':8} {'ppl':>9} {'change':>8}  note")
for line in open(status_path):
    backend, scheme, state, note = line.rstrip("\n").split("\t")
    done = [r for r in rows if r["quant"] == scheme and backend in (r["backend"], "auto")]
    value = f"{float(done[-1]['value']):9.4f}" if done and state == "ok" else f"{'-':>9}"
    change = f"{float(done[-1]['rel_delta']):+8.2%}" if done and state == "ok" and done[-1]["rel_delta"] else f"{'-':>8}"
    ran_on = done[-1]["backend"] if done and state == "ok" else "-"
    print(f"{backend:9} {scheme:26} {state:8} {ran_on:8} {value} {change}  {note}")
EOF
echo "pytest -m gpu: exit $GPU_TESTS; backend tests on CPU: exit $CPU_TESTS; $((SECONDS - START)) s in all"
[ "$GPU_TESTS" = 0 ] && [ "$CPU_TESTS" = 0 ]
