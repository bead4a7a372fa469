// Hopper (sm_90a) PTX wrappers: warpgroup MMA (wgmma), mbarriers, TMA tile loads, register reallocation.
// Every body is compiled only for sm_90a (HT_SM90A); for other targets these functions are empty, and the
// kernels that call them guard their own bodies the same way, so the sm_80 build never sees the PTX.
#pragma once

#include <cuda.h>  // CUtensorMap (a type only: nothing of libcuda is linked)

#include <cstdint>

#include "common.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HT_SM90A 1
#endif

namespace ht {
namespace sm90 {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- mbarriers -----------------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
#ifdef HT_SM90A
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#endif
}
// Make the initialised barriers visible to the other threads and to the async proxy (TMA).
__device__ __forceinline__ void mbar_init_fence() {
#ifdef HT_SM90A
  asm volatile("fence.mbarrier_init.release.cluster;\nfence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
#ifdef HT_SM90A
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}
// Arrive and announce `bytes` of asynchronous transactions (the TMA loads) that complete the phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#ifdef HT_SM90A
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
#endif
}
// Wait until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#ifdef HT_SM90A
  asm volatile(
      "{\n.reg .pred done;\n"
      "wait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
#endif
}

// ---- TMA -------------------------------------------------------------------------------------------------
// One box of a 4-d tensor map (coordinates innermost first) into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint64_t* bar) {
#ifdef HT_SM90A
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
      ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
      "r"(smem_addr(bar)) : "memory");
#endif
}

// Order this thread's ordinary shared-memory writes before later reads by the async proxy (wgmma, TMA).
__device__ __forceinline__ void fence_proxy_async() {
#ifdef HT_SM90A
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// A 4-byte store to shared memory (the compiler keeps it, and what it depends on, ahead of later waits).
__device__ __forceinline__ void st_shared_f32(uint32_t addr, float v) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}
// Named barrier over `threads` threads (a warpgroup: 128), ids 1.. (0 is __syncthreads).
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Arrive at named barrier `id` of `threads` threads without waiting (the other side waits with bar.sync).
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- register reallocation ---------------------------------------------------------------------------
template <int REGS> __device__ __forceinline__ void regs_dealloc() {
#ifdef HT_SM90A
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
#endif
}
template <int REGS> __device__ __forceinline__ void regs_alloc() {
#ifdef HT_SM90A
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
#endif
}

// ---- warpgroup MMA ---------------------------------------------------------------------------------------
__device__ __forceinline__ void wgmma_fence() {
#ifdef HT_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef HT_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int PENDING> __device__ __forceinline__ void wgmma_wait() {
#ifdef HT_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
#endif
}
// Keep the compiler from moving reads or writes of these registers across an asynchronous wgmma's issue
// or wait (it does not know that the hardware reads and writes them in between).
template <int N> __device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N> __device__ __forceinline__ void fence_regs(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

#define HT_ACC8(d, i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                      "+f"(d[i + 6]), "+f"(d[i + 7])
#define HT_ACC32(d, i) HT_ACC8(d, i), HT_ACC8(d, i + 8), HT_ACC8(d, i + 16), HT_ACC8(d, i + 24)
#define HT_REGS32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
                  "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define HT_REGS64 HT_REGS32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
                  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// D[64 x N] (+)= A B with fp32 accumulators (N / 2 per thread, acc_row/acc_col order); scale_d = 0
// overwrites D. ss: A and B from shared memory (descriptors, both K-major). rs: A from registers (4 per
// thread, a_row/a_col order), B from shared memory MN-major (transposed, tnspB = 1).
template <typename T, int N> struct Wgmma;

#define HT_WGMMA(TYPE, PTX_TYPE)                                                                              \
  template <> struct Wgmma<TYPE, 128> {                                                                        \
    __device__ __forceinline__ static void ss(float (&d)[64], uint64_t a, uint64_t b, int scale_d) {          \
      HT_WGMMA_BODY(asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                 \
                                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " {" HT_REGS64 \
                                 "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                            \
                                 : HT_ACC32(d, 0), HT_ACC32(d, 32) : "l"(a), "l"(b), "r"(scale_d));)           \
    }                                                                                                          \
    __device__ __forceinline__ static void rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b, int scale_d) { \
      HT_WGMMA_BODY(asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                 \
                                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX_TYPE "." PTX_TYPE " {" HT_REGS64 \
                                 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                              \
                                 : HT_ACC32(d, 0), HT_ACC32(d, 32)                                             \
                                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d));)         \
    }                                                                                                          \
  };                                                                                                           \
  template <> struct Wgmma<TYPE, 64> {                                                                         \
    __device__ __forceinline__ static void rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b, int scale_d) { \
      HT_WGMMA_BODY(asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                 \
                                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX_TYPE "." PTX_TYPE " {" HT_REGS32 \
                                 "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                              \
                                 : HT_ACC32(d, 0)                                                              \
                                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d));)         \
    }                                                                                                          \
  };

#ifdef HT_SM90A
#define HT_WGMMA_BODY(...) __VA_ARGS__
#else
#define HT_WGMMA_BODY(...)
#endif
HT_WGMMA(__nv_bfloat16, "bf16")
HT_WGMMA(__half, "f16")
#undef HT_WGMMA
#undef HT_WGMMA_BODY

}  // namespace sm90
}  // namespace ht
