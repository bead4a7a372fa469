// Shared device-side vocabulary: error checks, dtype conversion, compile-time switches.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ht_kernels.h"

namespace ht {

// Raise std::runtime_error (RuntimeError in Python) naming the op when a CUDA call or the last launch
// failed, e.g. "compact_kv: CUDA error: no CUDA-capable device is detected".
inline void check_cuda(cudaError_t err, const char* op) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": CUDA error: " + cudaGetErrorString(err));
}
inline void check_launch(const char* op) { check_cuda(cudaGetLastError(), op); }

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float(float x) { return x; }
template <> __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float(float x) { return x; }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }

// 2^x on the special-function unit, results below 2^-126 flushed to zero: the softmax's probabilities are
// at most 1 against a sum of at least 1, so such values vanish anyway. exp2f keeps them, at the cost of a
// range test and two multiplies around every exponent.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// One m16n8k16 tensor-core product with fp32 accumulation: acc += A (16 x 16, row) * B (16 x 8, col).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ldmatrix: four 8 x 8 b16 matrices from shared memory, lanes 8 m .. 8 m + 7 giving the row addresses of
// matrix m; TRANS delivers them transposed (the B operand from a row-major [k][n] tile).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  if (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// 16-byte asynchronous copy global -> shared; zero-fills the destination when !valid (nothing is read).
__device__ __forceinline__ void cp_async_16(void* smem, const void* global, bool valid) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(global), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING)); }

// Two floats as one register of two 16-bit values (the first in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Row b's cache length lies outside [0, S - T]: the kernels touch none of its cache and write NaN.
__device__ __forceinline__ bool bad_length(const TreeAttentionParams& p, int b) {
  const int n = p.cache_seqlens[b];
  return n < 0 || n > p.S - p.T;
}

// The offset of slot j of row b: b stride_b + j stride_s for a contiguous cache (table null), else
// block stride_b + (j % page) stride_s with block = table[b table_stride_b + (j / page) table_stride_n];
// bad: that block id lies outside [0, num_blocks) (then the offset is 0 and must not be used).
__device__ __forceinline__ int64_t slot_offset(const int32_t* table, int64_t table_stride_b, int64_t table_stride_n,
                                               int page, int num_blocks, int64_t stride_b, int64_t stride_s, int b,
                                               int64_t j, bool& bad) {
  bad = false;
  if (!table) return b * stride_b + j * stride_s;
  const int block = table[b * table_stride_b + (j / page) * table_stride_n];
  bad = block < 0 || block >= num_blocks;
  return bad ? 0 : block * stride_b + (j % page) * stride_s;
}

// The element offset of cache position j of row b (KV head 0) in k_cache / v_cache (slot_offset).
__device__ __forceinline__ int64_t cache_offset(const TreeAttentionParams& p, int b, int j, bool& bad) {
  return slot_offset(p.block_table, p.table_stride_b, p.table_stride_n, p.page, p.num_blocks, p.cache_stride_b,
                     p.cache_stride_s, b, j, bad);
}

}  // namespace ht

// BOOL_SWITCH(cond, NAME, [&] { ... NAME ... }): the lambda runs with NAME a constexpr bool.
#define HT_BOOL_SWITCH(COND, NAME, ...)  \
  [&] {                                  \
    if (COND) {                          \
      constexpr static bool NAME = true; \
      return __VA_ARGS__();              \
    } else {                             \
      constexpr static bool NAME = false;\
      return __VA_ARGS__();              \
    }                                    \
  }()

// HALF_SWITCH(dtype, T, [&] { ... T ... }): T is __half (f16) or __nv_bfloat16 (any other dtype).
#define HT_HALF_SWITCH(DTYPE, T, ...)                                          \
  [&] {                                                                        \
    if ((DTYPE) == ::ht::DType::f16) { using T = __half; return __VA_ARGS__(); } \
    using T = __nv_bfloat16;                                                   \
    return __VA_ARGS__();                                                      \
  }()

// HEADDIM_SWITCH(d, NAME, [&] { ... NAME ... }): NAME is the constexpr int 64 (d <= 64) or 128.
#define HT_HEADDIM_SWITCH(HEADDIM, NAME, ...)                                  \
  [&] {                                                                        \
    if ((HEADDIM) <= 64) { constexpr static int NAME = 64; return __VA_ARGS__(); } \
    constexpr static int NAME = 128;                                           \
    return __VA_ARGS__();                                                      \
  }()

// DTYPE_SWITCH(dtype, T, [&] { ... T ... }): T is float, __half or __nv_bfloat16.
#define HT_DTYPE_SWITCH(DTYPE, T, ...)                                         \
  [&] {                                                                        \
    switch (DTYPE) {                                                           \
      case ::ht::DType::f32: { using T = float; return __VA_ARGS__(); }        \
      case ::ht::DType::f16: { using T = __half; return __VA_ARGS__(); }       \
      default: { using T = __nv_bfloat16; return __VA_ARGS__(); }              \
    }                                                                          \
  }()
