#!/usr/bin/env bash
# Transfer layer t, depth count K, the chain-attention ablation and Medusa, each trained for $STEPS steps
# on the data of the shipped recipe's run ($BASE/data.jsonl), then measured side by side on the dev
# prompts by bench_drafts.py (accuracy per depth, tau per tree, cosine similarity). Finished runs are
# kept, so an interrupted sweep continues where it stopped.
#
#   BASE=runs/smollm2 OUT=runs/ablations STEPS=60 bash benchmarks/ablations.sh [bench_drafts args...]
#
# DATA gives the data options of the base run (they must match its data_recipe.json, or the data is made again).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-runs/smollm2}
OUT=${OUT:-runs/ablations}
STEPS=${STEPS:-60}
DATA=${DATA:---prompts 800 --reading 200 --gen-tokens 192}
PY=${PY:-python}
[ -f "$BASE/data.jsonl" ] || { echo "no $BASE/data.jsonl: run the shipped recipe first (README, Training)"; exit 1; }

train() {  # name, weights file name, extra train args
  local dir="$OUT/$1" file=$2; shift 2
  [ -f "$dir/$file" ] && return
  mkdir -p "$dir"
  cp "$BASE/data.jsonl" "$BASE/data_recipe.json" "$dir/"
  $PY -m ht_kernels.train --out "$dir" --steps "$STEPS" $DATA "$@"
}

drafters=()
for t in 5 10 15 20 25; do
  train "t$t-k3" transfer.safetensors --layer "$t" --K 3
  drafters+=(--drafter "t$t-k3=$OUT/t$t-k3/transfer.safetensors")
done
for k in 2 4 5; do
  train "t15-k$k" transfer.safetensors --layer 15 --K "$k"
  drafters+=(--drafter "t15-k$k=$OUT/t15-k$k/transfer.safetensors")
done
train "t15-k3-nochain" transfer.safetensors --layer 15 --K 3 --no-chain
drafters+=(--drafter "t15-k3-nochain:nochain=$OUT/t15-k3-nochain/transfer.safetensors")
train "medusa-k3" medusa.safetensors --method medusa --K 3
drafters+=(--drafter "medusa-k3=$OUT/medusa-k3/medusa.safetensors")

$PY benchmarks/bench_drafts.py "${drafters[@]}" --similarity 16 --json "$OUT/drafts.json" --plot "$OUT/drafts.png" "$@"
