"""Measurements of trained draft heads on greedy continuations: per-depth accuracy and how close the pseudo
states come to the real ones (the accepted length per step is replayed by `decode.replay`)."""
from __future__ import annotations

import torch

from ..drafts.drafters import TransferDrafter
from ..drafts.examples import Example
from ..drafts.forced import drafter_pass, pseudo_hidden


def depth_accuracy(logp: torch.Tensor, greedy: torch.Tensor, top: int = 5) -> torch.Tensor:
    """logp: [n, K, V] drafts of anchors 0..n-1 of a sequence; greedy: [n] the token after each anchor.
    Returns (hits [2, K]: top-1 and top-`top` hits of depth i against token n + i + 1, counts [K])."""
    n, K, _ = logp.shape
    idx = logp.topk(top, dim=-1).indices                                      # [n, K, top]
    hits, counts = torch.zeros(2, K), torch.zeros(K)
    for i in range(1, K + 1):
        if n - i <= 0:
            continue
        target = greedy[i:]                                                   # token n + i + 1 = greedy[n + i]
        cand = idx[: n - i, i - 1]
        hits[0, i - 1] += (cand[:, 0] == target).sum()
        hits[1, i - 1] += (cand == target[:, None]).any(-1).sum()
        counts[i - 1] += n - i
    return hits, counts


@torch.no_grad()
def pseudo_similarity(model, drafter: TransferDrafter, examples: list[Example]) -> torch.Tensor:
    """Mean cosine similarity [L - t + 1, K] of pseudo state i of anchor n to the real hidden state of
    position n + i, after layer t (the transfer itself), t + 1, ..., L; anchors start..len-1-i."""
    L, t = model.config.n_layers, drafter.layer
    total, count = torch.zeros(L - t + 1, drafter.weight.shape[0]), torch.zeros(drafter.weight.shape[0])
    for e in examples:
        tokens = torch.tensor([e.tokens], device=model.device)
        N = tokens.shape[1]
        frozen = drafter_pass(model, drafter, tokens, 1, N)
        cache, real = model.new_cache(1, N), []
        h = model.embed(tokens)
        positions = torch.arange(N, device=model.device)[None]
        causal = torch.ones(N, N, dtype=torch.bool, device=model.device).tril()
        for l in range(L):
            h = model.run_layers(h, positions, cache, causal, range(l, l + 1))
            if l + 1 >= t:
                real.append(h[0].float())
        record = []
        pseudo_hidden(model, frozen, drafter.weight, drafter.bias, drafter.chain, record,
                      torch.arange(e.start, N, device=model.device)[None], drafter.mlp, drafter.extra_weight)
        for i in range(1, drafter.weight.shape[0] + 1):
            anchors = slice(0, N - i - e.start)
            for j, (p, r) in enumerate(zip(record, real)):
                sim = torch.nn.functional.cosine_similarity(p[0, anchors, i - 1].float(), r[e.start + i:N], dim=-1)
                total[j, i - 1] += sim.sum()
            count[i - 1] += max(0, N - i - e.start)
    return total / count.clamp_min(1)
