"""Readable PyTorch reference of KV-cache compaction after tree verification: the test oracle."""
from __future__ import annotations

import torch


def compact_kv_ref(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accepted: torch.Tensor,
    accept_len: torch.Tensor,
    block_table: torch.Tensor | None = None,
) -> None:
    """Move the accepted nodes' keys/values to the slots right after each row's prefix, in place.

    k_cache, v_cache: [L, B, S, H, D] or [B, S, H, D], or paged [L, num_blocks, block_size, H, D] or
    [num_blocks, block_size, H, D] with block_table [B, max_blocks] (slot p of row b at block
    block_table[b, p // block_size], offset p % block_size); cache_seqlens: [B]; accepted: [B, A] node
    indices (entries at index >= accept_len[b] are ignored); accept_len: [B].
    For every layer and row b with n = cache_seqlens[b] and i < accept_len[b]:
        cache[..., b, n + i] = old cache[..., b, n + accepted[b, i]]
    (all sources are read before any slot is written, so any index list works, not only paths).
    """

    def slots(b: int, pos: list[int]):
        """The index into the layers [L, ...] of row b's slots pos."""
        if block_table is None:
            return slice(None), b, pos
        block_size = k_cache.shape[-3]
        return slice(None), [int(block_table[b, p // block_size]) for p in pos], [p % block_size for p in pos]

    for cache in (k_cache, v_cache):
        layers = cache if cache.dim() == 5 else cache.unsqueeze(0)        # [L, B, S, H, D] or paged
        for b in range(cache_seqlens.shape[0]):
            n = int(cache_seqlens[b])
            count = int(accept_len[b])
            sources = [n + int(node) for node in accepted[b, :count]]
            moved = layers[slots(b, sources)].clone()                      # [L, count, H, D]
            layers[slots(b, list(range(n, n + count)))] = moved
