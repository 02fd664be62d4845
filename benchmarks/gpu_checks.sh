#!/bin/bash
# The device checks of docs/performance.md's "GPU" section, as one script (a lent GPU machine's time is short):
# speed.py on DB15K at rank 500 (the issue-12 benchmark), the host's cost of a step (host_overhead.py: which ops the
# host spends a step on), `dsom run` on the embedded synthetic graph, and speed.py at the paper's rank 2000, each under
# its own time limit, their logs and JSON written to OUT (8 files at most).
#
#   OUT=gpu-out DSOM_DATA=../shared/data bash benchmarks/gpu_checks.sh [DEVICE] [BATCHES] [T_500] [T_RUN] [T_2000] [PYTHON] [T_HOST] [T_GRAPHS] [T_TESTS]
#
# A limit of 0 skips its check. Each call gets a fresh machine with nothing compiled: the first script to train compiles
# every loss tail (about a minute at DB15K's shapes), so give it the longest limit (a 95 s speed.py run on a cold
# machine measured nothing, 2026-12-04). T_GRAPHS: benchmarks/cuda_graphs.py (epochs with and without train.cuda_graphs, and
# the ops that wait for the GPU; ComplEx, stage 1 and, since the sixteenth session, stage 2), run first; T_TESTS: the CUDA
# tests of tests/test_graphs.py (where pytest is), then benchmarks/neighbour_pairs.py (60 s at most).
#
# Run from the repository root; PYTHON (default python3) needs torch, numpy, safetensors, pyyaml and tqdm; dsom is
# taken from src/ (PYTHONPATH), so nothing is installed. DSOM_DATA needs DB15K's TSV files only (features are random).
DEV=${1:-cuda}; NB=${2:-20}; T1=${3:-180}; T2=${4:-120}; T3=${5:-150}; PY=${6:-python3}; T4=${7:-0}; T5=${8:-0}
T6=${9:-0}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export DSOM_DATA=${DSOM_DATA:-$PWD/../shared/data}
O=${OUT:-gpu-out}; mkdir -p "$O"
{ date; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nproc
  $PY -m dsom version; } > "$O/env.txt" 2>&1
timed() {  # NAME LIMIT COMMAND...: run COMMAND under LIMIT seconds, log to O/NAME.log, note its exit status and time
  local name=$1 limit=$2 t0; shift 2; t0=$(date +%s)
  timeout "$limit" "$@" > "$O/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 ))s" | tee -a "$O/env.txt"
}
if [ "$T5" -gt 0 ]; then  # (from the second run, 2026-12-04)
  timed cuda_graphs "$T5" $PY benchmarks/cuda_graphs.py DB15K --rank 500 --epochs 3 --device "$DEV" --sync-scan \
    --phases distill,complex,teachers --json "$O/cuda_graphs.json"
fi
if [ "$T6" -gt 0 ] && $PY -c "import pytest" 2>/dev/null; then
  timed tests "$T6" $PY -m pytest -q -x tests/test_graphs.py -k cuda -p no:cacheprovider
fi
[ "$T6" -gt 0 ] && timed neighbour_pairs 60 $PY benchmarks/neighbour_pairs.py DB15K --device "$DEV"
[ "$T1" -gt 0 ] && timed speed_r500 "$T1" $PY benchmarks/speed.py DB15K --rank 500 --batches "$NB" --skip pykeen --device "$DEV" \
  --json "$O/speed_r500.json"
if [ "$T4" -gt 0 ]; then  # (not in the first run, 2026-12-04)
  timed host_overhead "$T4" $PY benchmarks/host_overhead.py --device "$DEV" --compile on,off --top 12
fi
RUN=${TMPDIR:-/tmp}/dsom-gpu-run-$$  # outside OUT: a run directory holds more files than a device call returns
[ "$T2" -gt 0 ] && timed run_synthetic "$T2" $PY -m dsom run synthetic -o "$RUN" --set train.device="$DEV"
cp "$RUN/results.json" "$O/syn_results.json" 2>/dev/null
[ "$T3" -gt 0 ] && timed speed_r2000 "$T3" $PY benchmarks/speed.py DB15K --rank 2000 --batches "$NB" --skip pykeen --device "$DEV" \
  --json "$O/speed_r2000.json"
