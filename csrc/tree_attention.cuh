// tree_attention kernels: flash-decoding style attention of a token tree over a KV cache on tensor cores.
#pragma once

#include <cfloat>

#include "common.cuh"

namespace ht {

template <int D_, typename T_>
struct TreeAttentionTraits {
  using T = T_;
  static constexpr int D = D_;
  static constexpr int kBlockM = 64;           // query rows per block: 4 warps x 16
  static constexpr int kBlockN = 64;           // keys per step
  static constexpr int kThreads = 128;
  static constexpr int kChunks = D / 8;        // 16-byte chunks per key row
  static constexpr int kTileBytes = kBlockN * D * 2;
  static constexpr int kSmemBytes = 2 * 2 * kTileBytes;  // K and V, two stages
};

// One block: 64 query rows of one (row b, KV head h), GQA-packed (row r = tree token r / G, query
// head h G + r % G, so every query head that shares the KV head shares the loaded keys), over the key
// blocks of its split. Key position j of row b is visible to tree token i iff j < n (the prefix), or
// j < n + T and tree_mask[b, i, j - n]; blocks wholly inside the prefix skip the mask test. K and V
// tiles stream through shared memory with cp.async, the next block loading while this one computes;
// tiles are XOR-swizzled by 16-byte chunk so ldmatrix reads are free of bank conflicts. Keys at or
// past n + T are zero-filled, never read. Online softmax in base 2 with fp32 accumulators; a row that
// sees nothing ends with l = 0: out 0, lse -inf. A row whose length n lies outside [0, S - T] reads no
// cache slot and gets NaN outputs and lse (the host never reads the lengths). Paged caches: each key's
// slot is looked up in the block table as its tile loads; a key under a bad block id is zero-filled, not
// read, and makes the block's outputs NaN (the merge carries a split's NaN to the row's output).
template <typename Traits, bool SPLIT>
__global__ void __launch_bounds__(128) tree_attention_kernel(TreeAttentionParams p) {
  using T = typename Traits::T;
  constexpr int D = Traits::D, BN = Traits::kBlockN, CH = Traits::kChunks;
  extern __shared__ __align__(128) unsigned char smem[];
  const int b = blockIdx.x / p.Hkv, h = blockIdx.x % p.Hkv;
  const int G = p.Hq / p.Hkv, rows = p.T * G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const bool bad_len = bad_length(p, b);
  const int n = bad_len ? 0 : p.cache_seqlens[b];
  const int keys = n + p.T;
  const int nblocks = (keys + BN - 1) / BN;
  // A split takes at least kMinSplitKeys of the row's live keys: a short row runs on fewer splits, the
  // others end at once (l = 0, lse -inf, weighed 0 by the merge).
  const int per_split = max((nblocks + p.num_splits - 1) / p.num_splits, max(1, kMinSplitKeys / BN));
  const int kb_begin = blockIdx.z * per_split, kb_end = min(nblocks, kb_begin + per_split);
  const int row[2] = {static_cast<int>(blockIdx.y) * 64 + warp * 16 + g, static_cast<int>(blockIdx.y) * 64 + warp * 16 + g + 8};
  const float scale_log2 = p.scale * 1.4426950408889634f;

  // Q as A fragments: (row g, cols 2t, 2t+1), (row g+8, same), (row g, cols 2t+8, 2t+9), (row g+8, same).
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row[half];
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + (r / G) * p.q_stride_t + (h * G + r % G) * p.q_stride_h;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      qf[ks][half] = r < rows ? *reinterpret_cast<const uint32_t*>(q + ks * 16 + 2 * t) : 0u;
      qf[ks][half + 2] = r < rows ? *reinterpret_cast<const uint32_t*>(q + ks * 16 + 2 * t + 8) : 0u;
    }
  }

  const char* k_base = static_cast<const char*>(p.k_cache) + 2 * h * p.cache_stride_h;
  const char* v_base = static_cast<const char*>(p.v_cache) + 2 * h * p.cache_stride_h;
  bool bad_block = false;  // a key this thread loaded lies in a block id outside [0, num_blocks)
  auto load_tile = [&](int kb, int stage) {
    unsigned char* ks = smem + stage * 2 * Traits::kTileBytes;
    unsigned char* vs = ks + Traits::kTileBytes;
    for (int c = threadIdx.x; c < BN * CH; c += Traits::kThreads) {
      const int r = c / CH, ch = c % CH, key = kb * BN + r;
      bool oob = false;
      const int64_t at = key < keys ? cache_offset(p, b, key, oob) : 0;
      bad_block |= oob;
      const bool valid = key < keys && !oob;
      const int64_t offset = 2 * at + 16 * ch;
      const int dst = 16 * (r * CH + (ch ^ (r & 7)));
      cp_async_16(ks + dst, k_base + offset, valid);
      cp_async_16(vs + dst, v_base + offset, valid);
    }
    cp_async_commit();
  };

  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  if (kb_begin < kb_end) load_tile(kb_begin, 0);
  for (int kb = kb_begin; kb < kb_end; ++kb) {
    const int stage = (kb - kb_begin) & 1;
    if (kb + 1 < kb_end) {
      load_tile(kb + 1, stage ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const unsigned char* ks = smem + stage * 2 * Traits::kTileBytes;
    const unsigned char* vs = ks + Traits::kTileBytes;

    // S = Q K^T for 16 rows x 64 keys per warp: ldmatrix matrix mi of lane l is key 8 (mi / 2) + l % 8
    // of the n-tile pair, d chunk 2 ks + mi % 2.
    float s[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int ks_ = 0; ks_ < D / 16; ++ks_) {
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        const int mi = lane >> 3, r = np * 16 + (mi >> 1) * 8 + (lane & 7), ch = 2 * ks_ + (mi & 1);
        uint32_t kf[4];
        ldmatrix_x4<false>(kf, ks + 16 * (r * CH + (ch ^ (r & 7))));
        const uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
        mma_16816<T>(s[2 * np], qf[ks_], b0);
        mma_16816<T>(s[2 * np + 1], qf[ks_], b1);
      }
    }

    // Mask the raw scores: element c of n-tile nt is (row[c / 2], key kb BN + 8 nt + 2 t + c % 2).
    if ((kb + 1) * BN > n) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int key = kb * BN + nt * 8 + 2 * t + (c & 1), r = row[c >> 1];
          const bool visible = key < n || (key < keys && r < rows &&
                                           p.tree_mask[b * p.mask_stride_b + static_cast<int64_t>(r / G) * p.T + key - n]);
          if (!visible) s[nt][c] = -INFINITY;
        }
      }
    }

    // Online softmax of the base-2 logits s * scale_log2 (scale_log2 > 0): the four lanes of a group hold
    // one row pair; reduce the max of the raw scores across them and scale it once per row (rounding is
    // monotonic, so this is the max of the rounded logits), then one FMA per exponent.
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * half], s[nt][2 * half + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx = fmaxf(m[half], mx * scale_log2);
      const float base = mx == -INFINITY ? 0.f : mx;  // nothing visible yet: keep everything at 0
      const float correction = exp2_ftz(m[half] - base);
      m[half] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        s[nt][2 * half] = exp2_ftz(fmaf(s[nt][2 * half], scale_log2, -base));
        s[nt][2 * half + 1] = exp2_ftz(fmaf(s[nt][2 * half + 1], scale_log2, -base));
        sum += s[nt][2 * half] + s[nt][2 * half + 1];
      }
      l[half] = l[half] * correction + sum;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        acc[dt][2 * half] *= correction;
        acc[dt][2 * half + 1] *= correction;
      }
    }

    // O += P V: the accumulators of n-tiles 2j, 2j+1 are the A fragment of keys 16 j .. 16 j + 15;
    // V through ldmatrix.trans, matrix mi of lane l at key 16 j + 8 (mi % 2) + l % 8, d chunk 2 dp + mi / 2.
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t pf[4] = {pack2<T>(s[2 * j][0], s[2 * j][1]), pack2<T>(s[2 * j][2], s[2 * j][3]),
                              pack2<T>(s[2 * j + 1][0], s[2 * j + 1][1]), pack2<T>(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        const int mi = lane >> 3, r = 16 * j + (mi & 1) * 8 + (lane & 7), ch = 2 * dp + (mi >> 1);
        uint32_t vf[4];
        ldmatrix_x4<true>(vf, vs + 16 * (r * CH + (ch ^ (r & 7))));
        const uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
        mma_16816<T>(acc[2 * dp], pf, b0);
        mma_16816<T>(acc[2 * dp + 1], pf, b1);
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }

  // Epilogue: total l over the group, normalise, store (out in T, or fp32 partials per split).
  const bool bad = __syncthreads_or(bad_block) || bad_len;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float total = l[half];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    const int r = row[half];
    if (r >= rows) continue;
    const int i = r / G, hq = h * G + r % G;
    const float inv = bad ? NAN : total > 0.f ? 1.f / total : 0.f;
    const float lse = bad ? NAN : total > 0.f ? (m[half] + log2f(total)) * 0.6931471805599453f : -INFINITY;
    if (SPLIT) {
      const int64_t at = ((static_cast<int64_t>(blockIdx.z) * p.B + b) * p.T + i) * p.Hq + hq;
      float* out = p.out_partial + at * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<float2*>(out + dt * 8 + 2 * t) = make_float2(acc[dt][2 * half] * inv, acc[dt][2 * half + 1] * inv);
      if (t == 0) p.lse_partial[((static_cast<int64_t>(blockIdx.z) * p.B + b) * p.Hq + hq) * p.T + i] = lse;
    } else {
      T* out = static_cast<T*>(p.out) + b * p.out_stride_b + i * p.out_stride_t + hq * p.out_stride_h;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * t) = pack2<T>(acc[dt][2 * half] * inv, acc[dt][2 * half + 1] * inv);
      if (t == 0) p.lse[(static_cast<int64_t>(b) * p.Hq + hq) * p.T + i] = lse;
    }
  }
}

// The splits of one (b, tree token i, query head): weights exp(lse_s - max), summed in split order.
// Block: D threads, one output element each; grid B T Hq.
template <typename T>
__global__ void tree_attention_merge_kernel(TreeAttentionParams p) {
  const int idx = blockIdx.x;  // (b, i, hq)
  const int hq = idx % p.Hq, i = (idx / p.Hq) % p.T, b = idx / (p.Hq * p.T);
  const int64_t per_split = static_cast<int64_t>(p.B) * p.Hq * p.T;
  const float* lse = p.lse_partial + (static_cast<int64_t>(b) * p.Hq + hq) * p.T + i;
  float mx = -INFINITY;
  bool nan = false;  // a split saw a bad block id
  for (int s = 0; s < p.num_splits; ++s) {
    nan |= isnan(lse[s * per_split]);
    mx = fmaxf(mx, lse[s * per_split]);
  }
  float total = 0.f, sum = 0.f;
  const float* out = p.out_partial + static_cast<int64_t>(idx) * p.D + threadIdx.x;
  if (mx > -INFINITY) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = __expf(lse[s * per_split] - mx);
      total += w;
      sum += w * out[s * per_split * p.D];
    }
  }
  const bool bad = nan || bad_length(p, b);
  T* dst = static_cast<T*>(p.out) + b * p.out_stride_b + i * p.out_stride_t + hq * p.out_stride_h + threadIdx.x;
  *dst = from_float<T>(bad ? NAN : total > 0.f ? sum / total : 0.f);
  if (threadIdx.x == 0)
    p.lse[(static_cast<int64_t>(b) * p.Hq + hq) * p.T + i] = bad ? NAN : total > 0.f ? mx + logf(total) : -INFINITY;
}

// k_new, v_new -> the tree slots n .. n + T - 1 of the caches; grid (T, B), 16-byte chunks.
__global__ void tree_attention_write_kv_kernel(TreeAttentionParams p) {
  const int j = blockIdx.x, b = blockIdx.y, chunks = p.D / 8;
  if (bad_length(p, b)) return;  // a length outside [0, S - T]: no slot of the row is written
  bool bad = false;
  const int64_t slot = cache_offset(p, b, p.cache_seqlens[b] + j, bad);
  if (bad) return;  // a block id outside [0, num_blocks): nothing is written through it
  for (int c = threadIdx.x; c < p.Hkv * chunks; c += blockDim.x) {
    const int h = c / chunks, ch = c % chunks;
    const int64_t src = b * p.new_stride_b + j * p.new_stride_t + h * p.new_stride_h + 8 * ch;
    const int64_t dst = slot + h * p.cache_stride_h + 8 * ch;
    *reinterpret_cast<uint4*>(static_cast<char*>(p.k_cache) + 2 * dst) =
        *reinterpret_cast<const uint4*>(static_cast<const char*>(p.k_new) + 2 * src);
    *reinterpret_cast<uint4*>(static_cast<char*>(p.v_cache) + 2 * dst) =
        *reinterpret_cast<const uint4*>(static_cast<const char*>(p.v_new) + 2 * src);
  }
}

}  // namespace ht
