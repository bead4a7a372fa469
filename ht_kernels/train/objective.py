"""The distillation objective of the draft heads, all anchors of a batch of sequences in one pass.

The draft of depth i made at anchor n predicts the token at position n + i + 1, so its target is the
frozen model's own distribution at the real position n + i (soft labels), kept by `drafts.forced.frozen_pass`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..drafts.forced import FrozenPass


def anchor_mask(lengths: torch.Tensor, starts: torch.Tensor, anchors: torch.Tensor, K: int) -> torch.Tensor:
    """bool [B, A, K]: anchor anchors[b, j], depth i is trained iff it is >= starts[b] and the real
    position n + i whose distribution it learns lies inside the row (n + i < lengths[b]). lengths, starts: [B]."""
    n = anchors[..., None]
    i = torch.arange(1, K + 1, device=lengths.device)
    return (n >= starts[:, None, None]) & (n + i < lengths[:, None, None])


class _HeadCrossEntropy(torch.autograd.Function):
    """sum_r row_weight[r] * (CE(h[r] @ weight.T, teacher r) + recall_weight * recall[r]), chunked over rows
    so that the [M, V] logits never exist at once; the gradient with respect to h is formed in the
    forward pass (weight is frozen). recall[r] = softplus(z_k - z_best): z_best the logit of the
    teacher's argmax, z_k the k-th largest logit of the other tokens (recall_k = k; 0: no term), so it
    falls as the teacher's choice climbs into the draft's top k, which is what a tree keeps."""

    @staticmethod
    def forward(ctx, h, weight, p, idx, row_weight, chunk, recall_k=0, recall_weight=0.0):
        M = h.shape[0]
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        p = p.to(acc)
        ce = torch.empty(M, dtype=acc, device=h.device)
        rec = torch.zeros(M, dtype=acc, device=h.device)
        top5 = torch.empty(M, 5, dtype=torch.long, device=h.device)
        grad = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for s in range(0, M, chunk):
            logits = h[s:s + chunk] @ weight.T                                    # [m, V] in h's dtype
            probs = torch.softmax(logits, -1, dtype=acc)
            top_val, top5[s:s + chunk] = logits.topk(5, dim=-1)
            best = top5[s:s + chunk, :1]  # logsumexp = logit - log softmax at any token; the top one is exact
            lse = top_val[:, 0].to(acc) - probs.gather(-1, best).squeeze(1).log()
            ce[s:s + chunk] = lse - (p[s:s + chunk] * logits.gather(-1, idx[s:s + chunk]).to(acc)).sum(-1)
            if recall_k:
                target = idx[s:s + chunk, :1]                                     # the teacher's argmax
                vals, inds = logits.topk(recall_k + 1, dim=-1)
                col = recall_k - 1 + (inds[:, :recall_k] == target).any(-1, keepdim=True).long()
                kth = inds.gather(-1, col)                                        # the k-th other token
                margin = (vals.gather(-1, col) - logits.gather(-1, target)).to(acc).squeeze(1)
                rec[s:s + chunk] = F.softplus(margin)
            if grad is not None:  # d CE / d logits = softmax - p (p scattered onto the vocabulary)
                g = probs.scatter_add_(-1, idx[s:s + chunk], -p[s:s + chunk])
                if recall_k:  # d recall / d z_k = sigmoid(margin) = - d recall / d z_best
                    sig = (recall_weight * torch.sigmoid(margin))[:, None]
                    g.scatter_add_(-1, kth, sig).scatter_add_(-1, target, -sig)
                grad[s:s + chunk] = (g * row_weight[s:s + chunk, None]).to(h.dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce, top5)
        return ((ce + recall_weight * rec) * row_weight.to(acc)).sum(), ce, top5

    @staticmethod
    def backward(ctx, grad_loss, _ce, _top5):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None, None, None


def distill_loss(model, head_in: torch.Tensor, frozen: FrozenPass, anchors: torch.Tensor, mask: torch.Tensor,
                 depth_weights: torch.Tensor, normalizer: float, chunk: int = 512,
                 recall: tuple[int, float] = (0, 0.0)):
    """Soft-label cross-entropy of the drafts against the frozen model's top-k distribution.

    head_in: [B, A, K, dim] the LM-head inputs of the drafts of anchors [B, A] (the frozen LM head makes
    the logits); mask: [B, A, K] drafts to train; depth_weights: [K]. The draft of anchor n, depth i
    (i = 1..K) is scored against the frozen model's top-k distribution at position n + i:
    CE = logsumexp(draft) - sum_j p_j draft[idx_j], plus recall[1] times the top-recall[0] recall term
    of `_HeadCrossEntropy` (recall[0] = 0: none). Returns (sum over trained drafts of weight_i * CE /
    normalizer, stats [4, K]): stats holds, per depth, the CE sum, top-1 and top-5 hits of the teacher's
    argmax, and the number of trained drafts (detached, for reporting).
    """
    B, A, K, D = head_in.shape
    pos = anchors[..., None] + torch.arange(1, K + 1, device=mask.device)                      # [B, A, K]
    p, idx = frozen.teacher(torch.arange(B, device=mask.device)[:, None, None], pos)           # [B, A, K, k]
    w = mask.float()
    loss, ce, top5 = _HeadCrossEntropy.apply(head_in.reshape(-1, D), model.output.weight, p.reshape(-1, p.shape[-1]),
                                             idx.reshape(-1, idx.shape[-1]),
                                             (w * depth_weights / normalizer).reshape(-1), chunk, *recall)
    best = idx[..., 0]
    top5 = top5.view(B, A, K, 5)
    hit1 = (top5[..., 0] == best).float()
    hit5 = (top5 == best[..., None]).any(-1).float()
    stats = torch.stack([(ce.view(B, A, K) * w).sum((0, 1)), (hit1 * w).sum((0, 1)), (hit5 * w).sum((0, 1)),
                         w.sum((0, 1))])
    return loss, stats
