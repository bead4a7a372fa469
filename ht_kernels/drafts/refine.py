"""Root refinement: a step's drafts re-ranked once the next root is known.

Hidden transfer drafts the tokens after the next root before the root exists: the depth-1 draft of a
step predicts two positions past the last accepted token, not knowing the one between, which only the
step's own logits decide. Once verification has chosen the root r, a small head re-ranks the `top`
best candidates of each depth d:

    s'_d = s_d + up_d SiLU(down_d [s_d; e_r])        s_d: the draft's LM-head input [D], e_r: r's embedding
    z_c  = s'_d . W_c                                 W_c: the LM head's row of candidate c

and the candidates' log-probabilities become log_softmax(z)_c plus their original total mass (the other
tokens keep theirs). Only top x D dot products per depth and a rank-r block: no second LM-head call.
With up = 0 (the start) the drafts are unchanged. Verification is untouched, so decoding stays lossless.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RootRefiner(nn.Module):
    """down: [K, 2 D, rank], up: [K, rank, D] fp32 master parameters; top: candidates re-ranked per depth."""

    def __init__(self, K: int, dim: int, rank: int = 128, top: int = 32):
        super().__init__()
        self.top = top
        self.down = nn.Parameter(torch.randn(K, 2 * dim, rank) / (2 * dim) ** 0.5)
        self.up = nn.Parameter(torch.zeros(K, rank, dim))

    @classmethod
    def from_weights(cls, down: torch.Tensor, up: torch.Tensor, top: int) -> RootRefiner:
        """A refiner with these (fp32 copies of) parameters: down [K, 2 D, rank], up [K, rank, D]."""
        K, two_d, rank = down.shape
        refiner = cls(K, two_d // 2, rank, top)
        with torch.no_grad():
            refiner.down.copy_(down.float())
            refiner.up.copy_(up.float())
        return refiner.requires_grad_(False)

    @property
    def K(self) -> int:
        return self.down.shape[0]

    def states(self, states: torch.Tensor, root_emb: torch.Tensor) -> torch.Tensor:
        """states: [..., K, D] LM-head inputs of the drafts; root_emb: [..., D] -> refined [..., K, D]."""
        x = torch.cat([states, root_emb[..., None, :].expand_as(states)], -1)
        down, up = self.down.to(states.dtype), self.up.to(states.dtype)
        u = F.silu(torch.einsum("...ki,kir->...kr", x, down))
        return states + torch.einsum("...kr,krd->...kd", u, up)

    def forward(self, logp: torch.Tensor, states: torch.Tensor, root: torch.Tensor, embed: torch.Tensor,
                head: torch.Tensor) -> torch.Tensor:
        """Refined draft log-probabilities [..., K, V].

        logp: [..., K, V] drafts (fp32); states: [..., K, D] their LM-head inputs; root: [...] the next
        root's ids; embed: [V, D] the token embeddings; head: [V, D] the LM head's weight."""
        cand_lp, cand = logp.topk(min(self.top, logp.shape[-1]), dim=-1)           # [..., K, M]
        z = self.logits(states, embed[root], head, cand)
        mass = cand_lp.logsumexp(-1, keepdim=True)
        return logp.scatter(-1, cand, z.float().log_softmax(-1) + mass)

    def logits(self, states, root_emb, head, cand) -> torch.Tensor:
        """The refined logits [..., K, M] of candidates cand [..., K, M]."""
        s = self.states(states, root_emb)
        return torch.einsum("...kd,...kmd->...km", s, head[cand].to(s.dtype))
