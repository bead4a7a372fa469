// compact_kv_kernel: move the accepted tree nodes' K/V to the slots behind each row's prefix.
#pragma once

#include "common.cuh"

namespace ht {

template <bool I64>
__device__ __forceinline__ int64_t load_index(const void* p, int64_t i) {
  return I64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

// The byte offset of slot j of row b (common.cuh's slot_offset with the caches' byte strides).
__device__ __forceinline__ int64_t slot_offset(const CompactKvParams& p, int b, int64_t j, bool& bad) {
  return slot_offset(p.block_table, p.table_stride_b, p.table_stride_n, p.page, p.num_blocks, p.stride_b, p.stride_s,
                     b, j, bad);
}

// Grid (column blocks, B, L or 2 L with v); a thread owns one column (h, u) of one layer and row of k
// or v: `step` bytes apart, Unit wide (several elements of a contiguous D, or one element). It stages the
// column's sources in shared memory ([A][blockDim] Units) before writing any destination, so any index
// list is safe, overlapping ones included. Identity moves, and moves from or to a bad block id, are skipped.
template <typename Unit, bool ACC64, bool LEN64>
__global__ void compact_kv_kernel(CompactKvParams p, int64_t units, int64_t step) {
  extern __shared__ __align__(16) unsigned char smem[];
  Unit* stage = reinterpret_cast<Unit*>(smem);
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= units * p.H) return;
  const int b = blockIdx.y, l = blockIdx.z % p.L;
  unsigned char* cache = static_cast<unsigned char*>(blockIdx.z < p.L ? p.k : p.v);
  unsigned char* base = cache + l * p.stride_l + (col / units) * p.stride_h + (col % units) * step;
  const int64_t n = p.cache_seqlens[b];
  const int count = static_cast<int>(load_index<LEN64>(p.accept_len, b));
  for (int i = 0; i < count; ++i) {
    const int64_t src = load_index<ACC64>(p.accepted, b * p.accepted_stride + i);
    if (src == i) continue;
    bool bad;
    const int64_t from = slot_offset(p, b, n + src, bad);
    if (!bad) stage[i * blockDim.x + threadIdx.x] = *reinterpret_cast<const Unit*>(base + from);
  }
  for (int i = 0; i < count; ++i) {
    const int64_t src = load_index<ACC64>(p.accepted, b * p.accepted_stride + i);
    if (src == i) continue;
    bool bad_src, bad_dst;
    slot_offset(p, b, n + src, bad_src);  // its source was staged only when good
    const int64_t to = slot_offset(p, b, n + i, bad_dst);
    if (!bad_src && !bad_dst) *reinterpret_cast<Unit*>(base + to) = stage[i * blockDim.x + threadIdx.x];
  }
}

}  // namespace ht
