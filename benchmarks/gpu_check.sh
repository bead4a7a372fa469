#!/usr/bin/env bash
# One prepared run for a lent GPU (about 6-8 minutes on an H100): builds the CUDA extension, runs the GPU
# tests of the kernels (cuda and triton backends against fp64 references) and of the decoding step as a
# CUDA graph, compute-sanitizer's memcheck on a small case of each CUDA kernel, then the kernel benchmarks.
# Run from the repository root on the device machine, whose python3 holds torch, triton and pybind11:
#     bash benchmarks/gpu_check.sh        # logs and JSON under $OUT (or benchmarks/results)
# Record the figures, with the card's name, the date and the commit, in benchmarks/RESULTS.md.
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HT_KERNELS_CACHE=${HT_KERNELS_CACHE:-/tmp/ht_kernels}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
( time timeout 150 python3 -c "from ht_kernels.cuda.build import load; print('built', load().__file__)" ) 2>&1 \
    | tee "$out/build.txt" | tail -8
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_ext.py tests/test_tree_attention.py \
    tests/test_hidden_transfer.py tests/test_compact_kv.py tests/test_verify_tree.py tests/test_decode_graphs.py 2>&1 | tee "$out/tests.txt" | tail -15
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider \
    tests/test_cuda_ext.py -k small_case 2>&1 | tee "$out/memcheck.txt" | tail -4
timeout 150 python3 benchmarks/bench_tree_attention.py --providers sdpa,triton,cuda \
    --json "$out/tree_attention.json" 2>&1 | tee "$out/bench_tree_attention.txt"
timeout 60 python3 benchmarks/bench_tree_attention.py --providers sdpa,flex,triton,cuda --case Hkv=8,B=8,L=16384,T=64 \
    --json "$out/tree_attention_flex.json" 2>&1 | tee "$out/bench_tree_attention_flex.txt"
timeout 60 python3 benchmarks/bench_hidden_transfer.py --providers matmul,triton,cuda \
    --json "$out/hidden_transfer.json" 2>&1 | tee "$out/bench_hidden_transfer.txt"
timeout 40 python3 benchmarks/bench_step_ops.py --json "$out/step_ops.json" 2>&1 | tee "$out/bench_step_ops.txt"
python3 benchmarks/gpu_summary.py "$out" 2>&1 | tee "$out/summary.txt"
