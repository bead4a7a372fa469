"""Tree attention in batched PyTorch ops: the "torch" backend (CPU, and any device without a kernel)."""
from __future__ import annotations

import math

import torch

FLASH_CPU = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
FLASH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tree_attention_torch(q, k_cache, v_cache, cache_seqlens, tree_mask, k=None, v=None, softmax_scale=None):
    """Same contract as `reference.tree_attention_ref`, without a loop over rows or heads.

    q: [B, T, Hq, D]; k_cache, v_cache: [B, S, Hkv, D]; cache_seqlens: [B] int; tree_mask: bool [T, T]
    or [B, T, T]; k, v: [B, T, Hkv, D] or None. Attends over the first max(cache_seqlens) + T cache
    positions of every row at once (each row masked to its own prefix and tree), accumulating in fp32
    (fp64 for fp64). On CPU, fp16/bf16/fp32 go through PyTorch's fused CPU flash-attention kernel with an
    additive mask (`FlashCPUPlan`); elsewhere (and for fp64) scores and softmax are materialized.
    Returns out [B, T, Hq, D] in q's dtype and lse [B, Hq, T] fp32 (fp64 for fp64).
    """
    B, T, Hq, D = q.shape
    if FlashCPUPlan.runs(q):
        plan = FlashCPUPlan(cache_seqlens, tree_mask, T, Hq // k_cache.shape[2], q.dtype)
        return plan(q, k_cache, v_cache, k, v, softmax_scale)
    lens = cache_seqlens.long()
    if k is not None:
        rows = torch.arange(B, device=q.device)[:, None]
        pos = lens[:, None] + torch.arange(T, device=q.device)
        k_cache[rows, pos] = k
        v_cache[rows, pos] = v
    return _materialized(q, k_cache, v_cache, lens, tree_mask, softmax_scale)


def _visible(lens: torch.Tensor, tree_mask: torch.Tensor, T: int, S: int):
    """-> visible bool [B, T, S] (each row's prefix and its tree_mask) and rel [B, S], the key's position
    relative to the row's tree (negative: prefix; >= T: beyond the row's own keys)."""
    B = lens.shape[0]
    rel = torch.arange(S, device=lens.device) - lens[:, None]                             # [B, S]
    in_tree = tree_mask.expand(B, T, T).gather(2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, S))
    return (rel < 0)[:, None, :] | (in_tree & (rel < T)[:, None, :]), rel


class FlashCPUPlan:
    """Tree attention through the fused CPU kernel for calls that share cache_seqlens [B] and tree_mask
    (every layer of one forward pass): the prefix bounds (one host read) and the additive mask are made
    once. GQA without copies: the G query heads of a KV head are stacked as G * T rows, and the mask is
    built per query head of a KV head ([B, 1, G, T, S] viewed as G * T rows). Calling it has
    `tree_attention_torch`'s contract for q [B, T, G * Hkv, D] of the planned dtype.
    """

    @staticmethod
    def runs(q: torch.Tensor) -> bool:
        """Whether tree attention of q goes through the fused CPU kernel."""
        return FLASH_CPU and q.shape[0] > 0 and q.device.type == "cpu" and q.dtype in FLASH_DTYPES

    def __init__(self, cache_seqlens: torch.Tensor, tree_mask: torch.Tensor, T: int, G: int, dtype: torch.dtype):
        lens = cache_seqlens.long()
        B = lens.shape[0]
        lo, hi = (int(x) for x in torch.aminmax(lens))
        S = hi + T
        self.lo, self.hi, self.T = lo, hi, T
        # The new keys/values go to one slice [lo, lo + T) of every row (rows None) or to rows [B, 1] at
        # slots [B, T]; dead [B, 1, S, 1]: the slots past a row's own prefix and tree (None: none).
        self.rows = self.slots = self.dead = None
        if lo == hi:  # one shared prefix length: the prefix is all visible, the tree columns are the mask
            self.bias = None
            if T > 1 or not bool(tree_mask.all()):
                bias = torch.zeros(B, 1, G, T, S, dtype=dtype)
                bias[..., lo:].masked_fill_(~tree_mask.reshape(-1, 1, 1, T, T), -math.inf)
                self.bias = bias.view(B, 1, G * T, S)
            self.blind = ~tree_mask.any(-1).expand(B, T) if lo == 0 else None
        else:  # keys past a row's own prefix + tree may hold anything (NaN too): zero them, mask them
            visible, rel = _visible(lens, tree_mask, T, S)
            self.bias = torch.zeros(B, 1, G, T, S, dtype=dtype).masked_fill_(~visible[:, None, None], -math.inf)
            self.bias = self.bias.view(B, 1, G * T, S)
            self.dead = (rel >= T)[:, None, :, None]
            self.rows, self.slots = torch.arange(B)[:, None], lens[:, None] + torch.arange(T)
            self.blind = ~visible.any(-1) if lo == 0 else None

    def __call__(self, q, k_cache, v_cache, k=None, v=None, softmax_scale=None):
        B, T, Hq, D = q.shape
        Hkv, lo, S = k_cache.shape[2], self.lo, self.hi + T
        G = Hq // Hkv
        if k is not None and self.rows is None:
            k_cache[:, lo:lo + T] = k
            v_cache[:, lo:lo + T] = v
        elif k is not None:
            k_cache[self.rows, self.slots] = k
            v_cache[self.rows, self.slots] = v
        kh, vh = k_cache[:, :S].transpose(1, 2), v_cache[:, :S].transpose(1, 2)         # [B, Hkv, S, D]
        if self.dead is not None:
            kh, vh = kh.masked_fill(self.dead, 0.0), vh.masked_fill(self.dead, 0.0)
        qh = q.view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, attn_mask=self.bias,
                                                                                scale=softmax_scale)
        out = out.view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D)
        lse = lse.reshape(B, Hq, T)
        if self.blind is not None:  # queries that see nothing: out 0, lse -inf
            out = out.masked_fill(self.blind[..., None, None], 0.0)
            lse = lse.masked_fill(self.blind[:, None, :], -math.inf)
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
