// tree_attention on Hopper (sm_90a): warpgroup MMA with a TMA producer. Opt-in (TreeAttentionParams::sm90,
// HT_KERNELS_CUDA_SM90=1 from Python) until a GPU run has validated it; tree_attention.cuh stays the default.
//
// One block: 128 GQA-packed query rows of one (row b, KV head h) over the key blocks of its split (the same
// split rule, partials layout and merge kernel as tree_attention.cuh), 3 warpgroups:
// - warpgroup 0, the producer: one thread streams K and V tiles of kBlockN keys with TMA (a 4-d tensor map
//   over the cache, 128-byte swizzle, one box of 64 head-dim values per column block) into a ring of
//   kStages shared-memory stages. Stage s has two "full" mbarriers, one for K and one for V (the producer's
//   arrive.expect_tx; the TMA bytes complete it), so that S_j = Q K_j^T can start before V_j has landed, and
//   an "empty" one (one arrival per consumer warp once its last wgmma reading the stage has finished). It
//   gives most of its registers away (setmaxnreg.dec).
// - warpgroups 1 and 2, the consumers: 64 query rows each (a warpgroup with no live row idles). Q is
//   staged once in shared memory in the same swizzled layout. Per key tile j:
//       S_j = Q K_j^T           wgmma m64n128k16, A and B from shared memory (K-major descriptors)
//       O  += P_{j-1} V_{j-1}   wgmma m64nDk16, A = P from registers, B = V transposed (MN-major)
//   both issued back to back, then the online softmax of S_j runs while P_{j-1} V_{j-1} is still in the
//   tensor cores (FlashAttention-3's intra-warpgroup overlap); O is rescaled once that product is done.
//   With both consumers live they take turns to issue their products (FlashAttention-3's ping-pong: two
//   named barriers pass the turn), so that one's softmax runs while the other's products use the tensor
//   cores, rather than both computing softmaxes at the same time.
//   Base-2 softmax with the scale folded into log2 units, fp32 accumulators, the tree mask only on tiles
//   that reach past the prefix, exactly as the sm_80 kernel.
// Keys at or past n + T: TMA reads them when they share the row's last tile (it zero-fills only past the
// capacity S), so the consumers zero those V rows in shared memory and the mask sets their scores to -inf;
// stale (even NaN) slots therefore never reach the output.
// Paged caches (blocks of `page` positions, page a multiple of 128 or one of 8, 16, 32, 64): a key tile
// arrives in pieces of min(page, 128) keys, one TMA box per piece and column block, each piece within one
// block whose id the producer reads from the table; pieces that start at or past n + T are not loaded (their
// bytes are left out of the barrier's count), and a used piece whose block id lies outside [0, num_blocks)
// is not loaded either but flags the row, whose outputs then are NaN, as in the sm_80 kernel.
// Index math (fragments, swizzle, descriptors, P -> A) lives in wgmma_layout.h and is checked on the host
// by tests/test_cuda_sm90.py.
#pragma once

#include <cfloat>

#include "sm90_ptx.cuh"
#include "wgmma_layout.h"

namespace ht {

template <int D_, typename T_>
struct TreeAttentionSm90Traits {
  using T = T_;
  static constexpr int D = D_;
  static constexpr int kConsumers = 2;                      // consumer warpgroups, 64 query rows each
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kBlockN = 128;                       // keys per tile
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kColBlocks = D / 64;                 // 128-byte column blocks of a row
  static constexpr int kQBytes = 64 * D * 2;                // one consumer's Q tile
  static constexpr int kTileBytes = kBlockN * D * 2;        // one K or V tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  // Stages: the consumers hold two (S_j = Q K_j^T and P_{j-1} V_{j-1} run together), so a third lets the
  // producer load tile j + 1 during iteration j; with two its load latency stalled every iteration.
  static constexpr int kStages = D == 64 ? 4 : 3;           // 128 / 192 KB of K/V
  static constexpr int kBarrierOffset = kConsumers * kQBytes + kStages * kStageBytes;
  static constexpr int kFlagOffset = kBarrierOffset + 3 * kStages * 8;  // a bad block id was met (paged caches)
  static constexpr int kScratchOffset = kFlagOffset + 8;                 // one float per consumer thread
  static constexpr int kSmemBytes = kScratchOffset + 128 * kConsumers * 4 + 1024;  // + slack to align to 1024
  static_assert(kSmemBytes <= 232448, "more shared memory than an sm_90 block may have");
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 128 x 40 + 256 x 232 <= 64 K
  static constexpr int kTurn = 3;  // named barriers kTurn, kTurn + 1: the consumers' turns (1, 2: their own)
};

template <typename Traits, bool SPLIT>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    tree_attention_sm90_kernel(const __grid_constant__ TreeAttentionParams p, const __grid_constant__ CUtensorMap k_map,
                               const __grid_constant__ CUtensorMap v_map) {
#ifdef HT_SM90A
  using T = typename Traits::T;
  using namespace sm90;
  constexpr int D = Traits::D, BN = Traits::kBlockN, ST = Traits::kStages, CB = Traits::kColBlocks;
  extern __shared__ unsigned char smem_raw[];
  // 128-byte swizzle atoms must be 1024-byte aligned in the shared address space.
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* full_k = reinterpret_cast<uint64_t*>(smem + Traits::kBarrierOffset);
  uint64_t* full_v = full_k + ST;
  uint64_t* empty = full_k + 2 * ST;
  volatile uint32_t* bad_block = reinterpret_cast<uint32_t*>(smem + Traits::kFlagOffset);
  const uint32_t kv_addr = smem_addr(smem + Traits::kConsumers * Traits::kQBytes);

  const int b = blockIdx.x / p.Hkv, h = blockIdx.x % p.Hkv;
  const int G = p.Hq / p.Hkv, rows = p.T * G;
  const bool bad = bad_length(p, b);  // then no cache slot is read, and out and lse are NaN
  const int n = bad ? 0 : p.cache_seqlens[b];
  const int keys = n + p.T;
  const int nblocks = (keys + BN - 1) / BN;
  const int per_split = max((nblocks + p.num_splits - 1) / p.num_splits, max(1, kMinSplitKeys / BN));
  const int kb_begin = blockIdx.z * per_split, kb_end = min(nblocks, kb_begin + per_split);
  const int n_tiles = max(0, kb_end - kb_begin);
  const int block_row0 = blockIdx.y * Traits::kBlockM;
  const int active = min(Traits::kConsumers, (rows - block_row0 + 63) / 64);  // consumers with live rows
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;

  if (threadIdx.x == 0) {
    for (int s = 0; s < ST; ++s) {
      mbar_init(&full_k[s], 1);
      mbar_init(&full_v[s], 1);
      mbar_init(&empty[s], 4 * active);
    }
    *bad_block = 0u;
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer ----
    regs_dealloc<Traits::kProducerRegs>();
    if (tid != 0) return;
    for (int j = 0; j < n_tiles; ++j) {
      const int stage = j % ST;
      if (j >= ST) mbar_wait(&empty[stage], ((j / ST) - 1) & 1);  // its previous tile is consumed
      unsigned char* ks = smem + Traits::kConsumers * Traits::kQBytes + stage * Traits::kStageBytes;
      const int key0 = (kb_begin + j) * BN;
      if (!p.block_table) {
        mbar_arrive_expect_tx(&full_k[stage], Traits::kTileBytes);
#pragma unroll
        for (int cb = 0; cb < CB; ++cb)  // tensor map dims (D, Hkv, S, B)
          tma_load_4d(ks + cb * BN * 128, &k_map, 64 * cb, h, key0, b, &full_k[stage]);
        mbar_arrive_expect_tx(&full_v[stage], Traits::kTileBytes);
#pragma unroll
        for (int cb = 0; cb < CB; ++cb)
          tma_load_4d(ks + Traits::kTileBytes + cb * BN * 128, &v_map, 64 * cb, h, key0, b, &full_v[stage]);
        continue;
      }
      // Paged: pieces of `piece` keys, tensor map dims (D, Hkv, page, num_blocks). The block id of piece i,
      // or -1 where it is not loaded (it starts at or past the row's keys, or its id is bad: flagged).
      const int piece = min(p.page, BN);
      auto block_of = [&](int i) {
        const int key = key0 + i * piece;
        if (key >= keys) return -1;
        const int id = p.block_table[b * p.table_stride_b + static_cast<int64_t>(key / p.page) * p.table_stride_n];
        return id >= 0 && id < p.num_blocks ? id : -1;
      };
      uint32_t bytes = 0;
      for (int i = 0; i < BN / piece; ++i) {
        const bool used = key0 + i * piece < keys, loaded = block_of(i) >= 0;
        if (used && !loaded) *bad_block = 1u;  // before the arrivals below publish it to the consumers
        bytes += loaded ? piece * 128 * CB : 0;
      }
      for (int kv = 0; kv < 2; ++kv) {
        uint64_t* bar = kv == 0 ? &full_k[stage] : &full_v[stage];
        mbar_arrive_expect_tx(bar, bytes);
        for (int i = 0; i < BN / piece; ++i) {
          const int id = block_of(i);
          if (id < 0) continue;
#pragma unroll
          for (int cb = 0; cb < CB; ++cb)
            tma_load_4d(ks + kv * Traits::kTileBytes + cb * BN * 128 + i * piece * 128, kv == 0 ? &k_map : &v_map,
                        64 * cb, h, (key0 + i * piece) % p.page, id, bar);
        }
      }
    }
    return;
  }

  // ---- consumers ----
  regs_alloc<Traits::kConsumerRegs>();
  const int cw = wg - 1;
  if (cw >= active) return;
  const int tile0 = block_row0 + 64 * cw;  // first packed query row of this warpgroup
  unsigned char* qs = smem + cw * Traits::kQBytes;
  const uint32_t scratch = smem_addr(smem + Traits::kScratchOffset) + 4 * (threadIdx.x - 128);
  const uint32_t q_addr = smem_addr(qs);
  const float scale_log2 = p.scale * 1.4426950408889634f;
  // Offsets in tree_mask of the tree tokens' rows of this thread's two query rows (-1 past the last row).
  int64_t mask_row[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = tile0 + acc_row(warp, lane, 2 * half);
    mask_row[half] = r < rows ? b * p.mask_stride_b + static_cast<int64_t>(r / G) * p.T : -1;
  }

  // Q -> shared memory (swizzled, zero rows past the last), 4 bytes at a time (q needs 4-byte alignment only).
  for (int c = tid; c < 64 * D / 2; c += 128) {
    const int r = c / (D / 2), word = c % (D / 2), row = tile0 + r;
    uint32_t v = 0u;
    if (row < rows) {
      const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + (row / G) * p.q_stride_t + (h * G + row % G) * p.q_stride_h;
      v = *reinterpret_cast<const uint32_t*>(q + 2 * word);
    }
    *reinterpret_cast<uint32_t*>(qs + tile_offset(64, r, word / 4) + 4 * (word % 4)) = v;
  }
  fence_proxy_async();  // written by ordinary stores, read by wgmma
  named_barrier(1 + cw, 128);

  float o[D / 2];        // O accumulator, acc_row / acc_col layout (64 x D)
  float s[BN / 2];       // S, then P in fp32 (64 x BN)
  uint32_t pa[BN / 16][4];  // P as A fragments, one group of 4 per 16 keys
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, corr[2];

  auto wait_k = [&](int j) { mbar_wait(&full_k[j % ST], (j / ST) & 1); };
  auto wait_v = [&](int j) {
    mbar_wait(&full_v[j % ST], (j / ST) & 1);
    const int kb = kb_begin + j, first = keys - kb * BN;
    if (first < BN) {  // the row's last tile: zero its V rows from `first` on (keys >= n + T: stale, maybe NaN)
      unsigned char* vs = smem + Traits::kConsumers * Traits::kQBytes + (j % ST) * Traits::kStageBytes + Traits::kTileBytes;
      for (int c = tid; c < (BN - first) * CB * 8; c += 128) {
        const int r = first + c / (CB * 8), cb = (c / 8) % CB, ch = c % 8;
        *reinterpret_cast<uint4*>(vs + cb * BN * 128 + r * 128 + ch * 16) = make_uint4(0u, 0u, 0u, 0u);
      }
      fence_proxy_async();
      named_barrier(1 + cw, 128);
    }
  };
  // Ping-pong: before issuing products a consumer waits for its turn (barrier kTurn + cw: its own 128
  // threads and the other consumer's 128 arrivals), and after issuing passes the turn on. Consumer 0 goes
  // first (consumer 1 arrives once up front); each issues n_tiles + 1 times, and consumer 1 skips its last
  // pass, which nobody would wait for, so every barrier phase gets exactly 256 threads.
  const bool pingpong = active == 2;
  int issues_left = n_tiles + 1;
  auto take_turn = [&] {
    if (pingpong) named_barrier(Traits::kTurn + cw, 256);
  };
  auto pass_turn = [&] {
    if (pingpong && (cw == 0 || --issues_left > 0)) named_barrier_arrive(Traits::kTurn + 1 - cw, 256);
  };
  if (pingpong && cw == 1 && n_tiles > 0) named_barrier_arrive(Traits::kTurn, 256);
  auto release = [&](int j) {
    if (lane == 0) mbar_arrive(&empty[j % ST]);
  };
  auto issue_qk = [&](int j) {
    const uint32_t k_addr = kv_addr + (j % ST) * Traits::kStageBytes;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      Wgmma<T, BN>::ss(s, desc_k_major(q_addr, 64, kk), desc_k_major(k_addr, BN, kk), kk > 0);
    wgmma_commit();
  };
  auto issue_pv = [&](int j) {
    const uint32_t v_addr = kv_addr + (j % ST) * Traits::kStageBytes + Traits::kTileBytes;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) Wgmma<T, D>::rs(o, pa[kk], desc_mn_major(v_addr, BN, kk), 1);
    wgmma_commit();
  };
  // Mask and exponentiate the raw scores S of key block kb in place (base-2 logits s * scale_log2, with
  // scale_log2 > 0: the raw max is scaled once per row, then one FMA per exponent); corr: the factor of
  // each row's old O and l.
  auto softmax = [&](int kb) {
    if ((kb + 1) * BN > n) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) {
        const int key = kb * BN + acc_col(lane, i);
        const int64_t mr = mask_row[acc_half(i)];
        const bool visible = key < n || (key < keys && mr >= 0 && p.tree_mask[mr + key - n]);
        if (!visible) s[i] = -INFINITY;
      }
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < BN / 2; ++i)
        if (acc_half(i) == half) mx = fmaxf(mx, s[i]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the 4 lanes of a quad share the row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx = fmaxf(m[half], mx * scale_log2);
      const float base = mx == -INFINITY ? 0.f : mx;       // nothing visible yet: keep everything at 0
      corr[half] = exp2_ftz(m[half] - base);
      m[half] = mx;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < BN / 2; ++i)
        if (acc_half(i) == half) {
          s[i] = exp2_ftz(fmaf(s[i], scale_log2, -base));
          sum += s[i];
        }
      l[half] = l[half] * corr[half] + sum;
    }
  };
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
      for (int j = 0; j < 4; ++j) pa[kk][j] = pack2<T>(s[p_source(kk, j, 0)], s[p_source(kk, j, 1)]);
  };

  if (n_tiles > 0) {
    wait_k(0);
    take_turn();
    wgmma_fence();
    issue_qk(0);
    pass_turn();
    wgmma_wait<0>();
    fence_regs(s);
    softmax(kb_begin);
    pack_p();  // O is still 0: nothing to rescale
    for (int j = 1; j < n_tiles; ++j) {
      wait_k(j);
      wait_v(j - 1);
      fence_regs(o);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) fence_regs(pa[kk]);
      take_turn();
      wgmma_fence();
      issue_qk(j);
      issue_pv(j - 1);
      pass_turn();
      wgmma_wait<1>();  // S_j is ready; P_{j-1} V_{j-1} may still run
      fence_regs(s);
      softmax(kb_begin + j);
      // Keep the softmax ahead of the wait for P_{j-1} V_{j-1}. Left alone, ptxas schedules every exponential
      // after that wait (its results go to registers the in-flight wgmma still reads), and nothing overlaps.
      // A shared-memory store of the row sums, which need every exponential, does not move past the wait.
      st_shared_f32(scratch, l[0] + l[1]);
      wgmma_wait<0>();
      fence_regs(o);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) fence_regs(pa[kk]);
      release(j - 1);
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] *= corr[acc_half(i)];
      pack_p();
    }
    fence_regs(o);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) fence_regs(pa[kk]);
    wait_v(n_tiles - 1);
    take_turn();
    wgmma_fence();
    issue_pv(n_tiles - 1);
    pass_turn();
    wgmma_wait<0>();
    fence_regs(o);
    release(n_tiles - 1);
  }

  // Epilogue: total l over the quad, normalise, store (out in T, or fp32 partials per split).
  const int t = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float total = l[half];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    const int r = tile0 + acc_row(warp, lane, 2 * half);
    if (r >= rows) continue;
    const int i = r / G, hq = h * G + r % G;
    const bool nan = bad || *bad_block;  // every wait on the producer's barriers is behind: the flag is final
    const float inv = nan ? NAN : total > 0.f ? 1.f / total : 0.f;
    const float lse = nan ? NAN : total > 0.f ? (m[half] + log2f(total)) * 0.6931471805599453f : -INFINITY;
    if (SPLIT) {
      const int64_t at = ((static_cast<int64_t>(blockIdx.z) * p.B + b) * p.T + i) * p.Hq + hq;
      float* out = p.out_partial + at * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)  // registers 4 dt + 2 half, + 1: cols 8 dt + 2 t, + 1
        *reinterpret_cast<float2*>(out + acc_col(lane, 4 * dt)) =
            make_float2(o[4 * dt + 2 * half] * inv, o[4 * dt + 2 * half + 1] * inv);
      if (t == 0) p.lse_partial[((static_cast<int64_t>(blockIdx.z) * p.B + b) * p.Hq + hq) * p.T + i] = lse;
    } else {
      T* out = static_cast<T*>(p.out) + b * p.out_stride_b + i * p.out_stride_t + hq * p.out_stride_h;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<uint32_t*>(out + acc_col(lane, 4 * dt)) =
            pack2<T>(o[4 * dt + 2 * half] * inv, o[4 * dt + 2 * half + 1] * inv);
      if (t == 0) p.lse[(static_cast<int64_t>(b) * p.Hq + hq) * p.T + i] = lse;
    }
  }
#else
  __trap();  // built without sm_90a code: launch_tree_attention_sm90 sees the stub and does not launch it
#endif
}

}  // namespace ht
