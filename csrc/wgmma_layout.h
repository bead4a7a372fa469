// Index math of the Hopper (sm_90a) tree attention, shared by the kernel and a host-only check
// (tests/csrc/wgmma_layout_check.cpp): which accumulator register of which thread holds which element of a
// warpgroup MMA tile, the 128-byte swizzled shared-memory layout of a tile, the shared-memory matrix
// descriptor, and which accumulator registers make the A fragments of P. Plain integer functions, no CUDA
// headers, so that a C++ compiler can run them on the host.
//
// Terms (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"): a warpgroup is 4 consecutive
// warps (128 threads); wgmma.mma_async m64nNk16 computes D[64 x N] (+)= A[64 x 16] B[16 x N]. Warp w of the
// warpgroup owns rows 16 w .. 16 w + 15 of D and of A; within a warp, lane l has g = l / 4 and t = l % 4,
// as in mma.sync m16n8k16.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define HT_HD __host__ __device__ __forceinline__
#else
#define HT_HD inline
#endif

namespace ht {
namespace sm90 {

// ---- Accumulator fragment of a 64 x N fp32 tile (N / 2 registers per thread) -----------------------
// Register i of thread (warp w, lane l): column block i / 4 of 8 columns, then (row g, cols 2t, 2t+1),
// (row g + 8, cols 2t, 2t+1).
HT_HD constexpr int acc_row(int warp, int lane, int i) { return 16 * warp + lane / 4 + 8 * ((i / 2) % 2); }
HT_HD constexpr int acc_col(int lane, int i) { return 8 * (i / 4) + 2 * (lane % 4) + i % 2; }
// Which of the thread's two rows (0: g, 1: g + 8) register i belongs to.
HT_HD constexpr int acc_half(int i) { return (i / 2) % 2; }

// ---- A operand from registers, 64 x 16 of 16-bit values (4 registers of 2 values per thread) --------
// Register j, half h (h = 0: the low 16 bits): row g + 8 (j % 2), column 2t + 8 (j / 2) + h.
HT_HD constexpr int a_row(int warp, int lane, int j) { return 16 * warp + lane / 4 + 8 * (j % 2); }
HT_HD constexpr int a_col(int lane, int j, int h) { return 2 * (lane % 4) + 8 * (j / 2) + h; }

// P as the A operand of O += P V: the A fragment of k-step kk (keys 16 kk .. 16 kk + 15) register j,
// half h is accumulator register p_source(kk, j, h) of the same thread (the S tile's layout matches the A
// layout of the next product, so no data moves between threads).
HT_HD constexpr int p_source(int kk, int j, int h) { return 8 * kk + 4 * (j / 2) + 2 * (j % 2) + h; }

// ---- 128-byte swizzle ----------------------------------------------------------------------------------
// Within each 1024-byte atom (8 rows of 128 bytes, 1024-byte aligned), the 16-byte chunk index (address
// bits 4..6) is XORed with the row index within the atom (bits 7..9): CUTLASS's Swizzle<3, 4, 3>, the
// layout TMA writes with CU_TENSOR_MAP_SWIZZLE_128B and wgmma reads with descriptor swizzle mode 1.
HT_HD constexpr uint32_t swizzle128(uint32_t offset) { return offset ^ (((offset >> 7) & 7u) << 4); }

// A tile of `rows` rows of D 16-bit values, stored as D / 64 column blocks, each `rows` x 128 bytes
// (64 values per row), 128-byte swizzled: the byte offset of 16-byte chunk `chunk` (values 8 chunk ..
// 8 chunk + 7) of row `row`. rows is a multiple of 8 and the tile 1024-byte aligned. This is what one TMA
// box of 64 x rows lands as, one box per column block.
HT_HD constexpr uint32_t tile_offset(int rows, int row, int chunk) {
  return swizzle128(static_cast<uint32_t>((chunk / 8) * rows * 128 + row * 128 + (chunk % 8) * 16));
}

// ---- Shared-memory matrix descriptor (64 bits) ---------------------------------------------------------
// bits 0..13: start address >> 4; 16..29: leading-dimension byte offset >> 4; 32..45: stride-dimension
// byte offset >> 4; 49..51: base offset (0: atoms 1024-byte aligned); 62..63: swizzle (1: 128-byte).
constexpr int kSwizzle128 = 1;
HT_HD constexpr uint64_t make_desc(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return (static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4)) | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) | (static_cast<uint64_t>(kSwizzle128) << 62);
}
HT_HD constexpr uint32_t desc_addr(uint64_t d) { return static_cast<uint32_t>(d & 0x3FFFu) << 4; }
HT_HD constexpr uint32_t desc_lbo(uint64_t d) { return static_cast<uint32_t>((d >> 16) & 0x3FFFu) << 4; }
HT_HD constexpr uint32_t desc_sbo(uint64_t d) { return static_cast<uint32_t>((d >> 32) & 0x3FFFu) << 4; }
HT_HD constexpr int desc_swizzle(uint64_t d) { return static_cast<int>(d >> 62); }

// The operands of the kernel's two products, as descriptors of 16 k-values:
// - K-major (A = Q, B = K of S = Q K^T): row mn, k-values 16 kk .. 16 kk + 15 of a tile_offset tile with
//   `rows` rows. k-step kk lies in column block kk / 4 at byte 32 (kk % 4) of the (unswizzled) row; 8-row
//   groups are 1024 bytes apart (SBO); LBO is unused for swizzled K-major layouts (1 by convention).
HT_HD constexpr uint64_t desc_k_major(uint32_t tile_addr, int rows, int kk) {
  return make_desc(tile_addr + static_cast<uint32_t>((kk / 4) * rows * 128 + (kk % 4) * 32), 16, 1024);
}
// - MN-major (B = V of O = P V, with tnspB): k = key, n = d. Keys 16 kk .. 16 kk + 15 start at row
//   16 kk; 8-key groups are 1024 bytes apart (SBO), 64-wide column blocks of d rows * 128 bytes (LBO).
HT_HD constexpr uint64_t desc_mn_major(uint32_t tile_addr, int rows, int kk) {
  return make_desc(tile_addr + static_cast<uint32_t>(kk * 16 * 128), static_cast<uint32_t>(rows * 128), 1024);
}

// How the tensor cores read a descriptor (PTX ISA canonical layouts with 128-byte swizzle, in CuTe terms
// with T = 8 16-bit values per 16 bytes), as the byte address of element (mn, k), k < 16, applying the
// swizzle to the absolute address bits:
//   K-major:  ((8, m), (T, 2k)) : ((8T, SBO), (1, T))        -> start + (mn / 8) SBO + (mn % 8) 128 + 2 k
//   MN-major: ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO)) -> start + (mn / 64) LBO + (mn % 64) 2
//                                                                  + (k / 8) SBO + (k % 8) 128
HT_HD constexpr uint32_t desc_read_k_major(uint64_t d, int mn, int k) {
  return swizzle128(desc_addr(d) + static_cast<uint32_t>((mn / 8) * desc_sbo(d) + (mn % 8) * 128 + 2 * k));
}
HT_HD constexpr uint32_t desc_read_mn_major(uint64_t d, int mn, int k) {
  return swizzle128(desc_addr(d) + static_cast<uint32_t>((mn / 64) * desc_lbo(d) + (mn % 64) * 2 +
                                                         (k / 8) * desc_sbo(d) + (k % 8) * 128));
}

}  // namespace sm90
}  // namespace ht
