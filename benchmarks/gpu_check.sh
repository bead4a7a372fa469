#!/usr/bin/env bash
# One prepared run for a lent GPU (about 6-8 minutes): the GPU tests of the kernels, then the kernel
# benchmarks. Run from the repository root on the device machine, whose python3 holds torch and triton:
#     bash benchmarks/gpu_check.sh        # logs and JSON under $OUT (or benchmarks/results)
# Record the figures, with the card's name, the date and the commit, in benchmarks/RESULTS.md.
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_tree_attention.py tests/test_hidden_transfer.py \
    tests/test_compact_kv.py tests/test_verify_tree.py 2>&1 | tee "$out/tests.txt" | tail -15
timeout 240 python3 benchmarks/bench_tree_attention.py --providers sdpa,triton \
    --json "$out/tree_attention.json" 2>&1 | tee "$out/bench_tree_attention.txt"
timeout 90 python3 benchmarks/bench_hidden_transfer.py --providers matmul,triton \
    --json "$out/hidden_transfer.json" 2>&1 | tee "$out/bench_hidden_transfer.txt"
