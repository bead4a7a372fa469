// Shared device-side vocabulary: error checks, dtype conversion, compile-time switches.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ht_kernels.h"

namespace ht {

// Raises std::runtime_error (RuntimeError in Python) naming the op when the last launch failed,
// e.g. "compact_kv: CUDA error: no CUDA-capable device is detected".
inline void check_launch(const char* op) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": CUDA error: " + cudaGetErrorString(err));
}

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float(float x) { return x; }
template <> __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float(float x) { return x; }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }

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

// DTYPE_SWITCH(dtype, T, [&] { ... T ... }): T is float, __half or __nv_bfloat16.
#define HT_DTYPE_SWITCH(DTYPE, T, ...)                                         \
  [&] {                                                                        \
    switch (DTYPE) {                                                           \
      case ::ht::DType::f32: { using T = float; return __VA_ARGS__(); }        \
      case ::ht::DType::f16: { using T = __half; return __VA_ARGS__(); }       \
      default: { using T = __nv_bfloat16; return __VA_ARGS__(); }              \
    }                                                                          \
  }()
