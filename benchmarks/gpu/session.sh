#!/usr/bin/env bash
# One device session (a GPU machine lent for minutes), in stages chosen by STAGES (default
# "memory run_all"):
#   gq       the mechanism benchmark (benchmarks/gradient_quality.py, CPU only) as parallel shards on
#            the machine's other cores while the GPU works, joined and scored at the end
#   memory   real-size memory of the shipped configs against `plan` (benchmarks/gpu/memory_check.py),
#            each variant in its own process (MEMORY_ONLY="flux_pro ..." for a subset)
#   run_all  the GPU cost tables (benchmarks/gpu/run_all.sh, BACKENDS default "sd3 sd15") with the
#            time that is left
#   compile  eager vs compiled denoiser (benchmarks/compile_cost.py, inductor, bf16): rollout and
#            update ratios, graphs after warm-up, max |log-ratio|; the whole SD3.5-M and one block
#            (COMPILE_MODELS, default "block full"); not in the default STAGES (compiling SD3.5-M
#            takes minutes): STAGES="compile" benchmarks/gpu/session.sh OUT 450
# Everything lands in one archive, OUT/results.tgz (the device tool brings back few files), plus
# OUT/session.log.
#
#   benchmarks/gpu/session.sh OUT [SECONDS]          # SECONDS: the whole script's budget (default 450)
#   SMOKE=1 benchmarks/gpu/session.sh OUT 300        # the same steps on CPU at toy size (tiny configs)
#   STAGES="gq memory" GQ_SHARDS=7 benchmarks/gpu/session.sh OUT 450   # what ran on 2026-11-30
#
# Run from anywhere; the wheels of .whl/ (benchmarks/gpu/fetch_wheels.sh) are installed to /tmp.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu/session.sh OUT [SECONDS]}
BUDGET=${2:-450}
START=$(date +%s)
cd "$(dirname "$0")/../.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RES=$(mktemp -d /tmp/session.XXXX)
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee "$OUT/session.log") 2>&1
pack() { tar czf "$OUT/results.tgz" -C "$RES" --exclude='*.pt' --exclude='work' . 2>/dev/null; }
trap pack EXIT
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

DEPS=/tmp/session-deps
source benchmarks/gpu/deps.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$RES/gpu.txt"
nproc | tee "$RES/nproc.txt"

STAGES=" ${STAGES:-memory run_all} "
has() { [[ "$STAGES" == *" $1 "* ]]; }

# ---- the mechanism benchmark: CPU shards in the background ------------------------------------------
pids=()
if ! has gq; then :
elif [ -n "${SMOKE:-}" ]; then
  GQ=(--rollouts 4 --prompts 1 --schedule "q=pro:4>3@4>2@6" --static-group 4 --threads 1); SHARDS=2
else
  GQ=(--rollouts "${GQ_ROLLOUTS:-128}" --prompts 4 --threads 2); SHARDS=${GQ_SHARDS:-6}
fi
if has gq; then
  mkdir -p "$RES/gradient_quality"
  for i in $(seq 0 $((SHARDS - 1))); do
    nice -n 5 "$PY" -m benchmarks.gradient_quality "${GQ[@]}" --out "$RES/gradient_quality" --shard "$i/$SHARDS" \
      > "$RES/gradient_quality/shard$i.log" 2>&1 &
    pids+=($!)
  done
  echo "[session] gradient_quality: $SHARDS shards started ($(left)s left)"
fi

# ---- real-size memory on the GPU ------------------------------------------------------------------
if has memory; then
  if [ -n "${SMOKE:-}" ]; then MC=(--smoke); else MC=(); fi
  [ -n "${MEMORY_ONLY:-}" ] && MC+=(--only $MEMORY_ONLY)
  reserve=0; has run_all && reserve=200
  timeout --signal=INT --kill-after=20 $(( $(left) - 60 - reserve )) "$PY" -m benchmarks.gpu.memory_check "${MC[@]}" \
    --out "$RES/memory" --budget-s $(( $(left) - 150 - reserve ))
  echo "[session] memory_check exit $? ($(left)s left)"
fi

# ---- the GPU cost tables with what is left ---------------------------------------------------------
if has run_all && [ "$(left)" -gt 120 ]; then
  RA=(); [ -n "${SMOKE:-}" ] && RA=(--smoke)
  BACKENDS=${BACKENDS:-sd3 sd15} timeout --signal=INT --kill-after=20 $(( $(left) - 50 )) \
    bash benchmarks/gpu/run_all.sh "$RES/run_all" "${RA[@]}"
  echo "[session] run_all exit $? ($(left)s left)"
  rm -rf "$RES/run_all/.deps"
fi

# ---- eager vs compiled denoiser ------------------------------------------------------------------
if has compile && [ "$(left)" -gt 90 ]; then
  if [ -n "${SMOKE:-}" ]; then CC=(--model tiny --compile-backend aot_eager --repeats 1)
  else CC=(--device cuda --dtype bfloat16 --repeats 3); for m in ${COMPILE_MODELS:-block full}; do CC+=(--model "$m"); done; fi
  timeout --signal=INT --kill-after=20 $(( $(left) - 45 )) "$PY" -m benchmarks.compile_cost "${CC[@]}" \
    --out "$RES/compile_cost"
  echo "[session] compile_cost exit $? ($(left)s left)"
fi

# ---- join the shards (stop them 40 s before the end: the join scores what is contiguous) ---------
if has gq; then
  deadline=$(( $(date +%s) + $(left) - 40 ))
  for p in "${pids[@]}"; do
    while kill -0 "$p" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 2; done
    kill -INT "$p" 2>/dev/null
  done
  wait "${pids[@]}" 2>/dev/null  # not a bare wait: the log's tee is a child too
  tail -n 2 "$RES"/gradient_quality/shard*.log
  timeout 35 "$PY" -m benchmarks.gradient_quality "${GQ[@]}" --out "$RES/gradient_quality" --join \
    > "$RES/gradient_quality/join.log" 2>&1
  echo "[session] gradient_quality join exit $? ($(left)s left)"
  tail -n 20 "$RES/gradient_quality/join.log"
fi
