#!/usr/bin/env bash
# One prepared run for a lent GPU (about 8 minutes on an H200, by estimate): builds the CUDA extension for the GPU at
# hand; first the opt-in Hopper tree-attention kernel (HT_KERNELS_CUDA_SM90=1; on other GPUs the flag
# changes nothing): its GPU tests and the cuda backend's tree-attention tests against fp64 references,
# contiguous and paged, memcheck and synccheck of the small case and its time on the target case; then compute-sanitizer's
# memcheck on a small case of each CUDA kernel, tunes the Triton tree attention's tiles and splits, the
# kernel benchmarks (device times from CUDA-graph replays; the kernels each provider launches at batch 1),
# then the GPU tests of the Triton tree attention, of the other kernels and of the decoding step as a CUDA
# graph, and the target table.
# Run from the repository root on the device machine, whose python3 holds torch, triton and pybind11 (the
# first command keeps the first part of SmolLM2's GGUF for gpu_decode.sh, the next call; see there):
#     cp gpu/smollm2.gguf.partaa /tmp/; bash benchmarks/gpu_check.sh   # under $OUT: gpu_check.log, 7 JSON files
# carrying gpu/smollm2.gguf.partaa and gpu/fi (FlashInfer's wheels), both made by benchmarks/gpu_prepare.sh.
# Record the figures, with the card's name, the date and the commit, in benchmarks/RESULTS.md.
set -uo pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HT_KERNELS_CACHE=${HT_KERNELS_CACHE:-/tmp/ht_kernels}
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)  # build for this GPU only
export HT_KERNELS_CUDA_ARCHS=${HT_KERNELS_CUDA_ARCHS:-$([ "$cc" = 90 ] && echo 90a || echo "$cc")}
step() { echo "== $*" | tee -a "$log"; "$@" 2>&1 | tee -a "$log" | tail -"${TAIL:-40}"; }
step nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
step python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
step git log -1 --format=%H
TAIL=8 step timeout 150 python3 -c "from ht_kernels.cuda.build import load; print('built', load().__file__)"
# The Hopper kernel: a probe first (the small case of each CUDA kernel; a hang or a fault shows within 40 s),
# then its tests, the sanitizers (synccheck: the consumers' turns and the mbarriers) and its time.
if TAIL=4 step env HT_KERNELS_CUDA_SM90=1 timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_ext.py \
    -k small_case; then
  TAIL=15 step env HT_KERNELS_CUDA_SM90=1 timeout 90 python3 -m pytest -q --maxfail=3 -p no:cacheprovider \
      tests/test_cuda_sm90.py::test_sm90_kernel_runs_and_agrees_with_the_default_kernel \
      tests/test_cuda_sm90.py::test_sm90_kernel_matches_reference tests/test_tree_attention.py tests/test_paged_kv.py -k cuda
  for tool in memcheck synccheck; do
    TAIL=4 step env HT_KERNELS_CUDA_SM90=1 timeout 45 compute-sanitizer --tool $tool --error-exitcode 3 \
        python3 -m pytest -q -p no:cacheprovider tests/test_cuda_ext.py -k small_case
  done
  step env HT_KERNELS_CUDA_SM90=1 timeout 60 python3 benchmarks/bench_tree_attention.py --providers cuda \
      --case Hkv=8,B=8,L=16384 --json "$out/tree_attention_sm90.json"
else
  echo "== the Hopper kernel failed its probe: its other steps are skipped" | tee -a "$log"
fi
TAIL=4 step timeout 45 compute-sanitizer --tool memcheck --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider \
    tests/test_cuda_ext.py -k small_case
step timeout 150 python3 benchmarks/tune_tree_attention.py --splits 1 --json "$out/tune_tree_attention.json"
step timeout 90 python3 benchmarks/bench_tree_attention.py --providers sdpa,triton,cuda --json "$out/tree_attention.json"
step timeout 40 python3 benchmarks/bench_tree_attention.py --providers sdpa,triton,cuda --case B=1,L=4096 --profile \
    --json "$out/tree_attention_profile.json"
# The peers on the target case. FlashInfer where gpu/fi holds its wheels (gpu_prepare.sh: FlashInfer and
# apache-tvm-ffi, which the image lacks): installed under /tmp/fi, on PYTHONPATH for this step only; its prefill
# module JIT-compiles on first use with the CUDA toolkit that built the extension above (torch's CUDA_HOME),
# linking an empty libcuda.so where that toolkit has no driver stubs.
peers=()
if ls gpu/fi/*.whl > /dev/null 2>&1 && TAIL=3 step python3 -m pip install -q --no-index --no-deps --no-compile \
    --target /tmp/fi gpu/fi/*.whl; then
  mkdir -p /tmp/fi/stub && gcc -shared -o /tmp/fi/stub/libcuda.so -Wl,-soname,libcuda.so.1 -x c /dev/null
  peers=(PYTHONPATH="$PYTHONPATH:/tmp/fi" FLASHINFER_WORKSPACE_BASE=/tmp/fi FLASHINFER_EXTRA_LDFLAGS=-L/tmp/fi/stub
         CUDA_HOME="${CUDA_HOME:-$(python3 -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME)')}")
fi
step env "${peers[@]}" timeout 120 python3 benchmarks/bench_tree_attention.py --providers sdpa,flex,flashinfer,triton,cuda \
    --case Hkv=8,B=8,L=16384,T=64 --json "$out/tree_attention_flex.json"
step timeout 45 python3 benchmarks/bench_hidden_transfer.py --providers matmul,auto,triton,cuda --json "$out/hidden_transfer.json"
step timeout 30 python3 benchmarks/bench_step_ops.py --json "$out/step_ops.json"
TAIL=15 step timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_tree_attention.py tests/test_paged_kv.py \
    -k "triton or split"
TAIL=15 step timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_ext.py tests/test_hidden_transfer.py \
    tests/test_compact_kv.py tests/test_paged_kv.py tests/test_verify_tree.py tests/test_decode_graphs.py
step python3 benchmarks/gpu_summary.py "$out"
