"""Tree attention in batched PyTorch ops: the "torch" backend (CPU, and any device without a kernel)."""
from __future__ import annotations

import math

import torch

FLASH_CPU = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def tree_attention_torch(q, k_cache, v_cache, cache_seqlens, tree_mask, k=None, v=None, softmax_scale=None):
    """Same contract as `reference.tree_attention_ref`, without a loop over rows or heads.

    q: [B, T, Hq, D]; k_cache, v_cache: [B, S, Hkv, D]; cache_seqlens: [B] int; tree_mask: bool [T, T]
    or [B, T, T]; k, v: [B, T, Hkv, D] or None. Attends over the first max(cache_seqlens) + T cache
    positions of every row at once (each row masked to its own prefix and tree), accumulating in fp32
    (fp64 for fp64). On CPU, fp16/bf16/fp32 go through PyTorch's fused CPU flash-attention kernel with an
    additive mask; elsewhere (and for fp64) scores and softmax are materialized.
    Returns out [B, T, Hq, D] in q's dtype and lse [B, Hq, T] fp32 (fp64 for fp64).
    """
    B, T, Hq, D = q.shape
    lens = cache_seqlens.long()
    flash = B and q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and FLASH_CPU
    lo, hi = (int(x) for x in torch.aminmax(lens)) if flash else (None, None)
    if k is not None and lo is not None and lo == hi:  # one prefix length: the new keys are one slice
        k_cache[:, lo:lo + T] = k
        v_cache[:, lo:lo + T] = v
    elif k is not None:
        rows = torch.arange(B, device=q.device)[:, None]
        pos = lens[:, None] + torch.arange(T, device=q.device)
        k_cache[rows, pos] = k
        v_cache[rows, pos] = v
    if flash:
        return _flash_cpu(q, k_cache, v_cache, lens, lo, hi, tree_mask, softmax_scale)
    return _materialized(q, k_cache, v_cache, lens, tree_mask, softmax_scale)


def _visible(lens: torch.Tensor, tree_mask: torch.Tensor, T: int, S: int):
    """-> visible bool [B, T, S] (each row's prefix and its tree_mask) and rel [B, S], the key's position
    relative to the row's tree (negative: prefix; >= T: beyond the row's own keys)."""
    B = lens.shape[0]
    rel = torch.arange(S, device=lens.device) - lens[:, None]                             # [B, S]
    in_tree = tree_mask.expand(B, T, T).gather(2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, S))
    return (rel < 0)[:, None, :] | (in_tree & (rel < T)[:, None, :]), rel


def _flash_cpu(q, k_cache, v_cache, lens, lo: int, hi: int, tree_mask, softmax_scale):
    """The fused kernel, GQA without copies: the G query heads of a KV head are stacked as G * T rows.
    lo, hi: the smallest and largest of lens."""
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    S = hi + T
    kh, vh = k_cache[:, :S].transpose(1, 2), v_cache[:, :S].transpose(1, 2)             # [B, Hkv, S, D]
    # The additive mask is built per query head of a KV head ([B, 1, G, T, S] viewed as G * T rows).
    if lo == hi:  # one shared prefix length: the prefix is all visible, the tree columns are the mask
        bias = None
        if T > 1 or not bool(tree_mask.all()):
            bias = q.new_zeros(B, 1, G, T, S)
            bias[..., lo:].masked_fill_(~tree_mask.reshape(-1, 1, 1, T, T), -math.inf)
            bias = bias.view(B, 1, G * T, S)
        blind = ~tree_mask.any(-1).expand(B, T) if lo == 0 else None
    else:  # keys past a row's own prefix + tree may hold anything (NaN too): zero them, mask them
        visible, rel = _visible(lens, tree_mask, T, S)
        bias = q.new_zeros(B, 1, G, T, S).masked_fill_(~visible[:, None, None], -math.inf).view(B, 1, G * T, S)
        live = (rel < T)[:, None, :, None]
        kh, vh = kh.masked_fill(~live, 0.0), vh.masked_fill(~live, 0.0)
        blind = ~visible.any(-1) if lo == 0 else None
    qh = q.view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, attn_mask=bias,
                                                                            scale=softmax_scale)
    out = out.view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D)
    lse = lse.reshape(B, Hq, T)
    if blind is not None:  # queries that see nothing: out 0, lse -inf
        out = out.masked_fill(blind[..., None, None], 0.0)
        lse = lse.masked_fill(blind[:, None, :], -math.inf)
    return out, lse


def _materialized(q, k_cache, v_cache, lens, tree_mask, softmax_scale):
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    S = int(lens.max()) + T if B else T
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    visible, rel = _visible(lens, tree_mask, T, S)
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
