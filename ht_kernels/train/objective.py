"""The distillation objective of the draft heads, all anchors of a batch of sequences in one pass.

For a sequence x_0..x_{N-1}, anchor n and depth i (1..K): the draft of depth i made at anchor n predicts
the token at position n + i + 1, so its target is the frozen model's own distribution at the real
position n + i (soft labels). `frozen_pass` runs the frozen model once (no gradient) and keeps what the
drafters need; `pseudo_hidden` runs the pseudo chains of every anchor through layers t+1..L against the
real tokens' keys/values, with the pseudo-chain mask (pseudo i of anchor n sees the real tokens 0..n and
pseudo 1..i of its own chain; real tokens never see pseudo tokens, so they are not recomputed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model import apply_rope
from ..ops.hidden_transfer import hidden_transfer


@dataclass
class FrozenPass:
    """What one frozen forward over tokens [B, N] leaves for the drafters (no gradient anywhere).

    hidden: [B, N, dim] after `layer` layers; keys, values: per layer l >= layer, [B, N, Hkv, Dh] (RoPE
    applied); last: [B, N, dim] after all layers; teacher_p, teacher_idx: [B, N, k] the k most likely
    next tokens at each position (fp32 probabilities renormalised over them, int64 ids).
    """

    layer: int
    hidden: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last: torch.Tensor
    teacher_p: torch.Tensor
    teacher_idx: torch.Tensor


@torch.no_grad()
def frozen_pass(model, tokens: torch.Tensor, layer: int, top_k: int = 32) -> FrozenPass:
    """tokens: [B, N] int64 (rows right-padded; pads only influence positions after them)."""
    B, N = tokens.shape
    L = model.config.n_layers
    cache = model.new_cache(B, N)
    positions = torch.arange(N, device=tokens.device).expand(B, N)
    causal = torch.ones(N, N, dtype=torch.bool, device=tokens.device).tril()
    h_t = model.run_layers(model.embed(tokens), positions, cache, causal, range(layer))
    h_L = model.run_layers(h_t, positions, cache, causal, range(layer, L))
    logits, idx = model.logits(h_L).topk(top_k, dim=-1)
    return FrozenPass(layer, h_t, [cache.k[l] for l in range(layer, L)], [cache.v[l] for l in range(layer, L)],
                      h_L, logits.softmax(-1), idx)


def anchor_positions(lengths: torch.Tensor, starts: torch.Tensor, N: int) -> torch.Tensor:
    """The anchors to run per row: [B, A] = starts[b] + 0..A-1 with A the most trained anchors of a row
    (start..length-2), clamped to N - 1. Positions past a row's last anchor are padding (see anchor_mask),
    so no row runs the prompt positions before its start. lengths, starts: [B]."""
    A = max(1, int((lengths - 1 - starts).max()))
    return (starts[:, None] + torch.arange(A, device=starts.device)).clamp_max(N - 1)


def pseudo_attention(q, k, v, k_real, v_real, anchors: torch.Tensor, chain: bool = True) -> torch.Tensor:
    """Attention of the pseudo tokens of anchors [B, A] (positions in the row).

    q: [B, A, K, Hq, Dh]; k, v: [B, A, K, Hkv, Dh] (the pseudo tokens' own keys/values); k_real,
    v_real: [B, S, Hkv, Dh] (all real tokens). Pseudo i of anchor n sees real tokens 0..n and pseudo
    1..i of its chain (only itself when chain=False). Returns [B, A, K, Hq, Dh].
    """
    B, A, K, Hq, Dh = q.shape
    Hkv = k.shape[3]
    G = Hq // Hkv
    qg = q.view(B, A, K, Hkv, G, Dh).permute(0, 3, 4, 1, 2, 5)              # [B, Hkv, G, A, K, Dh]
    kc, vc = (x.permute(0, 3, 1, 2, 4) for x in (k, v))                     # [B, Hkv, A, K, Dh]
    kr, vr = (x.permute(0, 2, 1, 3) for x in (k_real, v_real))              # [B, Hkv, S, Dh]
    scale = 1.0 / math.sqrt(Dh)
    S = kr.shape[2]
    s_real = torch.einsum("bhgnid,bhmd->bhgnim", qg, kr) * scale            # [B, Hkv, G, A, K, S]
    s_chain = torch.einsum("bhgnid,bhnjd->bhgnij", qg, kc) * scale          # [B, Hkv, G, A, K, K]
    sees_real = torch.arange(S, device=q.device) <= anchors[..., None]      # [B, A, S]
    depth = torch.arange(K, device=q.device)
    sees_chain = depth[None, :] <= depth[:, None] if chain else depth[None, :] == depth[:, None]
    s_real = s_real.masked_fill(~sees_real[:, None, None, :, None, :], -math.inf)
    s_chain = s_chain.masked_fill(~sees_chain, -math.inf)
    p = torch.cat([s_real, s_chain], -1).float().softmax(-1).to(q.dtype)
    out = torch.einsum("bhgnim,bhmd->bhgnid", p[..., :S], vr) + torch.einsum("bhgnij,bhnjd->bhgnid", p[..., S:], vc)
    return out.permute(0, 3, 4, 1, 2, 5).reshape(B, A, K, Hq, Dh)


def pseudo_hidden(model, frozen: FrozenPass, weight: torch.Tensor, bias: torch.Tensor | None,
                  chain: bool = True, record: list | None = None, anchors: torch.Tensor | None = None) -> torch.Tensor:
    """The pseudo chains of anchors [B, A] (positions; None: every position) after all layers:
    [B, A, K, dim] (differentiable in weight and bias; each anchor's chain is independent of the others').

    weight: [K, dim, dim], bias: [K, dim] (cast to the model's dtype); pseudo i of anchor n sits at
    position n + i. record: a list that receives the states after layer t, t+1, ..., L.
    """
    m, c = model, model.config
    B, N, D = frozen.hidden.shape
    if anchors is None:
        anchors = torch.arange(N, device=frozen.hidden.device).expand(B, N)
    A, K = anchors.shape[1], weight.shape[0]
    hidden = frozen.hidden.gather(1, anchors[..., None].expand(B, A, D))
    x = hidden_transfer(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    positions = (anchors[..., None] + torch.arange(1, K + 1, device=x.device)).reshape(B, -1)
    cos, sin = (t.view(B, A, K, 1, c.head_dim) for t in m.rope(positions))
    if record is not None:
        record.append(x)
    for l, (k_real, v_real) in enumerate(zip(frozen.keys, frozen.values), start=frozen.layer):
        blk = m.layers[l]
        att = blk.attention
        a = blk.attention_norm(x)
        q = apply_rope(att.wq(a).view(B, A, K, c.n_heads, c.head_dim), cos, sin)
        k = apply_rope(att.wk(a).view(B, A, K, c.n_kv_heads, c.head_dim), cos, sin)
        v = att.wv(a).view(B, A, K, c.n_kv_heads, c.head_dim)
        o = pseudo_attention(q, k, v, k_real, v_real, anchors, chain)
        x = x + att.wo(o.reshape(B, A, K, -1))
        x = x + blk.feed_forward(blk.ffn_norm(x))
        if record is not None:
            record.append(x)
    return x


def anchor_mask(lengths: torch.Tensor, starts: torch.Tensor, anchors: torch.Tensor, K: int) -> torch.Tensor:
    """bool [B, A, K]: anchor anchors[b, j], depth i is trained iff it is >= starts[b] and the real
    position n + i whose distribution it learns lies inside the row (n + i < lengths[b]). lengths, starts: [B]."""
    n = anchors[..., None]
    i = torch.arange(1, K + 1, device=lengths.device)
    return (n >= starts[:, None, None]) & (n + i < lengths[:, None, None])


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_r row_weight[r] * CE(h[r] @ weight.T, teacher r), chunked over rows so that the [M, V] logits
    never exist at once; the gradient with respect to h is formed in the forward pass (weight is frozen)."""

    @staticmethod
    def forward(ctx, h, weight, p, idx, row_weight, chunk):
        M = h.shape[0]
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        p = p.to(acc)
        ce = torch.empty(M, dtype=acc, device=h.device)
        top5 = torch.empty(M, 5, dtype=torch.long, device=h.device)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for s in range(0, M, chunk):
            logits = h[s:s + chunk] @ weight.T                                    # [m, V] in h's dtype
            probs = torch.softmax(logits, -1, dtype=acc)
            top_val, top5[s:s + chunk] = logits.topk(5, dim=-1)
            best = top5[s:s + chunk, :1]  # logsumexp = logit - log softmax at any token; the top one is exact
            lse = top_val[:, 0].to(acc) - probs.gather(-1, best).squeeze(1).log()
            ce[s:s + chunk] = lse - (p[s:s + chunk] * logits.gather(-1, idx[s:s + chunk]).to(acc)).sum(-1)
            if grad is not None:  # d CE / d logits = softmax - p (p scattered onto the vocabulary)
                g = probs.scatter_add_(-1, idx[s:s + chunk], -p[s:s + chunk])
                grad[s:s + chunk] = (g * row_weight[s:s + chunk, None]).to(h.dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, top5)
        return (ce * row_weight.to(acc)).sum(), ce, top5

    @staticmethod
    def backward(ctx, grad_loss, _ce, _top5):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


def distill_loss(model, head_in: torch.Tensor, frozen: FrozenPass, anchors: torch.Tensor, mask: torch.Tensor,
                 depth_weights: torch.Tensor, normalizer: float, chunk: int = 512):
    """Soft-label cross-entropy of the drafts against the frozen model's top-k distribution.

    head_in: [B, A, K, dim] the LM-head inputs of the drafts of anchors [B, A] (the frozen LM head makes
    the logits); mask: [B, A, K] drafts to train; depth_weights: [K]. The draft of anchor n, depth i
    (i = 1..K) is scored against the frozen model's top-k distribution at position n + i:
    CE = logsumexp(draft) - sum_j p_j draft[idx_j]. Returns (sum over trained drafts of weight_i * CE /
    normalizer, stats [4, K]): stats holds, per depth, the CE sum, top-1 and top-5 hits of the teacher's
    argmax, and the number of trained drafts (detached, for reporting).
    """
    B, A, K, D = head_in.shape
    N = frozen.teacher_p.shape[1]
    pos = (anchors[..., None] + torch.arange(1, K + 1, device=mask.device)).clamp_max(N - 1)   # [B, A, K]
    rows = torch.arange(B, device=mask.device)[:, None, None]
    p, idx = frozen.teacher_p[rows, pos], frozen.teacher_idx[rows, pos]                       # [B, A, K, k]
    w = mask.float()
    loss, ce, top5 = _HeadCrossEntropy.apply(head_in.reshape(-1, D), model.output.weight, p.reshape(-1, p.shape[-1]),
                                             idx.reshape(-1, idx.shape[-1]),
                                             (w * depth_weights / normalizer).reshape(-1), chunk)
    best = idx[..., 0]
    top5 = top5.view(B, A, K, 5)
    hit1 = (top5[..., 0] == best).float()
    hit5 = (top5 == best[..., None]).any(-1).float()
    stats = torch.stack([(ce.view(B, A, K) * w).sum((0, 1)), (hit1 * w).sum((0, 1)), (hit5 * w).sum((0, 1)),
                         w.sum((0, 1))])
    return loss, stats
