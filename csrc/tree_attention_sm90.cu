// launch_tree_attention_sm90: the TMA tensor maps of the caches, then the Hopper attention launch over
// (b, KV head) x 128-row query tiles x splits (false, launching nothing, where the device or the module
// lacks sm_90a code, a paged cache's block size is not one it takes, or the driver refuses the tensor
// maps); run_tree_attention (tree_attention.cu) writes the new keys and values before and merges the
// splits after. The tensor maps are encoded through the
// driver entry point that the runtime hands out (cudaGetDriverEntryPointByVersion): libcuda is not linked.
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000

#include <algorithm>

#include "tree_attention_sm90.cuh"

namespace ht {

namespace {

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess || found != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// A cache [B, S, Hkv, D] as a 4-d tensor map of dims (D, Hkv, S, B), innermost first, boxes of 64 head-dim
// values x 1 head x kBlockN keys x 1 row, 128-byte swizzled (wgmma_layout.h, tile_offset); keys past S read
// as zeros. A paged cache [num_blocks, page, Hkv, D]: dims (D, Hkv, page, num_blocks), boxes of
// min(page, kBlockN) keys (a piece of a tile; pieces of 8 rows and more keep the swizzle atoms whole).
// False when the driver refuses (e.g. strides that are no multiple of 16 bytes).
template <typename Traits>
bool encode_cache_map(CUtensorMap* map, void* cache, const TreeAttentionParams& p) {
  const auto encode = tensor_map_encoder();
  if (!encode) return false;
  const bool paged = p.block_table != nullptr;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(p.D), static_cast<cuuint64_t>(p.Hkv),
                              static_cast<cuuint64_t>(paged ? p.page : p.S), static_cast<cuuint64_t>(paged ? p.num_blocks : p.B)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(p.cache_stride_h) * 2, static_cast<cuuint64_t>(p.cache_stride_s) * 2,
                                 static_cast<cuuint64_t>(p.cache_stride_b) * 2};
  const cuuint32_t rows = paged ? std::min(p.page, Traits::kBlockN) : Traits::kBlockN;
  const cuuint32_t box[4] = {64, 1, rows, 1}, element_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type =
      p.dtype == DType::f16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  return encode(map, type, 4, cache, dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int D, typename T>
bool launch(const TreeAttentionParams& p, cudaStream_t stream) {
  using Traits = TreeAttentionSm90Traits<D, T>;
  CUtensorMap k_map, v_map;
  if (!encode_cache_map<Traits>(&k_map, p.k_cache, p) || !encode_cache_map<Traits>(&v_map, p.v_cache, p)) return false;
  const int G = p.Hq / p.Hkv;
  dim3 grid(p.B * p.Hkv, (p.T * G + Traits::kBlockM - 1) / Traits::kBlockM, p.num_splits);
  return HT_BOOL_SWITCH(p.num_splits > 1, SPLIT, [&] {
    auto kernel = tree_attention_sm90_kernel<Traits, SPLIT>;
    // A module built without sm_90a code (e.g. HT_KERNELS_CUDA_ARCHS="90") holds only the stub that traps,
    // which uses a handful of registers; the real kernel uses well over 100.
    cudaFuncAttributes attr{};
    check_cuda(cudaFuncGetAttributes(&attr, kernel), "tree_attention (sm90)");
    if (attr.numRegs < 32) return false;
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes),
               "tree_attention (sm90)");
    kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(p, k_map, v_map);
    check_launch("tree_attention (sm90)");
    return true;
  });
}

}  // namespace

bool launch_tree_attention_sm90(const TreeAttentionParams& p, cudaStream_t stream) {
  int device = 0, major = 0, minor = 0;
  check_cuda(cudaGetDevice(&device), "tree_attention");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "tree_attention");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "tree_attention");
  if (major != 9 || minor != 0 || (p.block_table && !sm90_takes_page(p.page))) return false;
  return HT_HEADDIM_SWITCH(p.D, D, [&] { return HT_HALF_SWITCH(p.dtype, T, [&] { return launch<D, T>(p, stream); }); });
}

}  // namespace ht
