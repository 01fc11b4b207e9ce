#!/usr/bin/env bash
# Every benchmark for the SD1.5, SD3.5-M and FLUX.1-dev architectures (random weights, bf16, 512 px)
# on one GPU machine without network, in about 8 minutes. Run from the repository root:
#
#   benchmarks/gpu/run_all.sh OUT_DIR            # the GPU run (needs CUDA)
#   benchmarks/gpu/run_all.sh OUT_DIR --smoke    # the same Python path on CPU at toy size (~1 min)
#   benchmarks/gpu/run_all.sh OUT_DIR --estimate # predicted GPU seconds per stage, runs nothing
#   BACKENDS="sd3 sd15" benchmarks/gpu/run_all.sh OUT_DIR   # a subset, in that order
#
# Missing packages (diffusers, jsonargparse, importlib_metadata...) are installed from the wheels in
# .whl/ (benchmarks/gpu/fetch_wheels.sh) into OUT_DIR/.deps, never into the system environment.
# Each backend runs in its own process under its own time limit, in the order sd3, sd15, flux; each
# measurement writes its JSON/table/PNG when it finishes, so a limit hit keeps what was done.
# OUT_DIR/summary.md gathers every table and target at the end.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu/run_all.sh OUT_DIR [--smoke|--estimate]}
shift
MODE=${1:-}
cd "$(dirname "$0")/../.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# ---- wheels: only what does not import --------------------------------------------------------
DEPS="$OUT/.deps"
source benchmarks/gpu/deps.sh

# ---- the measurements ---------------------------------------------------------------------------
if [ "$MODE" = "--estimate" ]; then
  exec "$PY" -m benchmarks.gpu.run_all --estimate
fi
declare -A LIMIT=([sd3]=180 [sd15]=110 [flux]=240)
for b in ${BACKENDS:-sd3 sd15 flux}; do  # BACKENDS="sd3 sd15": a subset
  limit=${LIMIT[$b]}
  [ "$MODE" = "--smoke" ] && limit=300
  echo "[run_all] $b (limit ${limit}s)"
  timeout --signal=INT --kill-after=15 "$limit" "$PY" -m benchmarks.gpu.run_all --backend "$b" --out "$OUT/$b" $MODE \
    2>&1 | tee "$OUT/$b.log"
  echo "[run_all] $b exit ${PIPESTATUS[0]}"
done
"$PY" -m benchmarks.gpu.run_all --summarize "$OUT"
