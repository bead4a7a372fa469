// Host-only check of csrc/wgmma_layout.h, the index math of the Hopper tree attention kernel
// (csrc/tree_attention_sm90.cuh). Built and run by tests/test_cuda_sm90.py:
//     nvcc -std=c++17 -I csrc tests/csrc/wgmma_layout_check.cpp -o check && ./check
// Prints one line per check and "all checks passed"; exits 1 at the first failure.
//
// 1. Fragments: every (row, col) of a 64 x N accumulator tile and of a 64 x 16 A tile is owned by exactly
//    one (thread, register); the P -> A conversion takes, for every A element, the accumulator register of
//    the same thread that holds the same (row, key).
// 2. Swizzle: a bijection of the 16-byte chunks within every 1024-byte atom that leaves the row and the
//    atom alone, equal to the PTX ISA's 128-byte swizzle pattern (row r of an 8-row atom stores its chunk
//    c at chunk position c ^ r); TMA's box layout equals the kernel's tile layout.
// 3. Descriptors: the fields sit where the PTX ISA puts them, and reading the tiles through the K-major
//    and MN-major descriptors of every k-step (as the PTX ISA's canonical layouts define the tensor cores'
//    reads) gives back the elements the kernel meant.
// 4. Emulation: S = Q K^T, the masked base-2 online softmax, P -> A fragments and O += P V of the kernel,
//    tile by tile in the kernel's order (S_j, then P_{j-1} V_{j-1}, then the rescale), iterating over the
//    128 threads and their registers with only these functions and byte arrays laid out like the kernel's
//    shared memory (stale K/V slots poisoned with NaN), equal the dense fp64 attention.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "wgmma_layout.h"

using namespace ht::sm90;

namespace {

void check(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    std::exit(1);
  }
}

void check_fragments() {
  for (int N : {64, 128}) {
    std::vector<int> owner(64 * N, 0);
    for (int warp = 0; warp < 4; ++warp)
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < N / 2; ++i) {
          const int r = acc_row(warp, lane, i), c = acc_col(lane, i);
          check(r >= 0 && r < 64 && c >= 0 && c < N, "accumulator element inside the tile");
          check(acc_half(i) == (r % 16 >= 8 ? 1 : 0), "acc_half names the row of the register");
          ++owner[r * N + c];
        }
    for (int x : owner) check(x == 1, "each accumulator element owned exactly once");
  }
  std::vector<int> owner(64 * 16, 0);
  for (int warp = 0; warp < 4; ++warp)
    for (int lane = 0; lane < 32; ++lane)
      for (int j = 0; j < 4; ++j)
        for (int h = 0; h < 2; ++h) ++owner[a_row(warp, lane, j) * 16 + a_col(lane, j, h)];
  for (int x : owner) check(x == 1, "each A-fragment element owned exactly once");
  for (int warp = 0; warp < 4; ++warp)
    for (int lane = 0; lane < 32; ++lane)
      for (int kk = 0; kk < 8; ++kk)
        for (int j = 0; j < 4; ++j)
          for (int h = 0; h < 2; ++h) {
            const int i = p_source(kk, j, h);
            check(i >= 0 && i < 64, "p_source inside the 64 x 128 accumulator");
            check(acc_row(warp, lane, i) == a_row(warp, lane, j) && acc_col(lane, i) == 16 * kk + a_col(lane, j, h),
                  "P -> A: the same (row, key) in the same thread");
          }
  std::printf("ok fragments: 64xN accumulators (N = 64, 128) and 64x16 A owned once each; P -> A in-thread\n");
}

void check_swizzle() {
  for (uint32_t atom = 0; atom < 4; ++atom) {
    std::vector<int> seen(64, 0);
    for (uint32_t r = 0; r < 8; ++r)
      for (uint32_t c = 0; c < 8; ++c)
        for (uint32_t byte = 0; byte < 16; byte += 2) {
          const uint32_t from = atom * 1024 + r * 128 + c * 16 + byte, to = swizzle128(from);
          check(to / 1024 == atom && (to % 1024) / 128 == r && to % 16 == byte, "swizzle stays in its atom and row");
          check((to % 128) / 16 == (c ^ r), "PTX 128-byte swizzle: chunk c of row r at c ^ r");
          if (byte == 0) ++seen[(to % 1024) / 16];
        }
    for (int x : seen) check(x == 1, "swizzle is a bijection of the atom's chunks");
  }
  for (int D : {64, 128})
    for (int rows : {64, 128}) {
      std::vector<int> seen(rows * D / 8, 0);
      for (int r = 0; r < rows; ++r)
        for (int ch = 0; ch < D / 8; ++ch) {
          const uint32_t off = tile_offset(rows, r, ch);
          check(off % 16 == 0 && off < static_cast<uint32_t>(rows * D * 2), "tile_offset inside the tile");
          ++seen[off / 16];
          // TMA, SWIZZLE_128B, box of 64 values x rows into column block ch / 8: element (r, col) at
          // swizzle128(r * 128 + 2 col) from the (1024-byte aligned) box start.
          const uint32_t box = static_cast<uint32_t>((ch / 8) * rows * 128);
          check(off == box + swizzle128(static_cast<uint32_t>(r * 128 + (ch % 8) * 16)), "TMA box layout = tile_offset");
        }
      for (int x : seen) check(x == 1, "tile_offset is a bijection of the tile's chunks");
    }
  std::printf("ok swizzle: bijection per 1024-byte atom, chunk c of row r at c ^ r, TMA boxes = tile layout\n");
}

void check_descriptors() {
  const uint64_t d = make_desc(0x2A3C0u, 0x4000u, 1024u);
  check((d & 0x3FFFu) == (0x2A3C0u >> 4), "start address in bits 0..13");
  check(((d >> 16) & 0x3FFFu) == (0x4000u >> 4), "leading byte offset in bits 16..29");
  check(((d >> 32) & 0x3FFFu) == (1024u >> 4), "stride byte offset in bits 32..45");
  check(((d >> 49) & 7u) == 0 && (d >> 62) == 1 && ((d >> 14) & 3u) == 0 && ((d >> 30) & 3u) == 0 &&
            ((d >> 46) & 7u) == 0 && ((d >> 52) & 0x3FFu) == 0,
        "base offset 0, swizzle mode 1 (128B) in bits 62..63, reserved bits 0");
  check(desc_addr(d) == 0x2A3C0u && desc_lbo(d) == 0x4000u && desc_sbo(d) == 1024u && desc_swizzle(d) == kSwizzle128,
        "descriptor fields read back");
  const uint32_t base = 0x8400u;  // 1024-byte aligned, as the kernel's tiles
  for (int D : {64, 128})
    for (int rows : {64, 128})
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint64_t dk = desc_k_major(base, rows, kk);
        for (int mn = 0; mn < rows; ++mn)
          for (int k = 0; k < 16; ++k) {
            const int col = 16 * kk + k;
            check(desc_read_k_major(dk, mn, k) == base + tile_offset(rows, mn, col / 8) + 2 * (col % 8),
                  "K-major descriptor reads (row mn, k-value 16 kk + k)");
          }
      }
  for (int D : {64, 128})
    for (int rows : {64, 128})
      for (int kk = 0; kk < rows / 16; ++kk) {
        const uint64_t dv = desc_mn_major(base, rows, kk);
        for (int n = 0; n < D; ++n)
          for (int k = 0; k < 16; ++k)
            check(desc_read_mn_major(dv, n, k) == base + tile_offset(rows, 16 * kk + k, n / 8) + 2 * (n % 8),
                  "MN-major descriptor reads (key 16 kk + k, d n)");
      }
  std::printf("ok descriptors: fields, K-major (Q, K) and MN-major (V) reads of every k-step\n");
}

// ---- emulation ----------------------------------------------------------------------------------------
float round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7F800000u) == 0x7F800000u) return x;  // inf, nan
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&x, &u, 4);
  return x;
}
struct Smem {  // 16-bit values stored as floats at byte offsets (2-byte granularity)
  std::vector<float> v;
  explicit Smem(size_t bytes) : v(bytes / 2, 0.f) {}
  float& at(uint32_t byte) { return v.at(byte / 2); }
};

// One consumer warpgroup (64 packed rows = tree tokens 0..64/G-1), keys 0 .. keys-1 in tiles of BN = 128,
// prefix n, tree mask [T][T]; returns the max abs error of out and checks lse, against fp64.
double emulate(int D, int n, int T, int G, const std::vector<int>& mask, bool round_p, std::mt19937& rng) {
  constexpr int BN = 128, M = 64;
  const int keys = n + T, tiles = (keys + BN - 1) / BN, rows = T * G;
  const float scale = 1.f / std::sqrt(static_cast<float>(D)), scale_log2 = scale * 1.4426950408889634f;
  std::normal_distribution<float> normal;
  std::vector<float> q(M * D), k(tiles * BN * D), v(tiles * BN * D);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < D; ++c) q[r * D + c] = r < rows ? round_bf16(normal(rng)) : 0.f;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int key = 0; key < tiles * BN; ++key)
    for (int c = 0; c < D; ++c) {
      k[key * D + c] = key < keys ? round_bf16(normal(rng)) : nan;  // stale slots: NaN
      v[key * D + c] = key < keys ? round_bf16(normal(rng)) : nan;
    }
  auto visible = [&](int r, int key) {
    return key < n || (key < keys && r < rows && mask[(r / G) * T + key - n]);
  };

  // Shared memory as the kernel lays it out: Q through its store loop, K and V through TMA boxes.
  Smem qs(M * D * 2);
  for (int c = 0; c < M * D / 2; ++c) {
    const int r = c / (D / 2), word = c % (D / 2);
    for (int e = 0; e < 2; ++e) qs.at(tile_offset(M, r, word / 4) + 4 * (word % 4) + 2 * e) = q[r * D + 2 * word + e];
  }
  const uint32_t q_addr = 0;

  std::vector<float> o(128 * (D / 2), 0.f), s(128 * (BN / 2)), m(128 * 2, -INFINITY), l(128 * 2, 0.f), corr(256);
  std::vector<float> pa(128 * BN);  // P as A fragments, [thread][kk][j][h]
  auto tid_of = [](int warp, int lane) { return 32 * warp + lane; };

  auto load_tile = [&](int kb, Smem& ks, Smem& vs) {
    for (int r = 0; r < BN; ++r)
      for (int c = 0; c < D; ++c) {
        const uint32_t off = tile_offset(BN, r, c / 8) + 2 * (c % 8);
        ks.at(off) = k[(kb * BN + r) * D + c];
        vs.at(off) = v[(kb * BN + r) * D + c];
      }
    const int first = keys - kb * BN;  // the kernel zeroes V rows past the live keys
    if (first < BN)
      for (int c = 0; c < (BN - first) * (D / 64) * 8; ++c) {
        const int r = first + c / ((D / 64) * 8), cb = (c / 8) % (D / 64), ch = c % 8;
        for (int b = 0; b < 16; b += 2) vs.at(cb * BN * 128 + r * 128 + ch * 16 + b) = 0.f;
      }
  };
  // S = Q K^T as the tensor cores compute it: per k-step, D[row][col] += sum_k A(row, k) B(col, k).
  auto wgmma_qk = [&](Smem& ks) {
    for (int warp = 0; warp < 4; ++warp)
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < BN / 2; ++i) {
          const int row = acc_row(warp, lane, i), col = acc_col(lane, i);
          float acc = 0.f;
          for (int kk = 0; kk < D / 16; ++kk) {
            const uint64_t da = desc_k_major(q_addr, M, kk), db = desc_k_major(0, BN, kk);
            for (int kx = 0; kx < 16; ++kx) acc += qs.at(desc_read_k_major(da, row, kx)) * ks.at(desc_read_k_major(db, col, kx));
          }
          s[tid_of(warp, lane) * (BN / 2) + i] = acc;
        }
  };
  // O += P V: A = the P fragments of all threads, B through the MN-major descriptor.
  auto wgmma_pv = [&](Smem& vs) {
    std::vector<float> a(M * BN);
    for (int warp = 0; warp < 4; ++warp)
      for (int lane = 0; lane < 32; ++lane)
        for (int kk = 0; kk < BN / 16; ++kk)
          for (int j = 0; j < 4; ++j)
            for (int h = 0; h < 2; ++h)
              a[a_row(warp, lane, j) * BN + 16 * kk + a_col(lane, j, h)] = pa[tid_of(warp, lane) * BN + kk * 8 + j * 2 + h];
    for (int warp = 0; warp < 4; ++warp)
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < D / 2; ++i) {
          const int row = acc_row(warp, lane, i), col = acc_col(lane, i);
          float acc = 0.f;
          for (int kk = 0; kk < BN / 16; ++kk) {
            const uint64_t db = desc_mn_major(0, BN, kk);
            for (int kx = 0; kx < 16; ++kx) acc += a[row * BN + 16 * kk + kx] * vs.at(desc_read_mn_major(db, col, kx));
          }
          o[tid_of(warp, lane) * (D / 2) + i] += acc;
        }
  };
  // The kernel's softmax, thread by thread; quad shuffles as reductions over lanes 4 g .. 4 g + 3.
  auto softmax = [&](int kb) {
    const bool prefix_only = (kb + 1) * BN <= n;
    std::vector<float> mx(256);
    for (int warp = 0; warp < 4; ++warp)
      for (int lane = 0; lane < 32; ++lane) {
        const int tid = tid_of(warp, lane);
        for (int i = 0; i < BN / 2; ++i)  // raw scores, masked
          if (!prefix_only && !visible(acc_row(warp, lane, i), kb * BN + acc_col(lane, i)))
            s[tid * (BN / 2) + i] = -INFINITY;
        for (int half = 0; half < 2; ++half) {
          float x = -INFINITY;
          for (int i = 0; i < BN / 2; ++i)
            if (acc_half(i) == half) x = std::fmax(x, s[tid * (BN / 2) + i]);
          mx[tid * 2 + half] = x;
        }
      }
    for (int tid = 0; tid < 128; ++tid)
      for (int half = 0; half < 2; ++half) {
        float x = -INFINITY;
        for (int lq = 0; lq < 4; ++lq) x = std::fmax(x, mx[((tid & ~3) + lq) * 2 + half]);
        x = std::fmax(m[tid * 2 + half], x * scale_log2);
        const float base = x == -INFINITY ? 0.f : x;
        corr[tid * 2 + half] = std::exp2(m[tid * 2 + half] - base);
        m[tid * 2 + half] = x;
        float sum = 0.f;
        for (int i = 0; i < BN / 2; ++i)
          if (acc_half(i) == half) {
            float& e = s[tid * (BN / 2) + i];
            e = std::exp2(std::fma(e, scale_log2, -base));
            sum += e;
          }
        l[tid * 2 + half] = l[tid * 2 + half] * corr[tid * 2 + half] + sum;
      }
  };
  auto pack_p = [&] {
    for (int tid = 0; tid < 128; ++tid)
      for (int kk = 0; kk < BN / 16; ++kk)
        for (int j = 0; j < 4; ++j)
          for (int h = 0; h < 2; ++h) {
            const float x = s[tid * (BN / 2) + p_source(kk, j, h)];
            pa[tid * BN + kk * 8 + j * 2 + h] = round_p ? round_bf16(x) : x;
          }
  };

  // The kernel's order: S_0; softmax; P_0; then per tile j: S_j, P_{j-1} V_{j-1}, softmax(S_j), rescale O.
  std::vector<Smem> ks(tiles, Smem(BN * D * 2)), vs(tiles, Smem(BN * D * 2));
  for (int kb = 0; kb < tiles; ++kb) load_tile(kb, ks[kb], vs[kb]);
  wgmma_qk(ks[0]);
  softmax(0);
  pack_p();
  for (int j = 1; j < tiles; ++j) {
    wgmma_qk(ks[j]);
    wgmma_pv(vs[j - 1]);
    softmax(j);
    for (int tid = 0; tid < 128; ++tid)
      for (int i = 0; i < D / 2; ++i) o[tid * (D / 2) + i] *= corr[tid * 2 + acc_half(i)];
    pack_p();
  }
  wgmma_pv(vs[tiles - 1]);

  // Epilogue and the dense fp64 reference.
  double err = 0.0;
  for (int warp = 0; warp < 4; ++warp)
    for (int lane = 0; lane < 32; ++lane) {
      const int tid = tid_of(warp, lane);
      for (int half = 0; half < 2; ++half) {
        float total = 0.f;
        for (int lq = 0; lq < 4; ++lq) total += l[((tid & ~3) + lq) * 2 + half];
        const int r = acc_row(warp, lane, 2 * half);
        if (r >= rows) continue;
        const float lse = total > 0.f ? (m[tid * 2 + half] + std::log2(total)) * 0.6931471805599453f : -INFINITY;
        double mref = -INFINITY;
        std::vector<double> sc(keys);
        for (int key = 0; key < keys; ++key) {
          double dot = 0.0;
          for (int c = 0; c < D; ++c) dot += static_cast<double>(q[r * D + c]) * k[key * D + c];
          sc[key] = visible(r, key) ? dot * scale : -INFINITY;
          mref = std::fmax(mref, sc[key]);
        }
        double lref = 0.0;
        for (int key = 0; key < keys; ++key) lref += sc[key] == -INFINITY ? 0.0 : std::exp(sc[key] - mref);
        const double lse_ref = lref > 0.0 ? mref + std::log(lref) : -INFINITY;
        check(std::isinf(lse_ref) ? std::isinf(lse) && lse < 0 : std::fabs(lse - lse_ref) < 1e-3, "lse");
        for (int i = 0; i < D / 2; ++i) {
          if (acc_half(i) != half) continue;  // a register of the thread's other row
          const int col = acc_col(lane, i);
          double ref = 0.0;
          for (int key = 0; key < keys; ++key)
            if (sc[key] != -INFINITY) ref += std::exp(sc[key] - mref) / lref * v[key * D + col];
          const float got = total > 0.f ? o[tid * (D / 2) + i] / total : 0.f;
          check(std::isfinite(got), "finite output (stale NaN slots never reach it)");
          err = std::fmax(err, std::fabs(got - ref));
        }
      }
    }
  return err;
}

void check_emulation() {
  std::mt19937 rng(1234);
  for (int D : {64, 128}) {
    // Two tiles: tile 0 inside the prefix (no mask), tile 1 with the prefix tail, the tree and stale slots.
    const int T = 20, G = 4, n = 128 + 40;
    std::vector<int> mask(T * T);
    for (int i = 0; i < T; ++i)
      for (int j = 0; j < T; ++j) mask[i * T + j] = j == i || (j < i && (rng() % 2));
    const double exact = emulate(D, n, T, G, mask, false, rng);
    const double rounded = emulate(D, n, T, G, mask, true, rng);
    std::printf("ok emulation D=%d, 2 tiles, prefix %d, T=%d, G=%d: max |err| fp32 P %.2e, bf16 P %.2e\n", D, n, T,
                G, exact, rounded);
    check(exact < 2e-5, "emulation with fp32 P equals the fp64 attention");
    check(rounded < 2e-2, "emulation with bf16 P within bf16 rounding");
    // One tile, no prefix, tree token 3 sees nothing: out 0 and lse -inf (checked inside).
    mask[3 * T + 3] = 0;
    for (int j = 0; j < T; ++j) mask[3 * T + j] = 0;
    const double lonely = emulate(D, 0, T, G, mask, false, rng);
    std::printf("ok emulation D=%d, 1 tile, no prefix, a row that sees nothing: max |err| %.2e\n", D, lonely);
    check(lonely < 2e-5, "emulation without prefix");
  }
}

}  // namespace

int main() {
  check_fragments();
  check_swizzle();
  check_descriptors();
  check_emulation();
  std::printf("all checks passed\n");
  return 0;
}
