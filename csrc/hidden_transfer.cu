// run_hidden_transfer: the tensor-core kernel for fp16/bf16 rows that allow 16-byte loads, with as
// many 8-row tiles per block as the rows need (at most 16: 128 rows, more rows in more block rows);
// the SIMT kernel otherwise.
#include "hidden_transfer.cuh"

namespace ht {

namespace {

bool mma_ok(const HiddenTransferParams& p) {
  const uint64_t bits = static_cast<uint64_t>(p.D | p.x_stride_n | p.w_stride_k | p.w_stride_o) * 2 |
                        reinterpret_cast<uintptr_t>(p.x) | reinterpret_cast<uintptr_t>(p.w);
  return p.dtype != DType::f32 && bits % 16 == 0;
}

template <typename T, int NT>
void launch_mma(const HiddenTransferParams& p, cudaStream_t stream) {
  dim3 grid((p.D + 63) / 64, p.K, (p.N + 8 * NT - 1) / (8 * NT));
  hidden_transfer_mma_kernel<T, NT><<<grid, 128, 0, stream>>>(p);
}

template <typename T>
void launch_mma_rows(const HiddenTransferParams& p, cudaStream_t stream) {
  const int tiles = (p.N + 7) / 8;
  if (tiles <= 1) launch_mma<T, 1>(p, stream);
  else if (tiles <= 2) launch_mma<T, 2>(p, stream);
  else if (tiles <= 4) launch_mma<T, 4>(p, stream);
  else if (tiles <= 8) launch_mma<T, 8>(p, stream);
  else launch_mma<T, 16>(p, stream);
}

}  // namespace

const char* hidden_transfer_kernel_name(const HiddenTransferParams& p) { return mma_ok(p) ? "mma" : "simt"; }

void run_hidden_transfer(const HiddenTransferParams& p, cudaStream_t stream) {
  if (p.N == 0 || p.K == 0 || p.D == 0) return;
  if (mma_ok(p)) {
    HT_HALF_SWITCH(p.dtype, T, [&] { launch_mma_rows<T>(p, stream); });
  } else {
    HT_DTYPE_SWITCH(p.dtype, T, [&] {
      hidden_transfer_simt_kernel<T><<<dim3((p.D + 7) / 8, p.K), 256, 0, stream>>>(p);
    });
  }
  check_launch("hidden_transfer");
}

}  // namespace ht
