"""Triton tree attention.

One program owns (batch row b, KV head h, query tile, KV split). A query tile packs the T x G query
rows that share KV head h (G = Hq / Hkv; packed row r is tree token r // G, query head h * G + r % G),
so every K/V block is loaded once for all of them. Each program runs two stages:

- prefix stage: the full BLOCK_N blocks of the cache prefix [0, cache_seqlens[b]) that belong to its
  split, with no mask work at all;
- tree stage (last split only): the prefix tail that does not fill a block, then the T tree tokens,
  masked by the ancestor bits of `tree_mask` packed into 32-bit words (no cap on T).

Online softmax in fp32, base 2, with the softmax scale and log2(e) folded into one multiplier. With
several splits each writes a normalised partial output and its log-sum-exp, and a second small kernel
merges them deterministically (no atomics). When `k`/`v` are given, the tree stage reads the tree's
keys/values from them and the (query tile 0, last split) program of each (b, h) writes them into the
cache, so nothing in the launch reads a cache slot that it writes.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..ops._backend import triton_interpreting
from ..tree import pack_mask_bits

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _online_softmax_step(acc, m_i, l_i, s, v, DOT_PREC: tl.constexpr):
    """Fold one block of base-2 scores s [BM, BN] (-inf where hidden) and values v [BN, BD] into the
    running (acc, max, sum). Rows that have seen nothing keep m = -inf, l = 0, acc = 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_base)
    p = tl.exp2(s - m_base[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _tree_attention_fwd_kernel(
    Q, KC, VC, KN, VN, SEQLENS, BITS, O, LSE,
    sqb, sqt, sqh, sqd,
    skb, sks, skh, skd,
    svb, svs, svh, svd,
    snb, snt, snh, snd,
    swb, swt, swh, swd,
    sbb, sbt,
    sos, sob, sot, soh, sod,
    sls, slb, slh, slt,
    T, HKV, D, qk_scale,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, HAS_KV: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // HKV
    h = pid_bh % HKV
    seqlen = tl.load(SEQLENS + b)
    last_split = split == NUM_SPLITS - 1

    o_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed query rows
    o_t = o_r // G
    o_hq = h * G + o_r % G
    m_r = o_t < T
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_n = tl.arange(0, BLOCK_N)

    # Copy the new tree keys/values into the cache (one program per (b, h)).
    if HAS_KV:
        n_copy = tl.where((pid_m == 0) & last_split, T, 0)
        for j0 in range(0, n_copy, BLOCK_N):
            m_copy = ((j0 + o_n) < T)[:, None] & m_d[None, :]
            o_c = (j0 + o_n)[:, None]
            b_k = tl.load(KN + b * snb + o_c * snt + h * snh + o_d[None, :] * snd, mask=m_copy)
            b_v = tl.load(VN + b * swb + o_c * swt + h * swh + o_d[None, :] * swd, mask=m_copy)
            pos = seqlen + j0 + o_n
            tl.store(KC + b * skb + pos[:, None] * sks + h * skh + o_d[None, :] * skd, b_k, mask=m_copy)
            tl.store(VC + b * svb + pos[:, None] * svs + h * svh + o_d[None, :] * svd, b_v, mask=m_copy)

    p_q = Q + b * sqb + o_t[:, None] * sqt + o_hq[:, None] * sqh + o_d[None, :] * sqd
    b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)
    if DOT_F32:
        b_q = b_q.to(tl.float32)
    p_k = KC + b * skb + h * skh + o_d[:, None] * skd  # K is loaded transposed: [BLOCK_D, BLOCK_N]
    p_v = VC + b * svb + h * svh + o_d[None, :] * svd

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Prefix stage: whole blocks of this split, no masks.
    n_full = seqlen // BLOCK_N
    per_split = tl.cdiv(n_full, NUM_SPLITS)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_full)
    for blk in range(lo, hi):
        o_s = blk * BLOCK_N + o_n
        if EVEN_D:
            b_k = tl.load(p_k + o_s[None, :] * sks)
            b_v = tl.load(p_v + o_s[:, None] * svs)
        else:
            b_k = tl.load(p_k + o_s[None, :] * sks, mask=m_d[:, None], other=0.0)
            b_v = tl.load(p_v + o_s[:, None] * svs, mask=m_d[None, :], other=0.0)
        if DOT_F32:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        s = tl.dot(b_q, b_k, input_precision=DOT_PREC) * qk_scale
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, b_v, DOT_PREC)

    # Tree stage (last split): the prefix tail, then the tree tokens under the packed ancestor bits.
    tail_lo = n_full * BLOCK_N
    tail_hi = tl.where(last_split, seqlen + T, tail_lo)
    for start in range(tail_lo, tail_hi, BLOCK_N):
        o_s = start + o_n
        m_pre = o_s < seqlen
        o_j = o_s - seqlen  # tree token index
        m_tree = (o_j >= 0) & (o_j < T)
        o_j = tl.where(m_tree, o_j, 0)
        if HAS_KV:
            p_knew = KN + b * snb + h * snh
            p_vnew = VN + b * swb + h * swh
            b_k = tl.load(p_k + o_s[None, :] * sks, mask=m_pre[None, :] & m_d[:, None], other=0.0)
            b_k += tl.load(p_knew + o_j[None, :] * snt + o_d[:, None] * snd,
                           mask=m_tree[None, :] & m_d[:, None], other=0.0)
            b_v = tl.load(p_v + o_s[:, None] * svs, mask=m_pre[:, None] & m_d[None, :], other=0.0)
            b_v += tl.load(p_vnew + o_j[:, None] * swt + o_d[None, :] * swd,
                           mask=m_tree[:, None] & m_d[None, :], other=0.0)
        else:
            m_live = m_pre | m_tree
            b_k = tl.load(p_k + o_s[None, :] * sks, mask=m_live[None, :] & m_d[:, None], other=0.0)
            b_v = tl.load(p_v + o_s[:, None] * svs, mask=m_live[:, None] & m_d[None, :], other=0.0)
        if DOT_F32:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        words = tl.load(BITS + b * sbb + o_t[:, None] * sbt + (o_j // 32)[None, :],
                        mask=m_r[:, None] & m_tree[None, :], other=0)
        bit = (words >> (o_j % 32)[None, :]) & 1
        visible = m_pre[None, :] | (m_tree[None, :] & (bit != 0))
        s = tl.dot(b_q, b_k, input_precision=DOT_PREC) * qk_scale
        s = tl.where(visible, s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, b_v, DOT_PREC)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
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
    """Merge the per-split partial outputs of one query row by their log-sum-exp."""
    pid = tl.program_id(0)
    b = pid // (T * HQ)
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
    tl.store(O + b * sob + t * sot + hq * soh + o_d * sod, out.to(O.dtype.element_ty), mask=m_d)
    tl.store(LSE + b * slb + hq * slh + t * slt, lse)


def _num_splits(programs: int, capacity: int, device: torch.device) -> int:
    """Split the prefix over programs when (b, h, tile) programs alone cannot fill the GPU."""
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= target:
        return 1
    return max(1, min(triton.cdiv(target, programs), capacity // 512, 64))


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch tree attention; inputs as in `ht_kernels.tree_attention` (already validated).

    Returns out [B, T, Hq, D] in q's dtype and lse [B, Hq, T] fp32, written into `out` / `lse` when
    given (any strides). `num_splits` overrides the split-KV heuristic.
    """
    B, T, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    out = q.new_empty(B, T, Hq, D) if out is None else out
    lse = q.new_empty(B, Hq, T, dtype=torch.float32) if lse is None else lse
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    bits = pack_mask_bits(tree_mask)
    if bits.dim() == 2:
        bits = bits.unsqueeze(0).expand(B, -1, -1)  # stride 0 over rows: one shared mask
    bits_b = bits.stride(0)

    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N = 64 if BLOCK_D <= 128 else 32
    BLOCK_M = min(128 if BLOCK_D <= 128 else 64, max(16, triton.next_power_of_2(T * G)))
    m_tiles = triton.cdiv(T * G, BLOCK_M)
    splits = num_splits or _num_splits(B * Hkv * m_tiles, S, q.device)
    if splits > 1:
        o_buf = torch.empty(splits, B, T, Hq, D, dtype=torch.float32, device=q.device)
        l_buf = torch.empty(splits, B, Hq, T, dtype=torch.float32, device=q.device)
    else:
        o_buf, l_buf = out.unsqueeze(0), lse.unsqueeze(0)
    interpret = triton_interpreting()
    dot_f32 = interpret and q.dtype == torch.bfloat16  # bf16 tl.dot is wrong under the interpreter
    has_kv = k is not None
    kn, vn = (k, v) if has_kv else (k_cache, v_cache)  # placeholders, never read without HAS_KV
    _tree_attention_fwd_kernel[(B * Hkv, m_tiles, splits)](
        q, k_cache, v_cache, kn, vn, cache_seqlens, bits, o_buf, l_buf,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *kn.stride(), *vn.stride(),
        bits_b, bits.stride(1), *o_buf.stride(), *l_buf.stride(),
        T, Hkv, D, scale * LOG2E,
        G=G, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, NUM_SPLITS=splits,
        HAS_KV=has_kv, EVEN_D=BLOCK_D == D, DOT_F32=dot_f32,
        DOT_PREC="ieee" if q.dtype == torch.float32 or dot_f32 else "tf32",
        num_warps=4 if BLOCK_M <= 64 else 8, num_stages=2,
    )
    if splits > 1:
        _tree_attention_merge_kernel[(B * T * Hq,)](
            o_buf, l_buf, out, lse,
            *o_buf.stride(), *l_buf.stride(), *out.stride(), *lse.stride(),
            T, Hq, D,
            NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=BLOCK_D,
        )
    return out, lse
