// hidden_transfer kernels: out[n, k, o] = sum_d x[n, d] w[k, o, d] + bias[k, o].
#pragma once

#include "common.cuh"

namespace ht {

// 16 consecutive elements (two 16-byte loads) at row[d0 .. d0 + 15], zero where d >= D or the row is
// out of range. Streaming (evict-first) loads for the weight, which is read once; cached loads for x.
template <bool STREAM>
__device__ __forceinline__ void load16(uint4 (&r)[2], const void* row, int d0, int D, bool valid) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int d = d0 + 8 * j;
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const char*>(row) + 2 * static_cast<int64_t>(d));
    r[j] = valid && d < D ? (STREAM ? __ldcs(src) : __ldg(src)) : make_uint4(0, 0, 0, 0);
  }
}

__device__ __forceinline__ uint32_t word(const uint4 (&r)[2], int i) {  // the i-th 32-bit word of 16 elements
  const uint4& v = r[i >> 2];
  const int w = i & 3;
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

// Tensor-core weight streaming for few rows (decoding: N <= 128 per block row). Block: 4 warps and
// 64 output features o of one map k; warp w owns o0 = 64 blockIdx.x + 16 w .. + 15 (the M side of
// the product, rows of w[k]), against 8 NT rows of x (the N side), blockIdx.z picking the row chunk.
// The d loop takes 64 at a time: lane (g = lane / 4, t = lane % 4) loads elements d0 + 16 t .. + 15
// of its two weight rows o0 + g, o0 + g + 8 and of x row n (g-th of each 8-row tile), so every load
// is 16 bytes wide. The reduction over d is order-free, so those 16 elements feed four k16 steps as
// the fragment positions {2t, 2t+1, 2t+8, 2t+9} of step s <- elements 4s .. 4s + 3: the same
// permutation of d on both operands. The next 64 weight columns are loaded before the current ones
// are used. Accumulates in fp32; the epilogue adds the bias and stores through out's strides.
template <typename T, int NT>
__global__ void __launch_bounds__(128) hidden_transfer_mma_kernel(HiddenTransferParams p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int k = blockIdx.y;
  const int o0 = blockIdx.x * 64 + warp * 16;
  const int n0 = blockIdx.z * 8 * NT;
  const char* w = static_cast<const char*>(p.w) + 2 * (k * p.w_stride_k);
  const void* w_lo = w + 2 * (static_cast<int64_t>(o0 + g) * p.w_stride_o);
  const void* w_hi = w + 2 * (static_cast<int64_t>(o0 + g + 8) * p.w_stride_o);
  const bool lo_ok = o0 + g < p.D, hi_ok = o0 + g + 8 < p.D;

  float acc[NT][4];
#pragma unroll
  for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  uint4 a_lo[2], a_hi[2], next_lo[2], next_hi[2];
  load16<true>(a_lo, w_lo, 16 * t, p.D, lo_ok);
  load16<true>(a_hi, w_hi, 16 * t, p.D, hi_ok);
#pragma unroll 1
  for (int d0 = 0; d0 < p.D; d0 += 64) {
    load16<true>(next_lo, w_lo, d0 + 64 + 16 * t, p.D, lo_ok);
    load16<true>(next_hi, w_hi, d0 + 64 + 16 * t, p.D, hi_ok);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int n = n0 + 8 * nt + g;
      uint4 x[2];
      load16<false>(x, static_cast<const char*>(p.x) + 2 * (static_cast<int64_t>(n) * p.x_stride_n),
                    d0 + 16 * t, p.D, n < p.N);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const uint32_t a[4] = {word(a_lo, 2 * s), word(a_hi, 2 * s), word(a_lo, 2 * s + 1), word(a_hi, 2 * s + 1)};
        const uint32_t b[2] = {word(x, 2 * s), word(x, 2 * s + 1)};
        mma_16816<T>(acc[nt], a, b);
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      a_lo[j] = next_lo[j];
      a_hi[j] = next_hi[j];
    }
  }
  // Accumulator (r, c) of the 16 x 8 tile: acc[0..1] at r = g, c = 2t, 2t+1; acc[2..3] at r = g + 8.
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int o = o0 + g + 8 * half;
    if (o >= p.D) continue;
    const float add = bias ? to_float(bias[k * p.bias_stride_k + o]) : 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int n = n0 + 8 * nt + 2 * t + c;
        if (n < p.N)
          out[n * p.out_stride_n + k * p.out_stride_k + o * p.out_stride_d] = from_float<T>(acc[nt][2 * half + c] + add);
      }
    }
  }
}

// Any dtype, any D: warp w of block (x, k) computes output feature o = 8 x + w of map k for every
// row, lanes striding over d, fp32 accumulation.
template <typename T>
__global__ void __launch_bounds__(256) hidden_transfer_simt_kernel(HiddenTransferParams p) {
  const int lane = threadIdx.x & 31;
  const int o = blockIdx.x * 8 + (threadIdx.x >> 5), k = blockIdx.y;
  if (o >= p.D) return;
  const T* w = static_cast<const T*>(p.w) + k * p.w_stride_k + o * p.w_stride_o;
  const T* bias = static_cast<const T*>(p.bias);
  const float add = bias ? to_float(bias[k * p.bias_stride_k + o]) : 0.f;
  T* out = static_cast<T*>(p.out);
  for (int n = 0; n < p.N; ++n) {
    const T* x = static_cast<const T*>(p.x) + n * p.x_stride_n;
    float sum = 0.f;
    for (int d = lane; d < p.D; d += 32) sum += to_float(x[d]) * to_float(w[d]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) out[n * p.out_stride_n + k * p.out_stride_k + o * p.out_stride_d] = from_float<T>(sum + add);
  }
}

}  // namespace ht
