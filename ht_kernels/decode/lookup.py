"""Context lookup: drafts copied from the text itself, mixed into the hidden-transfer drafts.

Summaries, answers about a document, translations the model copies back: much of what a model writes
repeats its context. Once a step's root is known, the latest earlier place where the context's last n
tokens (the root included) occurred gives the K tokens that followed there as a guess for depths 1..K
(the longest n <= `ngram` that occurs wins; prompt lookup decoding, Saxena 2023). The guess enters the
tree as a mixture, per depth d with a guess g_d:

    p'_d = (1 - w) p_d + w [token = g_d]

so the tree policy places it wherever it scores among the drafts. The guess can also reach past the
drafts' K depths (`extend_tree`): a few more nodes per step carry it on below the deepest tree node on
its path, where copying goes on longer than the maps draft. Verification is untouched: decoding stays
lossless. Everything here is batched tensor work without host synchronisation.
"""
from __future__ import annotations

import math

import torch

from .trees import StepTree

# The decoder's defaults (benchmarks/RESULTS.md, "Context lookup"): on the dev prompts tau is flat in the
# weight from 0.1 to 0.4, 0.25 at its top; 2 more nodes raise tau by 0.09-0.13 at an equal node count and
# paid on the 2-core CPU (4 raise it further, at a larger step).
WEIGHT, NODES = 0.25, 2


def lookup_drafts(tokens: torch.Tensor, ends: torch.Tensor, K: int, ngram: int = 3) -> torch.Tensor:
    """The tokens that followed the latest earlier occurrence of each row's last n tokens.

    tokens: [R, N] int64 histories; ends: [R] int64, the index of each row's last token (its root);
    positions past it are ignored. Returns [R, K] int64: for the longest n <= ngram whose n tokens ending
    at ends[r] also end at some i < ends[r] (the latest such i), tokens[r, i + 1 .. i + K], cut at
    ends[r] (-1 beyond it, and everywhere where no n >= 1 matches)."""
    R, N = tokens.shape
    dev = tokens.device
    pos = torch.arange(N, device=dev)
    ends = ends.long()
    found = torch.full((R,), -1, dtype=torch.long, device=dev)
    match = pos < ends[:, None]                                                      # [R, N] i < end
    for n in range(1, ngram + 1):
        k = n - 1  # the token n - 1 places before the end must match too
        back = tokens[:, (pos - k).clamp_min(0)]
        last = tokens.gather(1, (ends - k).clamp_min(0)[:, None])
        match = match & (pos >= k) & (back == last) & (ends[:, None] >= k)
        latest = torch.where(match, pos, -1).amax(1)
        found = torch.where(latest >= 0, latest, found)
    at = found[:, None] + 1 + torch.arange(K, device=dev)                           # [R, K]
    ok = (found[:, None] >= 0) & (at <= ends[:, None])
    return torch.where(ok, tokens.gather(1, at.clamp(0, N - 1)), -1)


def with_lookup(logp: torch.Tensor, guess: torch.Tensor, weight: float) -> torch.Tensor:
    """logp: [R, K, V] draft log-probabilities; guess: [R, K] int64 (-1: none) -> [R, K, V] fp32 mixed:
    log((1 - weight) p + weight [token = guess]) where a depth has a guess, logp where it has none."""
    if not 0.0 < weight < 1.0:
        raise ValueError(f"lookup weight must be in (0, 1), got {weight}")
    has = (guess >= 0)[..., None]
    out = logp.to(torch.float32, copy=True)  # one copy, then in place: the caller's drafts stay as they were
    out.add_(torch.where(has, math.log1p(-weight), 0.0))
    idx = guess.clamp_min(0)[..., None]
    cur = out.gather(-1, idx)
    hit = torch.logaddexp(cur, torch.full_like(cur, math.log(weight)))
    return out.scatter_(-1, idx, torch.where(has, hit, cur))


def extend_tree(tree: StepTree, guess: torch.Tensor, nodes: int, weight: float) -> StepTree:
    """The tree with `nodes` more nodes per row that carry the context lookup's guess on.

    tree: [B, T] nodes; guess: [B, G] int64, the lookup's guesses of depths 1..G (-1: none). The guess's
    path is the root and the nodes whose tokens are its guesses, each the child of the one before; the
    new nodes T .. T + nodes - 1 form a chain below its deepest node (depth d) and carry guess[d],
    guess[d + 1], ... (token 0 where there is none: verification accepts a node only if its token is the
    model's choice, so such a node costs a row and nothing else). Their scores: the parent's plus
    log(weight) per node."""
    B, T = tree.tokens.shape
    G, dev = guess.shape[1], tree.tokens.device
    at = guess.gather(1, (tree.depths - 1).clamp(0, G - 1))                              # [B, T]
    match = (tree.tokens == at) & (at >= 0) & (tree.depths >= 1) & (tree.depths <= G)
    on = tree.depths == 0
    for _ in range(G):  # the path is at most G deep: each pass walks it one level further
        on = on | (match & on.gather(1, tree.parents.clamp_min(0)))
    deepest = torch.where(on, tree.depths, -1).argmax(1, keepdim=True)                  # [B, 1]
    depth = tree.depths.gather(1, deepest)
    step = torch.arange(nodes, device=dev)
    cols = depth + step                                                                  # guess of depth d + 1 + i
    tokens = torch.where(cols < G, guess.gather(1, cols.clamp_max(G - 1)), 0).clamp_min(0)
    parents = torch.cat([deepest, (T + step[:-1]).expand(B, nodes - 1)], 1)
    scores = tree.scores.gather(1, deepest) + math.log(weight) * (1 + step)
    return StepTree(torch.cat([tree.tokens, tokens], 1), torch.cat([tree.parents, parents], 1),
                    torch.cat([tree.depths, depth + 1 + step], 1), torch.cat([tree.scores, scores], 1))
