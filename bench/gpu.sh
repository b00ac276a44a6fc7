#!/usr/bin/env bash
# Every GPU measurement, in priority order, on one CUDA card (H100 / H200 / A100):
#   1. sid-b-256 training step, bf16 + torch.compile (the >= 40 % MFU target)   bench/train_step.py
#   2. sid-b-256 training step, eager bf16 and eager fp32
#   3. sid-b-256 guided sampling (16 DDPM steps timed, extrapolated to 256)       bench/sample.py
#   4. semantica-512: activation checkpointing, largest batch on one card, 8-card FSDP arithmetic
#   5. sid-b-256 bf16 + compile + channels-last (only if the budget has time left)
# Run from the repository root:  OUT=out/bench bash bench/gpu.sh   (the device tool sets $OUT).
# Each benchmark is its own process with its own timeout, capped by what is left of $BUDGET
# seconds (default 420 = 7 min), so a failure or a hang loses only that one.
# Logs: $OUT/gpu.log (everything), $OUT/<name>.log per benchmark, results as JSON lines in
# $OUT/train_step.jsonl and $OUT/sample.jsonl. Nothing is installed unless `import einops` fails:
# then the wheel vendored in .whl/ (pip download einops --no-deps -d .whl) is installed offline.
# ONLY="train_512 train_compile_cl" runs just those (names below), e.g. for a second, shorter try.
# CPU smoke test of the script itself:
#   P256=tiny-32 P512=tiny-32 BATCH=4 STEPS=1 SAMPLE_B=2 MAXB=2 OUT=/tmp/gpu_smoke bash bench/gpu.sh
set -u
OUT=${OUT:-out/bench}
BUDGET=${BUDGET:-420}
P256=${P256:-sid-b-256} P512=${P512:-semantica-512} BATCH=${BATCH:-16} STEPS=${STEPS:-10}
SAMPLE_B=${SAMPLE_B:-8} MAXB=${MAXB:-64}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
START=$(date +%s)
PY=python3
for p in python python3; do command -v $p >/dev/null && $p -c "import torch" 2>/dev/null && { PY=$p; break; }; done
export PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # less fragmentation in the OOM search
# A compile killed by its timeout can leave a truncated kernel in the inductor cache ("file too
# short" on the next compile): one fresh cache per run, and a new one after any timeout.
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d /tmp/inductor_bench.XXXX)

echo "== $(date -u) on $(hostname); python $PY"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv || true
nvidia-smi -L || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"

if ! "$PY" -c "import einops" 2>/dev/null; then
  echo "== einops missing: installing the vendored wheel from .whl/ (offline)"
  if ! "$PY" -m pip install -q --no-index --find-links .whl einops; then
    echo "== no usable .whl/: trying the package index"; timeout 60 "$PY" -m pip install -q einops
  fi
fi
for mod in einops numpy PIL; do  # numpy + PIL only for train.update_ema (the EMA is skipped without)
  "$PY" -c "import $mod" 2>/dev/null && echo "import $mod: ok" || echo "import $mod: MISSING"
done

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
bench() {  # bench NAME TIMEOUT_S ARGS...: one benchmark, its own log, capped at the budget left
  local name=$1 limit=$2 rest t0 rc
  shift 2
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return; fi
  rest=$(left)
  if (( rest < 30 )); then echo "== $name: SKIPPED, budget spent"; return; fi
  (( limit > rest )) && limit=$rest
  echo "== $name (timeout ${limit}s, $(( $(date +%s) - START ))s elapsed): $*"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$PY" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  grep -v -E "UserWarning|warnings.warn" "$OUT/$name.log" | tail -n 40
  echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s$( ((rc == 124)) && echo ' (TIMED OUT)')"
  if ((rc == 124 || rc == 137)); then export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d /tmp/inductor_bench.XXXX); fi
}

TS=bench/train_step.py
J=$OUT/train_step.jsonl
bench train_compile 240 $TS --preset $P256 --batch $BATCH --modes compile --steps $STEPS --warmup 3 \
  --sync-check --parts --json "$J"
bench train_eager 75 $TS --preset $P256 --batch $BATCH --modes bf16,eager --steps $(( (STEPS + 1) / 2 )) \
  --warmup 2 --sync-check --json "$J"
bench sample 60 bench/sample.py --preset $P256 --cond-images $SAMPLE_B --num-samples $SAMPLE_B --steps $(( STEPS + 6 )) \
  --bf16 --json "$OUT/sample.jsonl"
bench train_512 150 $TS --preset $P512 --modes bf16 --grad-checkpoint --find-max-batch --max-batch-cap $MAXB \
  --steps $(( (STEPS + 2) / 3 )) --warmup 1 --json "$J"
bench train_compile_cl 200 $TS --preset $P256 --batch $BATCH --modes compile --channels-last \
  --steps $STEPS --warmup 3 --json "$J"

echo "== done in $(( $(date +%s) - START ))s; results:"
cat "$J" "$OUT/sample.jsonl" 2>/dev/null | cut -c1-600
