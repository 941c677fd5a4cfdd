#!/usr/bin/env bash
# The prepared GPU check: what a person with one NVIDIA GPU and ten minutes runs from the
# repository root to see the engine on a GPU. Every part has its own timeout; the summary
# goes to $OUT/gpu-check.json (OUT defaults to bench/results/gpu).
#
#   bash bench/gpu/check.sh             # on a GPU machine, with python3 holding torch
#   bash bench/gpu/check.sh --dry-run   # on a CPU, small shapes (what CI runs)
#
# Parts: the gpu-marked tests; our engine (eager, and with decode steps replayed from CUDA
# graphs) against transformers.generate on the same random weights with Llama-3.1-8B's
# layer shapes (4 of its 32 layers) in bf16 at batch 1, 16 and 64, each decode step set
# against weight bytes / HBM bandwidth measured in the same run; kernel launches, copies
# and syncs per decode step (bench/engine/launches.py); how far two valid half-precision
# runs' logits part (bench/gpu/promise.py); two NCCL ranks, if the machine has two GPUs.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# spotserve from this tree, uninstalled: its packages live in several folders
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
"$PY" -c "import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; \
from lint_imports import assemble; assemble(Path(sys.argv[1]))" "$SITE" || exit 2
cp -r spotserve/data "$SITE/spotserve/data"   # the catalog and the models (package data)
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
RESULTS=()

PARTS=${PARTS:-gpu-tests,engine,launches,promise,nccl}   # a subset, comma-separated, to rerun one part

part() {   # part NAME TIMEOUT_S COMMAND...: run it, log it, record its status
    local name=$1 limit=$2; shift 2
    case ",$PARTS," in *",$name,"*) ;; *) return 0 ;; esac
    echo "== $name (at most ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]} status=passed
    [ "$rc" -eq 124 ] && status=timed-out
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && status=failed
    RESULTS+=("{\"part\": \"$name\", \"status\": \"$status\", \"exit\": $rc, \"seconds\": $((SECONDS - start))}")
}

# appended, not prepended: the checkout's own spotserve/ folder (the top package alone)
# must not hide the assembled one
# (-P: nor the current folder, which `python -m` would put first)
TESTS=("$PY" -P -m pytest -q -p no:cacheprovider --import-mode=append -m gpu tests/engine)
if [ "$DRY" = 1 ]; then
    part gpu-tests 300 "${TESTS[@]}"
    part engine 300 "$PY" bench/engine/run.py --device cpu --batches 1,2 --in-len 8 \
        --out-len 4 --threads 1 --out "$OUT" --cuda-graphs
    part launches 120 "$PY" bench/engine/launches.py --device cpu --batches 2 \
        --out "$OUT/launches.json"
    part promise 120 "$PY" bench/gpu/promise.py --device cpu --dtypes bfloat16 --layers 2 \
        --prompts 3 --length 24 --out "$OUT/promise.json"
else
    part gpu-tests 150 "${TESTS[@]}"
    part engine 330 "$PY" bench/engine/run.py --device cuda --shape llama-8b --layers 4 \
        --dtypes bfloat16 --batches 1,16,64 --in-len 128 --out-len 128 --out "$OUT" \
        --cuda-graphs
    part launches 150 "$PY" bench/engine/launches.py --device cuda --shape llama-8b \
        --layers 4 --batches 1,16,64 --cuda-graphs --out "$OUT/launches.json"
    part promise 150 "$PY" bench/gpu/promise.py --device cuda --shape llama-8b --layers 4 \
        --out "$OUT/promise.json"
    GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    if [ "${GPUS:-0}" -ge 2 ]; then
        part nccl 60 "$PY" -m torch.distributed.run --nproc-per-node 2 bench/gpu/nccl_pair.py
    else
        RESULTS+=("{\"part\": \"nccl\", \"status\": \"skipped\", \"why\": \"$GPUS GPU(s): two NCCL ranks need two\"}")
    fi
fi
JOINED=$(IFS=,; echo "${RESULTS[*]}")
echo "{\"dry_run\": $([ "$DRY" = 1 ] && echo true || echo false), \"parts\": [$JOINED]}" \
    > "$OUT/gpu-check.json"
cat "$OUT/gpu-check.json"
grep -q '"status": "failed"\|"status": "timed-out"' "$OUT/gpu-check.json" && exit 1
exit 0
