// run_tree_attention: writes the new keys/values, then one attention launch over (b, KV head) x query
// tiles x splits, then the merge when split; dispatch on head dim (64, 128) and dtype (fp16, bf16). With
// p.sm90 the attention launch is the Hopper kernel's (tree_attention_sm90.cu) where it can run.
#include <algorithm>

#include "tree_attention.cuh"

namespace ht {

namespace {

template <int D, typename T>
void launch(const TreeAttentionParams& p, cudaStream_t stream, bool attention_done) {
  using Traits = TreeAttentionTraits<D, T>;
  const int G = p.Hq / p.Hkv;
  dim3 grid(p.B * p.Hkv, (p.T * G + Traits::kBlockM - 1) / Traits::kBlockM, p.num_splits);
  if (!attention_done) {
    HT_BOOL_SWITCH(p.num_splits > 1, SPLIT, [&] {
      auto kernel = tree_attention_kernel<Traits, SPLIT>;
      check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes),
                 "tree_attention");
      kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
    });
    check_launch("tree_attention");
  }
  if (p.num_splits > 1) {
    tree_attention_merge_kernel<T><<<p.B * p.T * p.Hq, D, 0, stream>>>(p);
    check_launch("tree_attention (merge)");
  }
}

}  // namespace

int tree_attention_num_splits(int B, int T, int Hq, int Hkv, int S, bool sm90) {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "tree_attention");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "tree_attention");
  const int block_m = sm90 ? 128 : 64, blocks = sm90 ? sms : 2 * sms;  // blocks in one wave (sm90: 1 per SM)
  const int tiles = B * Hkv * ((T * (Hq / Hkv) + block_m - 1) / block_m);
  if (tiles >= blocks) return 1;
  // As many splits as one wave of blocks holds: rounding up would start another, mostly idle wave.
  return std::max(1, std::min({blocks / tiles, S / kMinSplitKeys, 64}));
}

void run_tree_attention(const TreeAttentionParams& p, cudaStream_t stream) {
  if (p.B == 0 || p.T == 0) return;
  if (p.k_new) {
    tree_attention_write_kv_kernel<<<dim3(p.T, p.B), 128, 0, stream>>>(p);
    check_launch("tree_attention (cache write)");
  }
  if (p.dtype == DType::f32 || (p.D != 64 && p.D != 128))
    throw std::runtime_error("tree_attention: the CUDA kernel takes fp16/bf16 and head dims 64 and 128");
  const bool done = p.sm90 && launch_tree_attention_sm90(p, stream);
  HT_HEADDIM_SWITCH(p.D, D, [&] { HT_HALF_SWITCH(p.dtype, T, [&] { launch<D, T>(p, stream, done); }); });
}

}  // namespace ht
