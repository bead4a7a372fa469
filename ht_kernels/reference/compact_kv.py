"""Readable PyTorch reference of KV-cache compaction after tree verification: the test oracle."""
from __future__ import annotations

import torch


def compact_kv_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accepted: torch.Tensor,
    accept_len: torch.Tensor,
) -> None:
    """Move the accepted nodes' keys/values to the slots right after each row's prefix, in place.

    k_cache, v_cache: [L, B, S, H, D] or [B, S, H, D]; cache_seqlens: [B]; accepted: [B, A] node
    indices (entries at index >= accept_len[b] are ignored); accept_len: [B].
    For every layer and row b with n = cache_seqlens[b] and i < accept_len[b]:
        cache[..., b, n + i] = old cache[..., b, n + accepted[b, i]]
    (all sources are read before any slot is written, so any index list works, not only paths).
    """
    for cache in (k_cache, v_cache):
        rows = cache if cache.dim() == 5 else cache.unsqueeze(0)          # [L, B, S, H, D]
        for b in range(rows.shape[1]):
            n = int(cache_seqlens[b])
            count = int(accept_len[b])
            sources = [n + int(node) for node in accepted[b, :count]]
            moved = rows[:, b, sources].clone()                           # [L, count, H, D]
            rows[:, b, n:n + count] = moved
