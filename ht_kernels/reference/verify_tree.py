"""Readable reference of greedy tree verification: the test oracle."""
from __future__ import annotations

import torch


def verify_tree_greedy_ref(
    draft_tokens: torch.Tensor, parents: torch.Tensor, target_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The longest greedily accepted root-to-node path of each row's token tree.

    draft_tokens: [B, T], the token of each node (node 0 is the root); parents: [T] or [B, T]
    (parents[0] = -1, parents[i] < i); target_tokens: [B, T], the target model's argmax after each
    node. From node u, its lowest-index child c with draft_tokens[b, c] == target_tokens[b, u] is
    accepted and the walk goes on from c; it stops at a node with no such child.
    Returns accepted [B, T] int64 (the path's nodes in order, padded with -1) and accept_len [B] int64.
    """
    B, T = draft_tokens.shape
    parents = parents.expand(B, T)
    accepted = torch.full((B, T), -1, dtype=torch.int64)
    accept_len = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        par, draft, target = parents[b].tolist(), draft_tokens[b].tolist(), target_tokens[b].tolist()
        path = [0]
        while True:
            u = path[-1]
            children = [c for c in range(1, T) if par[c] == u]             # increasing ids
            matches = [c for c in children if draft[c] == target[u]]
            if not matches:
                break
            path.append(matches[0])
        accepted[b, :len(path)] = torch.tensor(path)
        accept_len[b] = len(path)
    return accepted.to(draft_tokens.device), accept_len.to(draft_tokens.device)
