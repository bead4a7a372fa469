// The host-side interface of the CUDA kernels: one params struct and one launcher per op. Torch-free:
// pointers, sizes and strides (in elements unless named *_bytes) and a cudaStream_t. The launchers
// raise std::runtime_error when a launch fails (e.g. without a GPU).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ht {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// compact_kv: cache[l, b, n + i] = old cache[l, b, n + accepted[b, i]] for i < accept_len[b], n =
// cache_seqlens[b], every layer, in k and (when not null) v, which share their strides. The caches
// are [L, B, S, H, D] with elements of elem_bytes; all sources of a row are read before any of its
// slots is written. Paged caches (block_table non-null): [L, num_blocks, page, H, D], stride_b steps one
// block, and slot j of row b is slot j % page of block block_table[b * table_stride_b + (j / page) *
// table_stride_n]; a move whose block id lies outside [0, num_blocks) is skipped (nothing is read or
// written through it).
struct CompactKvParams {
  void* k;
  void* v;                             // or null: k only
  int64_t stride_l, stride_b, stride_s, stride_h, stride_d;  // bytes
  int L, B, H, D, elem_bytes;
  const int32_t* block_table;          // or null: contiguous [L, B, S, H, D] caches
  int64_t table_stride_b, table_stride_n;
  int page, num_blocks;
  const int32_t* cache_seqlens;        // [B]
  const void* accepted;                // [B, A] int32 or int64, row stride accepted_stride
  int64_t accepted_stride;
  bool accepted_i64;
  const void* accept_len;              // [B] int32 or int64
  bool accept_len_i64;
  int A;
};
void run_compact_kv(const CompactKvParams& p, cudaStream_t stream);

// verify_tree_greedy: the greedily accepted root path of each row's token tree. All int64 and
// contiguous; parents is [T] (parents_stride_b = 0) or [B, T] (parents_stride_b = T).
struct VerifyTreeParams {
  const int64_t* draft;                // [B, T]
  const int64_t* parents;              // [T] or [B, T]
  int64_t parents_stride_b;
  const int64_t* target;               // [B, T]
  int64_t* accepted;                   // [B, T] out: path node ids, -1 padded
  int64_t* accept_len;                 // [B] out
  int B, T;
};
void run_verify_tree_greedy(const VerifyTreeParams& p, cudaStream_t stream);

// hidden_transfer: out[n, k, :] = x[n] @ w[k].T + bias[k] for x [N, D], w [K, D, D], bias [K, D]
// (or null), out [N, K, D] with any strides. x rows and w rows have a contiguous last dim.
struct HiddenTransferParams {
  const void* x;
  int64_t x_stride_n;
  const void* w;
  int64_t w_stride_k, w_stride_o;
  const void* bias;
  int64_t bias_stride_k;
  void* out;
  int64_t out_stride_n, out_stride_k, out_stride_d;
  int N, K, D;
  DType dtype;
};
// Which kernel run_hidden_transfer picks: "mma" (tensor cores, fp16/bf16, D % 8 == 0, 16-byte
// aligned rows) or "simt" (any dtype and D).
const char* hidden_transfer_kernel_name(const HiddenTransferParams& p);
void run_hidden_transfer(const HiddenTransferParams& p, cudaStream_t stream);

// tree_attention: T tree queries per row over its cache prefix [0, n) (unmasked) and the tree slots
// [n, n + T) (tree_mask), n = cache_seqlens[b]. q [B, T, Hq, D]; caches [B, S, Hkv, D] (k and v share
// strides); k_new, v_new [B, T, Hkv, D] (or null) are first written to the tree slots; tree_mask bool
// [T, T] (mask_stride_b = 0) or [B, T, T], rows contiguous; out [B, T, Hq, D]; lse [B, Hq, T] fp32
// (natural log). fp16/bf16, D 64 or 128, every last dim contiguous and rows 16-byte aligned. With
// num_splits > 1 the key range is split over that many blocks, which write fp32 partials to
// out_partial [splits, B, T, Hq, D] and lse_partial [splits, B, Hq, T], merged in a fixed order.
// cache_seqlens is read on the device only: a row with n outside [0, S - T] gets NaN out and lse, and
// none of its cache slots is read or written.
// Paged caches (block_table non-null, flash-attn's convention): k_cache, v_cache are [num_blocks, page,
// Hkv, D] (cache_stride_b steps one block, cache_stride_s one slot), position j of row b lives at slot
// j % page of block block_table[b * table_stride_b + (j / page) * table_stride_n], and S is the row's
// logical capacity max_blocks * page. A row that uses a block id outside [0, num_blocks) gets NaN out
// and lse, and nothing is read or written through that id (the tree slots under good ids are written).
// sm90: use the Hopper kernel (tree_attention_sm90.cuh: wgmma, TMA, warp specialisation) when the device
// is compute capability 9.0 and the module holds sm_90a code; else, and when paged caches have a block size
// it does not take (sm90_takes_page) or the caches cannot be described by a TMA tensor map, the default
// kernel runs. Opt-in (HT_KERNELS_CUDA_SM90=1 in
// Python) until a GPU run has validated it.
struct TreeAttentionParams {
  const void* q;
  int64_t q_stride_b, q_stride_t, q_stride_h;
  void* k_cache;
  void* v_cache;
  int64_t cache_stride_b, cache_stride_s, cache_stride_h;
  const int32_t* block_table;          // or null: contiguous [B, S, Hkv, D] caches
  int64_t table_stride_b, table_stride_n;
  int page, num_blocks;
  const void* k_new;
  const void* v_new;
  int64_t new_stride_b, new_stride_t, new_stride_h;
  const int32_t* cache_seqlens;
  const bool* tree_mask;
  int64_t mask_stride_b;
  void* out;
  int64_t out_stride_b, out_stride_t, out_stride_h;
  float* lse;
  float* out_partial;
  float* lse_partial;
  int B, T, Hq, Hkv, D, S, num_splits;
  float scale;  // softmax scale (natural units)
  DType dtype;
  bool sm90;
};
// Keys of a row's live prefix that one split takes at least: with more splits than a row needs, the
// rest end at once, so the work follows the live prefix while the split count is fixed at launch.
constexpr int kMinSplitKeys = 256;
// The split count run_tree_attention wants: about two waves of blocks on the current device, at most
// one per kMinSplitKeys positions of capacity S and 64 (the host never reads cache_seqlens). sm90: for
// the Hopper kernel (128 query rows per block, one block per SM: one wave).
int tree_attention_num_splits(int B, int T, int Hq, int Hkv, int S, bool sm90 = false);
void run_tree_attention(const TreeAttentionParams& p, cudaStream_t stream);
// The attention launch of the Hopper kernel (no cache write, no merge); false, having launched nothing,
// when it cannot run here (device not compute capability 9.0, no sm_90a code in the module, paged caches
// of a block size it does not take, no tensor map for these caches).
bool launch_tree_attention_sm90(const TreeAttentionParams& p, cudaStream_t stream);
// Whether the Hopper kernel takes paged caches of blocks of `page` positions: its 128-key tiles must fall into
// whole swizzle atoms of 8 rows within one block (ht_kernels/cuda/tree_attention.py mirrors this).
constexpr bool sm90_takes_page(int page) { return page > 0 && (page % 128 == 0 || (128 % page == 0 && page >= 8)); }

}  // namespace ht
