"""Triton tree attention.

One program owns (batch row b, KV head h, query tile, KV split). A query tile packs the T x G query
rows that share KV head h (G = Hq / Hkv; packed row r is tree token r // G, query head h * G + r % G),
so every K/V block is loaded once for all of them. Each program runs two stages:

- prefix stage: the full BLOCK_N blocks of the cache prefix [0, cache_seqlens[b]) that belong to its
  split, with no mask work at all;
- tree stage: the prefix tail that does not fill a block, then the T tree tokens, masked by
  `tree_mask`'s bytes, read in place (no cap on T, no packing launch before the kernel), in blocks of
  BLOCK_T keys, which may be narrower than the prefix stage's BLOCK_N. The blocks are dealt round-robin
  to the splits, so that with several splits no program runs its share of the prefix and the whole
  tree one after the other (the critical path at batch 1).

Online softmax in fp32, base 2, with the softmax scale and log2(e) folded into one multiplier. With
several splits each writes a normalised partial output and its log-sum-exp, and a second small kernel
merges them deterministically (no atomics). When `k`/`v` are given, the tree stage reads the tree's
keys/values from them and the (query tile 0, last split) program of each (b, h) writes them into the
cache, so nothing in the launch reads a cache slot that it writes.

Paged caches (PAGED): k_cache, v_cache are [num_blocks, PAGE, Hkv, D] and a row's logical position p
lives in block BLOCK_TABLE[b, p // PAGE] at offset p % PAGE. Every key tile looks its rows' blocks up,
so tiles may cross block boundaries and any block size works; the contiguous path is compiled without it.

Bad lengths and block ids are caught on the device, so that no launch reads the lengths on the host: a
row whose cache_seqlens is outside [0, CAP - T] (CAP: the row's capacity) or that uses a block id
outside [0, NUM_BLOCKS) reads and writes no cache slot through them, and all its outputs and lse are NaN.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import interpreting

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _online_softmax_step(acc, m_i, l_i, s, qk_scale, v, DOT_PREC: tl.constexpr):
    """Fold one block of raw scores s = q k [BM, BN] (-inf where hidden), whose base-2 logits are
    s * qk_scale (qk_scale > 0), and values v [BN, BD] into the running (acc, max, sum) of the logits.
    Rows that have seen nothing keep m = -inf, l = 0, acc = 0.
    The block's max is taken over the raw scores and scaled once per row (rounding is monotonic, so this
    is the max of the rounded logits, bit for bit), and each exponent is one FMA: one multiply per score
    fewer than scaling the scores first."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_base)
    p = tl.exp2(s * qk_scale - m_base[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _paged_rows(BLOCK_TABLE, pos, m_pos, sbtn, PAGE, NUM_BLOCKS, skb, sks, svb, svs):
    """Offsets in k_cache and v_cache of the rows of logical positions pos [N] of a paged cache, whose
    block table row starts at BLOCK_TABLE (blocks are looked up only where m_pos), and a mask of the
    positions whose block id lies outside [0, NUM_BLOCKS) (their offsets are those of block 0)."""
    block = tl.load(BLOCK_TABLE + (pos // PAGE) * sbtn, mask=m_pos, other=0).to(tl.int64)
    oob = (block < 0) | (block >= NUM_BLOCKS)
    block = tl.where(oob, 0, block)
    slot = pos % PAGE
    return block * skb + slot * sks, block * svb + slot * svs, oob


@triton.jit
def _tree_attention_fwd_kernel(
    Q, KC, VC, KN, VN, SEQLENS, MASK, BLOCK_TABLE, O, LSE,
    s_len, sqb, sqt, sqh, sqd,
    skb, sks, skh, skd,
    svb, svs, svh, svd,
    snb, snt, snh, snd,
    swb, swt, swh, swd,
    smb, smt, smj,
    sbtb, sbtn,
    sos, sob, sot, soh, sod,
    sls, slb, slh, slt,
    T, HKV, D, PAGE, CAP, NUM_BLOCKS, qk_scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, MIN_SPLIT_BLOCKS: tl.constexpr, HAS_KV: tl.constexpr, PAGED: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    # Scalar bases are 64-bit (a [B, S, Hkv, D] cache can exceed 2**31 elements); offsets inside a
    # tile stay 32-bit, which keeps the per-element address math cheap.
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV
    seqlen = tl.load(SEQLENS + b * s_len)
    bad = (seqlen < 0) | (seqlen > CAP - T)  # then nothing of the row's cache is touched: outputs NaN
    seqlen = tl.where(bad, 0, seqlen)
    bad_block = tl.zeros([BLOCK_N], dtype=tl.int1)  # keys of this program's tiles whose block id is bad
    last_split = split == NUM_SPLITS - 1

    o_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed query rows
    o_t = o_r // G
    o_hq = h * G + o_r % G
    m_r = o_t < T
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_n = tl.arange(0, BLOCK_N)
    if PAGED:
        BLOCK_TABLE += b * sbtb
    else:
        KC += b * skb
        VC += b * svb
    KC += h * skh
    VC += h * svh
    KN += b * snb + h * snh
    VN += b * swb + h * swh
    off_k = o_d[:, None] * skd + o_n[None, :] * sks  # K is loaded transposed: [BLOCK_D, BLOCK_N]
    off_v = o_n[:, None] * svs + o_d[None, :] * svd  # [BLOCK_N, BLOCK_D]

    # Copy the new tree keys/values into the cache (one program per (b, h)).
    if HAS_KV:
        n_copy = tl.where((pid_m == 0) & last_split & ~bad, T, 0)
        for j0 in range(0, n_copy, BLOCK_N):
            m_j = (j0 + o_n) < T
            m_copy = m_j[:, None] & m_d[None, :]
            b_k = tl.load(KN + (j0 + o_n)[:, None] * snt + o_d[None, :] * snd, mask=m_copy)
            b_v = tl.load(VN + (j0 + o_n)[:, None] * swt + o_d[None, :] * swd, mask=m_copy)
            if PAGED:
                r_k, r_v, oob = _paged_rows(BLOCK_TABLE, seqlen + j0 + o_n, m_j, sbtn, PAGE, NUM_BLOCKS,
                                            skb, sks, svb, svs)
                m_copy = m_copy & ~oob[:, None]
                bad_block |= oob & m_j
                tl.store(KC + r_k[:, None] + o_d[None, :] * skd, b_k, mask=m_copy)
                tl.store(VC + r_v[:, None] + o_d[None, :] * svd, b_v, mask=m_copy)
            else:
                pos = (seqlen + j0).to(tl.int64)
                tl.store(KC + pos * sks + o_n[:, None] * sks + o_d[None, :] * skd, b_k, mask=m_copy)
                tl.store(VC + pos * svs + off_v, b_v, mask=m_copy)

    p_q = Q + b * sqb + o_t[:, None] * sqt + o_hq[:, None] * sqh + o_d[None, :] * sqd
    b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)
    if DOT_F32:
        b_q = b_q.to(tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Prefix stage: whole blocks of this split, no masks. A split takes at least MIN_SPLIT_BLOCKS of the
    # row's live prefix, so a short prefix runs on fewer splits and the others end at once.
    n_full = seqlen // BLOCK_N
    per_split = tl.maximum(tl.cdiv(n_full, NUM_SPLITS), MIN_SPLIT_BLOCKS)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_full)
    p_k = KC + (lo * BLOCK_N).to(tl.int64) * sks
    p_v = VC + (lo * BLOCK_N).to(tl.int64) * svs
    for i in range(lo, hi):
        if PAGED:
            o_key = i * BLOCK_N + o_n
            r_k, r_v, oob = _paged_rows(BLOCK_TABLE, o_key, o_key < seqlen, sbtn, PAGE, NUM_BLOCKS,
                                        skb, sks, svb, svs)
            bad_block |= oob & (o_key < seqlen)
            t_k = KC + r_k[None, :] + o_d[:, None] * skd
            t_v = VC + r_v[:, None] + o_d[None, :] * svd
        else:
            t_k = p_k + off_k
            t_v = p_v + off_v
            p_k += BLOCK_N * sks
            p_v += BLOCK_N * svs
        if EVEN_D:
            b_k = tl.load(t_k)
            b_v = tl.load(t_v)
        else:
            b_k = tl.load(t_k, mask=m_d[:, None], other=0.0)
            b_v = tl.load(t_v, mask=m_d[None, :], other=0.0)
        if DOT_F32:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        s = tl.dot(b_q, b_k, input_precision=DOT_PREC)
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, qk_scale, b_v, DOT_PREC)

    # Tree stage: the prefix tail, then the tree tokens under the mask, in blocks of BLOCK_T keys (its mask
    # work holds more registers per key than the prefix stage), block c on split c % NUM_SPLITS.
    o_n = tl.arange(0, BLOCK_T)
    off_k = o_d[:, None] * skd + o_n[None, :] * sks
    off_v = o_n[:, None] * svs + o_d[None, :] * svd
    tail_lo = n_full * BLOCK_N
    for start in range(tail_lo + split * BLOCK_T, seqlen + T, NUM_SPLITS * BLOCK_T):
        m_pre = start + o_n < seqlen
        o_j = start + o_n - seqlen  # tree token index
        m_tree = (o_j >= 0) & (o_j < T)
        o_j = tl.where(m_tree, o_j, 0)
        m_live = m_pre | m_tree
        if PAGED:
            r_k, r_v, oob = _paged_rows(BLOCK_TABLE, start + o_n, m_live, sbtn, PAGE, NUM_BLOCKS,
                                        skb, sks, svb, svs)
            bad = bad | (tl.max((oob & m_live).to(tl.int32), 0) != 0)
            t_k = KC + r_k[None, :] + o_d[:, None] * skd
            t_v = VC + r_v[:, None] + o_d[None, :] * svd
        else:
            t_k = KC + tl.cast(start, tl.int64) * sks + off_k
            t_v = VC + tl.cast(start, tl.int64) * svs + off_v
        if HAS_KV:  # prefix tail from the cache, tree tokens from k / v
            b_k = tl.load(t_k, mask=m_pre[None, :] & m_d[:, None], other=0.0)
            b_k += tl.load(KN + o_j[None, :] * snt + o_d[:, None] * snd,
                           mask=m_tree[None, :] & m_d[:, None], other=0.0)
            b_v = tl.load(t_v, mask=m_pre[:, None] & m_d[None, :], other=0.0)
            b_v += tl.load(VN + o_j[:, None] * swt + o_d[None, :] * swd,
                           mask=m_tree[:, None] & m_d[None, :], other=0.0)
        else:
            b_k = tl.load(t_k, mask=m_live[None, :] & m_d[:, None], other=0.0)
            b_v = tl.load(t_v, mask=m_live[:, None] & m_d[None, :], other=0.0)
        if DOT_F32:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        seen = tl.load(MASK + b * smb + o_t[:, None] * smt + o_j[None, :] * smj,
                       mask=m_r[:, None] & m_tree[None, :], other=0)
        visible = m_pre[None, :] | (seen != 0)
        s = tl.where(visible, tl.dot(b_q, b_k, input_precision=DOT_PREC), float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, qk_scale, b_v, DOT_PREC)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    bad = bad | (tl.max(bad_block.to(tl.int32), 0) != 0)
    out = tl.where(bad, float("nan"), out)
    lse = tl.where(bad, float("nan"), lse)
    p_o = O + split * sos + b * sob + o_t[:, None] * sot + o_hq[:, None] * soh + o_d[None, :] * sod
    tl.store(p_o, out.to(O.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])
    tl.store(LSE + split * sls + b * slb + o_hq * slh + o_t * slt, lse, mask=m_r)


@triton.jit
def _tree_attention_merge_kernel(
    OP, LP, O, LSE,
    sps, spb, spt, sph, spd,
    sqs, sqb, sqh, sqt,
    sob, sot, soh, sod,
    slb, slh, slt,
    T, HQ, D,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the per-split partial outputs of one query row by their log-sum-exp (NaN if a split's is)."""
    pid = tl.program_id(0)
    b = (pid // (T * HQ)).to(tl.int64)
    t = (pid // HQ) % T
    hq = pid % HQ
    o_sp = tl.arange(0, BLOCK_S)
    m_sp = o_sp < NUM_SPLITS
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    lse_sp = tl.load(LP + o_sp * sqs + b * sqb + hq * sqh + t * sqt, mask=m_sp, other=float("-inf"))
    m = tl.max(lse_sp, 0)
    m_base = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_sp - m_base)
    w_sum = tl.sum(w, 0)
    p_op = OP + o_sp[:, None] * sps + b * spb + t * spt + hq * sph + o_d[None, :] * spd
    parts = tl.load(p_op, mask=m_sp[:, None] & m_d[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    lse = tl.where(w_sum > 0.0, m_base + tl.log(tl.where(w_sum > 0.0, w_sum, 1.0)), float("-inf"))
    bad = tl.max((lse_sp != lse_sp).to(tl.int32), 0) != 0  # a split saw a bad length or block id
    out = tl.where(bad, float("nan"), out)
    lse = tl.where(bad, float("nan"), lse)
    tl.store(O + b * sob + t * sot + hq * soh + o_d * sod, out.to(O.dtype.element_ty), mask=m_d)
    tl.store(LSE + b * slb + hq * slh + t * slt, lse)


TUNABLE = ("BLOCK_M", "BLOCK_N", "BLOCK_T", "num_warps", "num_stages")
# What benchmarks/tune_tree_attention.py tries against kernel_config's choice for 16-bit inputs with head
# dims up to 128; each compiles without register spills for sm_90 (tests/triton_aot.py).
TUNE_CANDIDATES = (
    dict(BLOCK_N=64, BLOCK_T=16), dict(BLOCK_N=64, BLOCK_T=16, num_stages=3), dict(BLOCK_N=128, BLOCK_T=16),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_T=16, num_stages=3), dict(BLOCK_M=64, BLOCK_N=128, BLOCK_T=16),
    dict(BLOCK_N=64, BLOCK_T=16, num_stages=4), dict(BLOCK_N=64, BLOCK_T=32, num_stages=3),
    dict(BLOCK_N=128, BLOCK_T=16, num_stages=3),
)


# Measured tiles per (arch, dtype class, BLOCK_D, packed rows rounded up to a power of two, at most 256): what
# benchmarks/tune_tree_attention.py prints as the fastest correct candidate on a GPU of that arch (the
# tiles only; the split count stays the heuristic's). Shapes without an entry take kernel_config's rule.
# fp16 and bf16 share entries ("16-bit"): their kernels differ in the MMA's input type and the conversion
# of P only, at the same tensor-core rate; fp32 is its own class.
# H200, 2026-12-04 (benchmarks/RESULTS.md), bf16, D 128, split heuristic, against the rule:
#   64 rows (where BLOCK_M is 64 anyway): Hq/Hkv 32/32 B 1 L 2048 T 64: 39.1-39.9 us (rule 45.2);
#     32/8 B 1 L 4096 T 16: 27.0 us (rule 30.7)
#   256 rows: 32/8 B 1 L 2048 T 64: 37.6 us (rule 38.9); 32/8 B 8 L 16384 T 64: 373.8 us (rule 706.9)
TUNED: dict[tuple[int, str, int, int], dict] = {
    (90, "16-bit", 128, 64): dict(BLOCK_N=64, BLOCK_T=16, num_stages=3),
    (90, "16-bit", 128, 256): dict(BLOCK_N=64, BLOCK_T=16, num_stages=3),
}


def table_key(arch: int, dtype: torch.dtype, D: int, rows: int) -> tuple[int, str, int, int]:
    """The TUNED key of a launch: (compute capability as 80 / 90, "16-bit" or "float32", BLOCK_D, row bucket)."""
    bucket = min(256, max(16, triton.next_power_of_2(rows)))
    return arch, "float32" if dtype == torch.float32 else "16-bit", max(16, triton.next_power_of_2(D)), bucket


def kernel_config(rows: int, D: int, dtype: torch.dtype, interpret: bool, arch: int | None = None) -> dict:
    """Tile sizes and launch options of the attention kernel for `rows` = T * G packed query rows on a GPU
    of compute capability `arch` (80, 90; None under the interpreter): TUNED's entry, else the rule below.

    Chosen so that the kernel compiles without register spills and within the shared memory of sm_80
    and sm_90 (tests/triton_aot.py checks it). fp32 dots run at "ieee" precision, without tensor
    cores, so fp32 takes small tiles. BLOCK_N keys per prefix block, BLOCK_T per tree-stage block:
    the tree stage's mask work holds more registers per key, so a small BLOCK_T lets the prefix stage
    take wider blocks without spills (sm_90, bf16, D 128, 8 warps: BLOCK_N 64 or 128 with BLOCK_T 16
    compile without spills, with BLOCK_T = BLOCK_N they spill).
    """
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:
        BLOCK_M, stages = min(32 if BLOCK_D <= 128 else 16, max(16, triton.next_power_of_2(rows))), 1
    else:
        BLOCK_M, stages = min(128 if BLOCK_D <= 128 else 64, max(16, triton.next_power_of_2(rows))), 2
    dot_f32 = interpret and dtype == torch.bfloat16  # bf16 tl.dot is wrong under the interpreter
    cfg = dict(
        BLOCK_M=BLOCK_M, BLOCK_N=32, BLOCK_T=32, BLOCK_D=BLOCK_D, EVEN_D=BLOCK_D == D,
        DOT_F32=dot_f32, DOT_PREC="ieee" if dtype == torch.float32 or dot_f32 else "tf32",
        num_warps=8 if BLOCK_M >= 128 or BLOCK_M * BLOCK_D >= 128 * 128 else 4, num_stages=stages,
    )
    if arch is not None and not interpret:
        cfg.update(TUNED.get(table_key(arch, dtype, D, rows), {}))
    return cfg


@functools.lru_cache(maxsize=None)
def device_arch(index: int) -> int:
    """Compute capability of CUDA device `index` as major * 10 + minor (80, 90)."""
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


MIN_SPLIT_KEYS = 256  # keys of a row's live prefix that one split takes at least (heuristic splits)
MAX_SPLITS = 64


def split_count(programs: int, capacity: int, sms: int) -> int:
    """KV splits of a launch of `programs` (b, h, query tile) programs over caches of `capacity` positions,
    on a GPU of `sms` SMs: as many as fit in two waves of programs (the GPU full at batch 1; rounding up
    would start a third, mostly idle wave: at B 8, L 16384, T 16 on an H200, 64 programs took 5 splits,
    320 programs for 264 places), at most one split per MIN_SPLIT_KEYS positions of capacity and
    MAX_SPLITS; one split where the programs fill most of a wave alone (H200, B 8, L 16384, T 64, 128
    programs on 132 SMs: 336 us at one split, 374 us at two). The count is fixed at launch without
    reading the lengths on the host; the kernel then spreads each row's live prefix over at most
    live / MIN_SPLIT_KEYS of them (the rest end at once, and the merge weighs them 0), so the work follows
    the live prefix."""
    if 10 * programs >= 9 * sms:
        return 1
    return max(1, min(2 * sms // programs, capacity // MIN_SPLIT_KEYS, MAX_SPLITS))


def _num_splits(programs: int, capacity: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return split_count(programs, capacity, torch.cuda.get_device_properties(device).multi_processor_count)


def tree_attention_fwd(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: dict | None = None,
    block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch tree attention; inputs as in `ht_kernels.tree_attention` (already validated), paged caches
    [num_blocks, block_size, Hkv, D] with block_table [B, max_blocks] int32 included.

    Returns out [B, T, Hq, D] in q's dtype and lse [B, Hq, T] fp32, written into `out` / `lse` when
    given (any strides). `num_splits` overrides the split-KV heuristic (`split_count`; the live prefix is
    then divided evenly over exactly that many splits), and `config` the tiles and
    launch options of `kernel_config` (keys in TUNABLE; benchmarks/tune_tree_attention.py).
    """
    B, T, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    paged = block_table is not None
    page = S if paged else 1                      # positions per block of a paged cache
    S = block_table.shape[1] * page if paged else S  # a row's logical capacity
    G = Hq // Hkv
    out = q.new_empty(B, T, Hq, D) if out is None else out
    lse = q.new_empty(B, Hq, T, dtype=torch.float32) if lse is None else lse
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    if scale <= 0:  # the kernel's softmax step wants a positive scale: -q for a negative one (exact), and
        q, scale = (-q, -scale) if scale < 0 else (torch.zeros_like(q), 1.0)  # for 0, equal weights
    mask = tree_mask.view(torch.uint8)  # its bytes, in place
    if mask.dim() == 2:
        mask = mask.unsqueeze(0).expand(B, -1, -1)  # stride 0 over rows: one shared mask

    arch = device_arch(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
        if q.is_cuda else None
    cfg = kernel_config(T * G, D, q.dtype, interpreting(), arch)
    for key, value in (config or {}).items():
        tile = key.startswith("BLOCK_")
        if key not in TUNABLE or not isinstance(value, int) or value < (16 if tile else 1) or \
                (tile and value & (value - 1)):
            raise ValueError(f"tree_attention_fwd: config keys must be among {TUNABLE}, tiles powers of two "
                             f">= 16 and launch options positive integers, got {key}={value!r}")
        cfg[key] = value
    m_tiles = triton.cdiv(T * G, cfg["BLOCK_M"])
    splits = num_splits or _num_splits(B * Hkv * m_tiles, S, q.device)
    if splits > 1:
        o_buf = torch.empty(splits, B, T, Hq, D, dtype=torch.float32, device=q.device)
        l_buf = torch.empty(splits, B, Hq, T, dtype=torch.float32, device=q.device)
    else:
        o_buf, l_buf = out.unsqueeze(0), lse.unsqueeze(0)
    has_kv = k is not None
    kn, vn = (k, v) if has_kv else (k_cache, v_cache)  # placeholders, never read without HAS_KV
    # Without PAGED the table is a placeholder, never read
    table, table_strides = (block_table, block_table.stride()) if paged else (cache_seqlens, (0, 0))
    _tree_attention_fwd_kernel[(B * Hkv, m_tiles, splits)](
        q, k_cache, v_cache, kn, vn, cache_seqlens, mask, table, o_buf, l_buf,
        cache_seqlens.stride(0), *q.stride(), *k_cache.stride(), *v_cache.stride(), *kn.stride(), *vn.stride(),
        *mask.stride(), *table_strides, *o_buf.stride(), *l_buf.stride(),
        T, Hkv, D, page, S, k_cache.shape[0] if paged else 0, scale * LOG2E,
        G=G, NUM_SPLITS=splits, MIN_SPLIT_BLOCKS=1 if num_splits else max(1, MIN_SPLIT_KEYS // cfg["BLOCK_N"]),
        HAS_KV=has_kv, PAGED=paged, **cfg,
    )
    if splits > 1:
        _tree_attention_merge_kernel[(B * T * Hq,)](
            o_buf, l_buf, out, lse,
            *o_buf.stride(), *l_buf.stride(), *out.stride(), *lse.stride(),
            T, Hq, D,
            NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=cfg["BLOCK_D"],
        )
    return out, lse
