// ht_kernels._C: the launchers of ht_kernels.h for Python, torch-free. Tensors arrive as integer
// addresses with their sizes and strides; the stream as an integer cudaStream_t (0: the default).
#include <pybind11/pybind11.h>

#include "ht_kernels.h"

namespace py = pybind11;
using ht::DType;

#ifndef HT_KERNELS_SOURCE_HASH
#define HT_KERNELS_SOURCE_HASH "unknown"
#endif

namespace {

template <typename P>
P* ptr(uintptr_t address) {
  return reinterpret_cast<P*>(address);
}

cudaStream_t stream_of(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ht_kernels CUDA kernels (torch-free launchers)";
  m.attr("source_hash") = HT_KERNELS_SOURCE_HASH;

  m.def(
      "compact_kv",
      [](uintptr_t k, uintptr_t v, int64_t stride_l, int64_t stride_b, int64_t stride_s, int64_t stride_h,
         int64_t stride_d, int L, int B, int H, int D, int elem_bytes, uintptr_t block_table, int64_t table_stride_b,
         int64_t table_stride_n, int page, int num_blocks, uintptr_t cache_seqlens, uintptr_t accepted,
         int64_t accepted_stride, bool accepted_i64, uintptr_t accept_len, bool accept_len_i64, int A,
         uintptr_t stream) {
        if (elem_bytes != 2 && elem_bytes != 4 && elem_bytes != 8)
          throw py::value_error("compact_kv: elem_bytes must be 2, 4 or 8");
        if (block_table && page < 1) throw py::value_error("compact_kv: page must be >= 1 with a block_table");
        ht::CompactKvParams p{ptr<void>(k), ptr<void>(v), stride_l, stride_b, stride_s, stride_h, stride_d, L, B, H,
                              D, elem_bytes, ptr<const int32_t>(block_table), table_stride_b, table_stride_n, page,
                              num_blocks, ptr<const int32_t>(cache_seqlens), ptr<const void>(accepted),
                              accepted_stride, accepted_i64, ptr<const void>(accept_len), accept_len_i64, A};
        py::gil_scoped_release release;
        ht::run_compact_kv(p, stream_of(stream));
      },
      "Caches [L, B, S, H, D] (paged: [L, num_blocks, page, H, D]), strides in bytes, v and block_table may be "
      "0; see ht_kernels.h.");

  m.def(
      "verify_tree_greedy",
      [](uintptr_t draft, uintptr_t parents, int64_t parents_stride_b, uintptr_t target, uintptr_t accepted,
         uintptr_t accept_len, int B, int T, uintptr_t stream) {
        ht::VerifyTreeParams p{ptr<const int64_t>(draft), ptr<const int64_t>(parents), parents_stride_b,
                               ptr<const int64_t>(target), ptr<int64_t>(accepted), ptr<int64_t>(accept_len), B, T};
        py::gil_scoped_release release;
        ht::run_verify_tree_greedy(p, stream_of(stream));
      },
      "int64 contiguous tensors; see ht_kernels.h.");

  m.def(
      "tree_attention",
      [](uintptr_t q, int64_t q_stride_b, int64_t q_stride_t, int64_t q_stride_h, uintptr_t k_cache, uintptr_t v_cache,
         int64_t cache_stride_b, int64_t cache_stride_s, int64_t cache_stride_h, uintptr_t block_table,
         int64_t table_stride_b, int64_t table_stride_n, int page, int num_blocks, uintptr_t k_new, uintptr_t v_new,
         int64_t new_stride_b, int64_t new_stride_t, int64_t new_stride_h, uintptr_t cache_seqlens, uintptr_t tree_mask,
         int64_t mask_stride_b, uintptr_t out, int64_t out_stride_b, int64_t out_stride_t, int64_t out_stride_h,
         uintptr_t lse, uintptr_t out_partial, uintptr_t lse_partial, int B, int T, int Hq, int Hkv, int D, int S,
         int num_splits, float scale, int dtype, uintptr_t stream, bool sm90) {
        if (dtype != 1 && dtype != 2) throw py::value_error("tree_attention: dtype must be 1 (f16) or 2 (bf16)");
        if (D != 64 && D != 128) throw py::value_error("tree_attention: D must be 64 or 128");
        if (Hkv <= 0 || Hq % Hkv != 0 || num_splits < 1)
          throw py::value_error("tree_attention: needs Hq % Hkv == 0 and num_splits >= 1");
        if (block_table && page < 1) throw py::value_error("tree_attention: page must be >= 1 with a block_table");
        ht::TreeAttentionParams p{ptr<const void>(q), q_stride_b, q_stride_t, q_stride_h, ptr<void>(k_cache),
                                  ptr<void>(v_cache), cache_stride_b, cache_stride_s, cache_stride_h,
                                  ptr<const int32_t>(block_table), table_stride_b, table_stride_n, page, num_blocks,
                                  ptr<const void>(k_new), ptr<const void>(v_new), new_stride_b, new_stride_t,
                                  new_stride_h, ptr<const int32_t>(cache_seqlens), ptr<const bool>(tree_mask),
                                  mask_stride_b, ptr<void>(out), out_stride_b, out_stride_t, out_stride_h,
                                  ptr<float>(lse), ptr<float>(out_partial), ptr<float>(lse_partial), B, T, Hq, Hkv, D,
                                  S, num_splits, scale, static_cast<DType>(dtype), sm90};
        py::gil_scoped_release release;
        ht::run_tree_attention(p, stream_of(stream));
      },
      "Strides in elements; block_table 0 for contiguous caches; dtype 1 f16, 2 bf16; sm90: the Hopper kernel "
      "where it can run; see ht_kernels.h.");
  m.def("tree_attention_num_splits", &ht::tree_attention_num_splits, py::arg("B"), py::arg("T"), py::arg("Hq"),
        py::arg("Hkv"), py::arg("S"), py::arg("sm90") = false,
        "The split count for (B, T, Hq, Hkv, S) on the current device (sm90: for the Hopper kernel).");

  auto transfer_params = [](uintptr_t x, int64_t x_stride_n, uintptr_t w, int64_t w_stride_k, int64_t w_stride_o,
                            uintptr_t bias, int64_t bias_stride_k, uintptr_t out, int64_t out_stride_n,
                            int64_t out_stride_k, int64_t out_stride_d, int N, int K, int D, int dtype) {
    if (dtype < 0 || dtype > 2) throw py::value_error("hidden_transfer: dtype must be 0 (f32), 1 (f16) or 2 (bf16)");
    return ht::HiddenTransferParams{ptr<const void>(x), x_stride_n, ptr<const void>(w), w_stride_k, w_stride_o,
                                    ptr<const void>(bias), bias_stride_k, ptr<void>(out), out_stride_n,
                                    out_stride_k, out_stride_d, N, K, D, static_cast<DType>(dtype)};
  };
  m.def(
      "hidden_transfer",
      [transfer_params](uintptr_t x, int64_t x_stride_n, uintptr_t w, int64_t w_stride_k, int64_t w_stride_o,
                        uintptr_t bias, int64_t bias_stride_k, uintptr_t out, int64_t out_stride_n,
                        int64_t out_stride_k, int64_t out_stride_d, int N, int K, int D, int dtype, uintptr_t stream) {
        auto p = transfer_params(x, x_stride_n, w, w_stride_k, w_stride_o, bias, bias_stride_k, out, out_stride_n,
                                 out_stride_k, out_stride_d, N, K, D, dtype);
        py::gil_scoped_release release;
        ht::run_hidden_transfer(p, stream_of(stream));
      },
      "Strides in elements; dtype 0 f32, 1 f16, 2 bf16; see ht_kernels.h.");
  m.def(
      "hidden_transfer_kernel",
      [transfer_params](uintptr_t x, int64_t x_stride_n, uintptr_t w, int64_t w_stride_k, int64_t w_stride_o,
                        int D, int dtype) {
        return std::string(ht::hidden_transfer_kernel_name(
            transfer_params(x, x_stride_n, w, w_stride_k, w_stride_o, 0, 0, 0, 0, 0, 0, 1, 1, D, dtype)));
      },
      "Which kernel hidden_transfer runs for these inputs: 'mma' or 'simt'.");
}
