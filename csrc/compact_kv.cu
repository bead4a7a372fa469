// run_compact_kv: picks the widest copy unit the layout allows (up to 16 bytes of a contiguous D, else
// one element) and a block size whose staging buffer fits 48 KB of shared memory; one launch moves k
// and v of every layer.
#include "compact_kv.cuh"

namespace ht {

namespace {

template <typename Unit>
void launch(const CompactKvParams& p, int64_t units, int64_t step, cudaStream_t stream) {
  const int64_t columns = units * p.H;
  const int64_t per_thread = static_cast<int64_t>(p.A) * sizeof(Unit);
  int threads = 128;
  while (threads > 1 && (threads / 2 >= columns || threads * per_thread > 48 * 1024)) threads /= 2;
  if (threads * per_thread > 48 * 1024)
    throw std::runtime_error("compact_kv: accepted has too many columns (A = " + std::to_string(p.A) + ")");
  dim3 grid(static_cast<unsigned>((columns + threads - 1) / threads), p.B, (p.v ? 2 : 1) * p.L);
  size_t smem = static_cast<size_t>(threads * per_thread);
  HT_BOOL_SWITCH(p.accepted_i64, ACC64, [&] {
    HT_BOOL_SWITCH(p.accept_len_i64, LEN64, [&] {
      compact_kv_kernel<Unit, ACC64, LEN64><<<grid, threads, smem, stream>>>(p, units, step);
    });
  });
}

}  // namespace

void run_compact_kv(const CompactKvParams& p, cudaStream_t stream) {
  if (p.L == 0 || p.B == 0 || p.H == 0 || p.D == 0) return;
  const int64_t e = p.elem_bytes;
  if (p.stride_d != e || p.D == 1) {  // one element per unit, stride_d apart
    if (e == 2) launch<uint16_t>(p, p.D, p.stride_d, stream);
    else if (e == 4) launch<uint32_t>(p, p.D, p.stride_d, stream);
    else launch<uint2>(p, p.D, p.stride_d, stream);
  } else {
    const int64_t row = p.D * e;
    const uint64_t bits = static_cast<uint64_t>(row | p.stride_l | p.stride_b | p.stride_s | p.stride_h) |
                          reinterpret_cast<uintptr_t>(p.k) | reinterpret_cast<uintptr_t>(p.v);
    if (bits % 16 == 0) launch<uint4>(p, row / 16, 16, stream);
    else if (bits % 8 == 0) launch<uint2>(p, row / 8, 8, stream);
    else if (bits % 4 == 0) launch<uint32_t>(p, row / 4, 4, stream);
    else launch<uint16_t>(p, row / 2, 2, stream);
  }
  check_launch("compact_kv");
}

}  // namespace ht
