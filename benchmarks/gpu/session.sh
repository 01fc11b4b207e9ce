#!/usr/bin/env bash
# One device session (a GPU machine lent for minutes): the stages of STAGES, in this order, each
# stopped cleanly (SIGINT, then SIGKILL 15 s later) when the session's time budget runs out, and
# skipped when less than its minimum is left. Default STAGES: "flux_check run_all fsdp memory compile".
#   flux_check  FLUX.1-dev's failing update backward (issue 29), every step under CUDA_LAUNCH_BLOCKING=1
#               and in its own process, FLUX_CHECK_S seconds at most (default 240): (1) every distinct
#               GEMM / attention call of the stored trace
#               (docs/results/flux_backward/) replayed on random tensors; (2) one real update minibatch
#               at full size without the rollout (benchmarks/gpu/kernel_calls.py update); if (2) fails,
#               one variant per process: no gradient checkpointing, kl_beta 0, math attention,
#               train_batch_size 1; if it passes, the whole fit loop (memory_check flux_pro)
#   run_all     the GPU cost tables (benchmarks/gpu/run_all.sh), one backend at a time in RUN_ALL order
#               (default "sd3 sd15 flux"); sd3's iteration table has Pro-GRPO Standard and Flash and the
#               Flow-GRPO twin (plain G = 24) at equal prompts in one run
#   fsdp        the FSDP smoke (benchmarks/gpu/fsdp_smoke.py): fsdp vs the plain strategy, same seed
#   memory      real-size memory of every variant without a stored result in docs/results/gpu_memory
#               (benchmarks/gpu/memory_check.py --unmeasured: the table's families, whatever branch added
#               them, and the allocator variants NAME+cap80 / NAME+expandable), each in its own process
#   compile     compiled vs eager, side by side: memory_check NAME and NAME+compiled for each NAME of
#               COMPILE_BASES (default "sd35m_pro"); then benchmarks/compile_cost.py (rollout and update
#               ratios, graphs after warm-up, max |log-ratio|, bf16) on COMPILE_MODELS (default "block")
#   gq          (not default) the CPU mechanism benchmark as shards on the machine's other cores
# Everything lands in one archive, OUT/results.tgz (the device tool brings back few files), with
# OUT/session.log and stages.tsv (stage, exit code or "skipped", seconds, seconds left). Read it
# back here with: python -m benchmarks.gpu.session_results OUT/results.tgz --into docs/results/<name>
#
#   benchmarks/gpu/session.sh OUT [SECONDS]            # SECONDS: the whole script's budget (default 480)
#   SMOKE=1 benchmarks/gpu/session.sh OUT 900          # every stage on CPU at toy size (tiny configs)
#   STAGES="memory compile" benchmarks/gpu/session.sh OUT 480   # a second call: the stages left
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu/session.sh OUT [SECONDS]}
BUDGET=${2:-480}
START=$(date +%s)
cd "$(dirname "$0")/../.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RES=$(mktemp -d /tmp/session.XXXX)
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee "$OUT/session.log") 2>&1
pack() { cp "$OUT/session.log" "$RES/session.log" 2>/dev/null
         tar czf "$OUT/results.tgz" -C "$RES" --exclude='*.pt' --exclude='*.ckpt' --exclude='work' --exclude='.deps' . 2>/dev/null; }
trap pack EXIT
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
RESERVE=25  # seconds kept for packing the archive at the end
SLOW=${SLOW:-1}; [ -n "${SMOKE:-}" ] && SLOW=${SLOW_SMOKE:-4}  # a stage's limits x SLOW (a CPU smoke run is slower)
# cap N: N x SLOW seconds, or what is left of the budget (less the reserve) if that is less
cap() { local l=$(( $(left) - RESERVE )) n=$(( $1 * SLOW )); echo $(( n < l ? n : l )); }
# run_for SECONDS CMD...: the command under a limit (SIGINT first, so Python writes what it has)
run_for() { local s=$1; shift; if [ "$s" -lt 5 ]; then echo "[session] no time left for: $*"; return 124; fi
            timeout --signal=INT --kill-after=15 "$s" "$@"; }
STAGES=" ${STAGES:-flux_check run_all fsdp memory compile} "
has() { [[ "$STAGES" == *" $1 "* ]]; }
printf 'stage\texit\tseconds\tleft\n' > "$RES/stages.tsv"
T0=0
begin() {  # begin STAGE MIN_SECONDS: whether to run it (logged either way)
  has "$1" || return 1
  if [ "$(left)" -lt $(( $2 + RESERVE )) ]; then
    echo "[session] $1: skipped, $(left)s left (needs $2)"; printf '%s\tskipped\t0\t%s\n' "$1" "$(left)" >> "$RES/stages.tsv"
    return 1
  fi
  echo "[session] $1: start ($(left)s left)"; T0=$(date +%s); return 0
}
end() { echo "[session] $1: exit $2 ($(left)s left)"
        printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$(( $(date +%s) - T0 ))" "$(left)" >> "$RES/stages.tsv"; }

DEPS=/tmp/session-deps
source benchmarks/gpu/deps.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$RES/gpu.txt"
nproc | tee "$RES/nproc.txt"
git rev-parse HEAD > "$RES/git_commit.txt" 2>/dev/null
if [ -n "${SMOKE:-}" ]; then SM=(--smoke); DEV=(--device cpu); else SM=(); DEV=(); fi

# ---- the mechanism benchmark (optional): CPU shards in the background ------------------------------
pids=()
if has gq; then
  if [ -n "${SMOKE:-}" ]; then
    GQ=(--rollouts 6 --prompts 1 --schedule "q=pro:4>3@4>2@6" --static-group 4 --threads 1); SHARDS=2
  else
    GQ=(--rollouts "${GQ_ROLLOUTS:-128}" --prompts 4 --threads 2 --reward brightness
        --schedule "quickstart=pro:16>10@4>6@6" "early=pro:16>6@2"); SHARDS=${GQ_SHARDS:-6}
  fi
  mkdir -p "$RES/gradient_quality"
  for i in $(seq 0 $((SHARDS - 1))); do
    nice -n 5 "$PY" -m benchmarks.gradient_quality "${GQ[@]}" --out "$RES/gradient_quality" --shard "$i/$SHARDS" \
      > "$RES/gradient_quality/shard$i.log" 2>&1 &
    pids+=($!)
  done
  echo "[session] gradient_quality: $SHARDS shards started ($(left)s left)"
fi

# ---- 1. FLUX.1-dev's update backward, one variant per process, blocking launches -------------------
if begin flux_check 90; then
  FC="$RES/flux_check"; mkdir -p "$FC"
  SDL=$(( $(date +%s) + ${FLUX_CHECK_S:-240} * SLOW ))  # the stage's own deadline: run_all comes next
  scap() { local n r; n=$(cap "$1"); r=$(( SDL - $(date +%s) )); echo $(( n < r ? n : r )); }
  if [ -n "${SMOKE:-}" ]; then
    FCFG=(--config configs/tiny_flux.yaml); FVAR=tiny_flux; CALLS="$FC/trace/calls.json"
    "$PY" -m benchmarks.gpu.kernel_calls trace --config configs/tiny_flux.yaml --out "$FC/trace" > "$FC/trace.log" 2>&1
  else
    FCFG=(--config configs/flux_dev_pickscore_pro_grpo.yaml); FVAR=flux_pro
    CALLS=docs/results/flux_backward/checkpointing_on/calls.json
  fi
  CUDA_LAUNCH_BLOCKING=1 run_for "$(scap 60)" "$PY" -m benchmarks.gpu.kernel_calls replay --calls "$CALLS" \
    --out "$FC/replay.json" "${DEV[@]}"
  echo "[session] flux_check replay exit $?"
  CUDA_LAUNCH_BLOCKING=1 run_for "$(scap 120)" "$PY" -m benchmarks.gpu.kernel_calls update "${FCFG[@]}" \
    --out "$FC/update.json" "${DEV[@]}"
  rc=$?
  echo "[session] flux_check update exit $rc"
  if [ $rc -ne 0 ]; then  # bisect: which setting does the failure need? (most telling first)
    for v in "no_checkpointing --model.backend.init_args.gradient_checkpointing=false" "sdpa_math --sdpa math" \
             "no_kl --model.update.kl_beta=0" "train_batch_1 --model.update.train_batch_size=1"; do
      read -r name args <<< "$v"
      CUDA_LAUNCH_BLOCKING=1 run_for "$(scap 90)" "$PY" -m benchmarks.gpu.kernel_calls update "${FCFG[@]}" \
        --out "$FC/update_$name.json" "${DEV[@]}" $args
      echo "[session] flux_check update_$name exit $?"
    done
  else  # the minibatch alone passes: the whole loop (rollout, then update) in a fresh process
    CUDA_LAUNCH_BLOCKING=1 run_for "$(scap 200)" "$PY" -m benchmarks.gpu.memory_check "${SM[@]}" --only "$FVAR" \
      --out "$FC/memory"
    echo "[session] flux_check memory_check $FVAR exit $?"
  fi
  end flux_check "$rc"
fi

# ---- 2. the GPU cost tables, one backend at a time ----------------------------------------------------
if begin run_all 100; then
  RA=(); [ -n "${SMOKE:-}" ] && RA=(--smoke)
  declare -A LIMIT=([sd3]=180 [sd15]=110 [flux]=240)
  rc=0
  for b in ${RUN_ALL:-sd3 sd15 flux}; do
    limit=${LIMIT[$b]}; [ -n "${SMOKE:-}" ] && limit=75  # run_all.sh's own limit on CPU: 300 s
    if [ "$(cap "$limit")" -lt $(( 60 * SLOW )) ]; then echo "[session] run_all $b: skipped, $(left)s left"; continue; fi
    BACKENDS=$b run_for "$(cap $(( limit + 20 )))" bash benchmarks/gpu/run_all.sh "$RES/run_all" "${RA[@]}"
    r=$?; [ $r -ne 0 ] && rc=$r
    echo "[session] run_all $b exit $r ($(left)s left)"
  done
  "$PY" -m benchmarks.gpu.run_all --summarize "$RES/run_all" > /dev/null
  rm -rf "$RES/run_all/.deps"
  end run_all "$rc"
fi

# ---- 3. the FSDP smoke ----------------------------------------------------------------------------------
if begin fsdp 60; then
  run_for "$(cap 240)" "$PY" -m benchmarks.gpu.fsdp_smoke --out "$RES/fsdp" "${SM[@]}"
  end fsdp $?
fi

# ---- 4. real-size memory of every variant not measured yet --------------------------------------------
if begin memory 90; then
  MEM=(--unmeasured docs/results/gpu_memory)
  [ -n "${MEMORY_ONLY:-}" ] && MEM=(--only $MEMORY_ONLY)
  "$PY" -m benchmarks.gpu.memory_check "${SM[@]}" "${MEM[@]}" --list | sed 's/^/[session] memory: /'
  run_for "$(cap 100000)" "$PY" -m benchmarks.gpu.memory_check "${SM[@]}" "${MEM[@]}" --out "$RES/memory" \
    --budget-s $(( $(cap 100000) - 60 ))
  end memory $?
fi

# ---- 5. compiled vs eager, side by side in this session -----------------------------------------------
if begin compile 120; then
  if [ -n "${SMOKE:-}" ]; then BASES=${COMPILE_BASES:-tiny_sd3}; else BASES=${COMPILE_BASES:-sd35m_pro}; fi
  pairs=()
  for b in $BASES; do pairs+=("$b" "$b+compiled"); done
  if "$PY" -m benchmarks.gpu.memory_check "${SM[@]}" --only "${pairs[@]}" --list > /dev/null 2>&1; then
    run_for "$(cap 100000)" "$PY" -m benchmarks.gpu.memory_check "${SM[@]}" --only "${pairs[@]}" \
      --out "$RES/compile" --budget-s $(( $(cap 100000) - 60 ))
    end compile $?
    if [ -n "${SMOKE:-}" ]; then CC=(--model tiny --compile-backend aot_eager --repeats 1)
    else CC=(--device cuda --dtype bfloat16 --repeats 3); for m in ${COMPILE_MODELS:-block}; do CC+=(--model "$m"); done; fi
    run_for "$(cap 100000)" "$PY" -m benchmarks.compile_cost "${CC[@]}" --out "$RES/compile_cost"
    echo "[session] compile_cost exit $? ($(left)s left)"
  else
    echo "[session] compile: no compile option in this version (memory_check has no COMPILE_OVERRIDES)"
    end compile unavailable
  fi
fi

# ---- join the gradient-quality shards (stopped 40 s before the end: the join scores what is contiguous)
if has gq; then
  deadline=$(( $(date +%s) + $(left) - 40 ))
  for p in "${pids[@]}"; do
    while kill -0 "$p" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 2; done
    kill -INT "$p" 2>/dev/null
  done
  wait "${pids[@]}" 2>/dev/null  # not a bare wait: the log's tee is a child too
  timeout 35 "$PY" -m benchmarks.gradient_quality "${GQ[@]}" --out "$RES/gradient_quality" --join \
    > "$RES/gradient_quality/join.log" 2>&1
  echo "[session] gradient_quality join exit $? ($(left)s left)"
fi
echo "[session] done ($(left)s left)"
