#!/usr/bin/env bash
# SRPPO's critic remedies against GRPO and RLOO on the coherent reward: the same start model (the demo's SFT model),
# the same training time per run (MINUTES of CPU time, default 5: equal compute even if other jobs share the cores),
# bf16, 2 seeds side by side, each pinned to one core with one torch thread. Raw results.json per (variant, seed) land in RESULTS as they finish; the table and plot at the end:
#
#   bash benchmarks/critic_remedies.sh                 # ~45 min on a 2-core AVX-512 BF16 machine
#   COMMIT=1 bash benchmarks/critic_remedies.sh        # also commit each finished pair of raw files
#
# Needs a CPU with AVX-512 BF16 or AMX (see docs/performance.md); PRECISION=fp32 runs it anywhere, about half the
# updates in the same time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MINUTES=${MINUTES:-5}
PRECISION=${PRECISION:-bf16}
OUT=${OUT:-outputs/critic_remedies}
RESULTS=${RESULTS:-benchmarks/results/critic_remedies}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=src
mkdir -p "$OUT" "$RESULTS"

# The start model, once (2 threads): the demo YAML's SFT stage.
OMP_NUM_THREADS=2 $PY benchmarks/learning.py --sft-only --output-dir "$OUT" --threads 2

# The documented results ran before bf16 CPU runs took the attention backward in fp32 and before SRPPO rollouts drew
# tokens by inverse transform: both kept as they were, to reproduce them (FP32_ATTENTION_BACKWARD=auto and
# ROLLOUT_SAMPLER=inverse_cdf for the trainer's defaults).
COMMON=(--reward coherent --sft-model "$OUT/sft" --budget-min "$MINUTES" --budget-clock cpu --eval-every-s 150 --eval-prompts 16
        --threads 1 --precision "$PRECISION" --lam 1 --cliprange-value none
        --fp32-attention-backward "${FP32_ATTENTION_BACKWARD:-off}" --rollout-sampler "${ROLLOUT_SAMPLER:-multinomial}")
# name | trainers | options
VARIANTS=(
  "plain-w2|srppo|--critic-warmup 2 --label plain, warm-up 2"
  "norm-bias-w2|srppo|--critic-warmup 2 --normalize-reward --value-bias-init --label norm + bias init, warm-up 2"
  "plain-w6|srppo|--critic-warmup 6 --label plain, warm-up 6"
  "bias-w6|srppo|--critic-warmup 6 --value-bias-init --label bias init, warm-up 6"
  "grpo-rloo|grpo,rloo|"
)
for variant in "${VARIANTS[@]}"; do
  IFS='|' read -r name trainers options <<<"$variant"
  label=""
  if [[ "$options" == *"--label "* ]]; then label="${options#*--label }"; options="${options%%--label *}"; fi
  pids=()
  for seed in 0 1; do
    if [[ -f "$RESULTS/$name-s$seed.json" ]]; then continue; fi
    run_dir="$OUT/$name-s$seed"
    args=("${COMMON[@]}" --trainers "$trainers" --seed "$seed" --output-dir "$run_dir")
    # shellcheck disable=SC2206
    args+=($options)
    if [[ -n "$label" ]]; then args+=(--label "$label, seed $seed"); else args+=(--label "seed $seed"); fi
    OMP_NUM_THREADS=1 taskset -c "$seed" $PY benchmarks/learning.py "${args[@]}" >"$run_dir.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  for seed in 0 1; do
    [[ -f "$OUT/$name-s$seed/results.json" && ! -f "$RESULTS/$name-s$seed.json" ]] &&
      cp "$OUT/$name-s$seed/results.json" "$RESULTS/$name-s$seed.json"
  done
  if [[ "${COMMIT:-0}" == 1 ]]; then
    git add "$RESULTS" && git commit -q -m "Critic remedies benchmark: $name, 2 seeds (raw results)" -- "$RESULTS" || true
  fi
done
$PY benchmarks/learning.py --report "$RESULTS" "$RESULTS"/*.json
