#!/usr/bin/env bash
# One-shot accelerator slot: `jaxgen bench attention` then `jaxgen bench train` at accelerator
# shapes, each under `timeout`, the whole under BUDGET seconds (default 450 s, for an 8-minute slot
# on one H200). Results land in "${OUT:-out}/": <step>.json (the bench's --json), <step>.txt (its
# table and log), env.txt (devices, versions) and steps.txt (each step's exit status; 124 = timed
# out). A failing or timed-out step is recorded and the next one still runs; the exit status is
# the number of failed steps. Run from the repository root: bash experiments/gpu_oneshot.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-out}"
BUDGET="${BUDGET:-450}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
: > "$OUT/steps.txt"
failed=0

# step NAME LIMIT CMD...: run CMD under min(LIMIT, seconds left), its output in $OUT/NAME.txt
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((left < 20)); then
    echo "$name skipped (budget spent)" | tee -a "$OUT/steps.txt"
    failed=$((failed + 1))
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s, ${SECONDS}s elapsed): $*"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc ($((SECONDS - start))s)" | tee -a "$OUT/steps.txt"
  tail -n 25 "$OUT/$name.txt"
  ((rc != 0)) && failed=$((failed + 1))
}

step env 40 bash -c "nvidia-smi || true; $PY -c 'import jax, jaxlib; print(jax.__version__, jaxlib.__version__); \
print(jax.devices()); print(jax.devices()[0].device_kind)'; git rev-parse HEAD || true"

# The attention door's impls per layout at T = 2048 / 4096 / 8192 (bf16, 32/8 heads, head dim 128),
# the cache path (chunk 1/8/32, fill 2k/8k) and a 1.1B Llama decode step against its weight-read floor
step bench_attention 240 "$PY" -m jaxgen.cli bench attention --repeats 5 --json "$OUT/bench_attention.json"

# Training base-125m (bf16, remat dots) at batch 8 x 1024: xla and pallas attention side by side
step bench_train_ar 130 "$PY" -m jaxgen.cli bench train --preset base-125m --batch 8 --seq-len 1024 \
  --objective ar --attention-impl xla,pallas --steps 10 --repeats 5 vocab_size=32768 --json "$OUT/bench_train_ar.json"

step bench_train_mdlm 80 "$PY" -m jaxgen.cli bench train --preset base-125m --batch 8 --seq-len 1024 \
  --objective masked_diffusion --attention-impl xla,pallas --steps 10 --repeats 5 vocab_size=32768 \
  --json "$OUT/bench_train_mdlm.json"

echo "== done in ${SECONDS}s; $failed failed step(s)"
cat "$OUT/steps.txt"
exit "$failed"
