"""Readable PyTorch reference of tree attention: the CPU fallback and the test oracle."""
from __future__ import annotations

import math

import torch


def tree_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of T tree queries over an unmasked cache prefix plus a masked block of tree tokens.

    q: [B, T, Hq, D]; k_cache, v_cache: [B, S, Hkv, D], or [num_blocks, block_size, Hkv, D] with
    block_table [B, max_blocks] (logical position p of row b at block block_table[b, p // block_size],
    offset p % block_size); cache_seqlens: [B] int; tree_mask: bool [T, T] or [B, T, T]; k, v:
    [B, T, Hkv, D] or None (written into the cache at cache_seqlens + j).
    Computes in fp32 (fp64 for fp64 inputs) and only over the live positions cache_seqlens + T of each
    row. Returns out [B, T, Hq, D] in q's dtype and lse [B, Hq, T] (natural log, fp32 or fp64); a
    query that sees nothing gets out 0 and lse -inf.
    """
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale

    def slots(b: int, pos: torch.Tensor):
        """The index into k_cache / v_cache of row b's logical positions pos [n]."""
        if block_table is None:
            return b, pos
        block_size = k_cache.shape[1]
        return block_table[b].long()[pos // block_size], pos % block_size

    lens = cache_seqlens.tolist()
    if k is not None:
        for b, n_prefix in enumerate(lens):
            at = slots(b, n_prefix + torch.arange(T, device=q.device))
            k_cache[at] = k[b]
            v_cache[at] = v[b]
    masks = tree_mask.expand(B, T, T)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(B, T, Hq, D, dtype=acc_dtype, device=q.device)
    lse = torch.full((B, Hq, T), -math.inf, dtype=acc_dtype, device=q.device)
    for b, n_prefix in enumerate(lens):
        n = n_prefix + T
        live = slots(b, torch.arange(n, device=q.device))
        qb = q[b].to(acc_dtype).transpose(0, 1)                                   # [Hq, T, D]
        kb = k_cache[live].to(acc_dtype).transpose(0, 1).repeat_interleave(Hq // Hkv, 0)
        vb = v_cache[live].to(acc_dtype).transpose(0, 1).repeat_interleave(Hq // Hkv, 0)
        visible = torch.cat([masks.new_ones(T, n_prefix), masks[b]], dim=1)        # [T, n]
        scores = (qb @ kb.transpose(1, 2)) * scale                                 # [Hq, T, n]
        scores = scores.masked_fill(~visible, -math.inf)
        lse_b = torch.logsumexp(scores, dim=-1)                                    # [Hq, T]
        base = torch.where(torch.isneginf(lse_b), 0.0, lse_b)                      # rows seeing nothing: 0
        probs = torch.exp(scores - base[..., None])
        out[b] = (probs @ vb).transpose(0, 1)
        lse[b] = lse_b
    return out.to(q.dtype), lse
