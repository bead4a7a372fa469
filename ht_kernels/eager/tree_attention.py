"""Tree attention in batched PyTorch ops: the "torch" backend (CPU, and any device without a kernel)."""
from __future__ import annotations

import math

import torch


def tree_attention_torch(q, k_cache, v_cache, cache_seqlens, tree_mask, k=None, v=None, softmax_scale=None):
    """Same contract as `reference.tree_attention_ref`, without a loop over rows or heads.

    q: [B, T, Hq, D]; k_cache, v_cache: [B, S, Hkv, D]; cache_seqlens: [B] int; tree_mask: bool [T, T]
    or [B, T, T]; k, v: [B, T, Hkv, D] or None. Attends over the first max(cache_seqlens) + T cache
    positions of every row at once (each row masked to its own prefix and tree), in fp32 (fp64 for fp64).
    Returns out [B, T, Hq, D] in q's dtype and lse [B, Hq, T] fp32 (fp64 for fp64).
    """
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    lens = cache_seqlens.long()
    if k is not None:
        rows = torch.arange(B, device=q.device)[:, None]
        pos = lens[:, None] + torch.arange(T, device=q.device)
        k_cache[rows, pos] = k
        v_cache[rows, pos] = v
    S = int(lens.max()) + T if B else T
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    rel = torch.arange(S, device=q.device) - lens[:, None]                               # [B, S]
    in_tree = tree_mask.expand(B, T, T).gather(2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, S))
    visible = (rel < 0)[:, None, :] | (in_tree & (rel < T)[:, None, :])                  # [B, T, S]
    qh = q.to(acc).view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
    kh = k_cache[:, :S].to(acc).transpose(1, 2)                                        # [B, Hkv, S, D]
    live = (rel < T)[:, None, :, None]  # slots past a row's own prefix + tree may hold anything (NaN too)
    vh = v_cache[:, :S].to(acc).transpose(1, 2).masked_fill(~live, 0.0)
    scores = (qh @ kh.transpose(-1, -2)).view(B, Hkv, G, T, S) * scale
    scores = scores.masked_fill(~visible[:, None, None], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)                                              # [B, Hkv, G, T]
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])  # rows seeing nothing: 0
    out = (probs.view(B, Hkv, G * T, S) @ vh).view(B, Hkv, G, T, D)
    return out.permute(0, 3, 1, 2, 4).to(q.dtype).contiguous().view(B, T, Hq, D), lse.reshape(B, Hq, T)
