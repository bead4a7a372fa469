"""Training the root refiner (`drafts.refine`) of trained draft heads, which stay frozen.

`refiner_features` runs the frozen model and the drafter once over the examples and keeps, per anchor,
what the refiner sees and learns: the drafts' LM-head inputs, the next root (the token after the
anchor), each depth's top candidates and the teacher's probability of each candidate (the frozen
model's top-k distribution at the drafted position). `fit_refiner` then trains on these features
alone, so epochs cost a small fraction of a pass through the model. The loss is the cross-entropy of
the refined distribution over the candidates against the teacher's, renormalised over them (drafts
whose candidates hold none of the teacher's top-k mass are left out).
"""
from __future__ import annotations

import math

import torch

from ..drafts.examples import Example, collate
from ..drafts.forced import anchor_positions, drafter_pass
from ..drafts.refine import RootRefiner
from .objective import anchor_mask


@torch.no_grad()
def refiner_features(model, drafter, examples: list[Example], top: int = 32, teacher_top_k: int = 32,
                     batch_size: int = 4, chunk: int = 1024) -> dict[str, torch.Tensor]:
    """-> states [n, K, D] (model dtype), root [n], cand [n, K, top], target [n, K, top] (fp32, rows sum
    to 1 or 0), teacher_best [n, K] (the teacher's argmax) for the n trained anchors of the examples."""
    W = model.output.weight
    out = {k: [] for k in ("states", "root", "cand", "target", "teacher_best")}
    for s in range(0, len(examples), batch_size):
        tokens, lengths, starts = collate(examples[s:s + batch_size], model.device)
        frozen = drafter_pass(model, drafter, tokens, teacher_top_k)
        anchors = anchor_positions(lengths, starts, tokens.shape[1])                     # [B, A]
        B, A = anchors.shape
        K = drafter.weight.shape[0]
        keep = anchor_mask(lengths, starts, anchors, 1)[..., 0]                         # [B, A]: root inside
        states = drafter(model, frozen, anchors)[keep]                                  # [n, K, D]
        N = tokens.shape[1]
        rows = torch.arange(B, device=tokens.device)[:, None]
        root = tokens[rows, (anchors + 1).clamp_max(N - 1)][keep]                        # [n]
        pos = (anchors[..., None] + torch.arange(1, K + 1, device=tokens.device)).clamp_max(N - 1)
        inside = (anchors[..., None] + torch.arange(1, K + 1, device=tokens.device) < lengths[:, None, None])[keep]
        p, idx = frozen.teacher_p[rows[..., None], pos][keep], frozen.teacher_idx[rows[..., None], pos][keep]
        flat = states.reshape(-1, states.shape[-1])
        cand = torch.cat([(flat[c:c + chunk] @ W.T).topk(top, dim=-1).indices for c in range(0, len(flat), chunk)])
        cand = cand.view(*states.shape[:2], top)                                        # [n, K, top]
        target = ((cand[..., :, None] == idx[..., None, :]) * p[..., None, :]).sum(-1) * inside[..., None]
        out["states"].append(states)
        out["root"].append(root)
        out["cand"].append(cand)
        out["target"].append(target / target.sum(-1, keepdim=True).clamp_min(1e-12))
        out["teacher_best"].append(torch.where(inside, idx[..., 0], -1))
    return {k: torch.cat(v) for k, v in out.items()}


def refiner_stats(refiner: RootRefiner | None, model, f: dict[str, torch.Tensor], chunk: int = 4096) -> dict:
    """Per depth: top-1 of the teacher's argmax among the drafts before (refiner None) or after
    refinement, and the share of drafts whose candidates hold it (the most refinement can reach)."""
    K = f["cand"].shape[1]
    hit, reach, n = torch.zeros(K), torch.zeros(K), torch.zeros(K)
    with torch.no_grad():
        for c in range(0, len(f["root"]), chunk):
            cand, best = f["cand"][c:c + chunk], f["teacher_best"][c:c + chunk]
            if refiner is None:
                pick = cand[..., 0]
            else:
                z = refiner.logits(f["states"][c:c + chunk], model.tok_embeddings.weight[f["root"][c:c + chunk]],
                                   model.output.weight, cand)
                pick = cand.gather(-1, z.argmax(-1, keepdim=True))[..., 0]
            valid = best >= 0
            hit += ((pick == best) & valid).sum(0)
            reach += ((cand == best[..., None]).any(-1) & valid).sum(0)
            n += valid.sum(0)
    n = n.clamp_min(1)
    return {"top1": (hit / n).tolist(), "reach": (reach / n).tolist(), "drafts": n.long().tolist()}


def fit_refiner(model, f: dict[str, torch.Tensor], rank: int = 128, steps: int = 2000, batch_size: int = 512,
                lr: float = 2e-3, seed: int = 0, progress=None) -> RootRefiner:
    """A RootRefiner trained on features f (`refiner_features`) with AdamW and cosine decay."""
    K, top = f["cand"].shape[1:]
    D = f["states"].shape[-1]
    torch.manual_seed(seed)
    refiner = RootRefiner(K, D, rank, top)
    opt = torch.optim.AdamW(refiner.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n = len(f["root"])
    embed, head = model.tok_embeddings.weight, model.output.weight
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, steps))))
        i = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        z = refiner.logits(f["states"][i].float(), embed[f["root"][i]].float(), head, f["cand"][i])
        target = f["target"][i]
        loss = -(target * z.log_softmax(-1)).sum() / target.sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step, loss.item())
    return refiner
