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
// slots is written.
struct CompactKvParams {
  void* k;
  void* v;                             // or null: k only
  int64_t stride_l, stride_b, stride_s, stride_h, stride_d;  // bytes
  int L, B, H, D, elem_bytes;
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

}  // namespace ht
