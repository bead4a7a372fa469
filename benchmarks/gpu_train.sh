#!/usr/bin/env bash
# Data and training on a lent GPU (issue: drafts at scale): the dataset's answers in batches of 256, then
# the draft heads (hidden transfer, its variants, Medusa) on it, each measured on the dev prompts.
# The prompts come from the committed pools (datasets/*/pool.npz: documentation, open-ended, German), so the
# device machine needs no Debian sources. Prepare on this machine:
#     split -n 2 "$(python -c 'from ht_kernels.loading import _smollm2_path; print(_smollm2_path())')" gpu/smollm2.gguf.part
# then carry gpu/ (ignored) in two calls, one half of the GGUF each, and in the second run, from the
# repository root on the device machine (python3 with torch):
#     GGUF=gpu/smollm2.gguf bash benchmarks/gpu_train.sh   # under $OUT: the dataset, the runs and their logs
# STEPS, BATCH, SHARD_SIZE, MINUTES, DEVICE and BENCH (bench_drafts' prompt options) override the defaults;
#     DEVICE=cpu STEPS=2 BATCH=1 SHARD_SIZE=8 MINUTES=0 BENCH="--limit 2 --max-new-tokens 8" is a smoke test here.
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
device=${DEVICE:-cuda} steps=${STEPS:-1000} batch=${BATCH:-16} minutes=${MINUTES:-2} shard_size=${SHARD_SIZE:-256}
bench=${BENCH:---stride 5}
[ -f "$GGUF" ] || cat "$GGUF".part* > "$GGUF"
step() { echo "== $*" | tee -a "$out/gpu_train.log"; "$@" 2>&1 | tee -a "$out/gpu_train.log" | tail -"${TAIL:-6}"; }
[ "$device" = cuda ] && step nvidia-smi --query-gpu=name,memory.total --format=csv
step git log -1 --format=%H
datasets=()
for pool in docs:smollm2-135m open:smollm2-135m-open german:smollm2-135m-german; do  # --tasks : committed pool
    step python3 -m ht_kernels.train.dataset --out "$out/dataset-${pool%%:*}" --tasks "${pool%%:*}" --model "$GGUF" \
        --device "$device" --pool "datasets/${pool#*:}/pool.npz" --gen-batch 256 --shard-size "$shard_size" --minutes "$minutes"
    datasets+=(--dataset "$out/dataset-${pool%%:*}")
done
train() {  # name, then the options of python -m ht_kernels.train
    local name=$1; shift
    step python3 -m ht_kernels.train --out "$out/$name" --model "$GGUF" --device "$device" "${datasets[@]}" \
        --layer 20 --steps "$steps" --batch-size "$batch" --eval-every 250 "$@"
}
train ht-t20
train ht-t20-mlp64 --mlp-rank 64
train ht-t20-extra15 --extra-layer 15
train ht-t20-recall8 --recall-k 8
train medusa --method medusa
drafters=()
for run in ht-t20 ht-t20-mlp64 ht-t20-extra15 ht-t20-recall8; do drafters+=(--drafter "$run=$out/$run/transfer.safetensors"); done
TAIL=40 step python3 benchmarks/bench_drafts.py --model "$GGUF" --device "$device" $bench --trees default,dynamic16,dynamic64 \
    --drafter old=ht_kernels/weights/smollm2-135m.safetensors "${drafters[@]}" \
    --drafter "medusa=$out/medusa/medusa.safetensors" --json "$out/drafts.json"
