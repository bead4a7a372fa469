"""Trainable draft heads on a frozen model: hidden transfer, and Medusa heads as the baseline.

A drafter maps a `FrozenPass` over tokens [B, N] to the LM-head inputs of its K drafts per anchor,
[B, N, K, dim]; the frozen LM head turns them into draft logits. Both keep their maps as fp32 master
parameters weight [K, dim, dim] and bias [K, dim] and cast them to the model's dtype when they run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .forced import FrozenPass, pseudo_hidden
from .refine import RootRefiner


class TransferDrafter(nn.Module):
    """Hidden transfer: pseudo_i = weight[i] @ h_t + bias[i], then layers layer+1..L (DESIGN section 2).
    chain=False is the ablation where pseudo i sees only itself, not pseudo 1..i-1 of its chain.
    mlp_rank > 0 adds a residual low-rank SiLU block after the maps (`forced.transfer_mlp`; mlp_down
    [K, dim, r], mlp_up [K, r, dim], zero at the start so that it begins as the linear maps).
    extra_layer < layer adds maps of the hidden state after that many layers too: pseudo_i += extra_weight[i]
    @ h_extra (extra_weight [K, dim, dim], zero at the start)."""

    kind = "transfer"

    def __init__(self, K: int, dim: int, layer: int, chain: bool = True, mlp_rank: int = 0,
                 extra_layer: int | None = None):
        super().__init__()
        if extra_layer is not None and not 0 <= extra_layer < layer:
            raise ValueError(f"extra_layer must be in [0, layer={layer}), got {extra_layer}")
        self.layer, self.chain, self.extra_layer = layer, chain, extra_layer
        self.weight = nn.Parameter(torch.eye(dim).repeat(K, 1, 1))
        self.bias = nn.Parameter(torch.zeros(K, dim))
        self.extra_weight = None if extra_layer is None else nn.Parameter(torch.zeros(K, dim, dim))
        self.refiner = None  # a drafts.refine.RootRefiner that `draft_logprobs` applies, or None
        self.mlp_down = self.mlp_up = None
        if mlp_rank:
            self.mlp_down = nn.Parameter(torch.randn(K, dim, mlp_rank) / dim ** 0.5)
            self.mlp_up = nn.Parameter(torch.zeros(K, mlp_rank, dim))

    @property
    def mlp(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.mlp_down is None else (self.mlp_down, self.mlp_up)

    def forward(self, model, frozen: FrozenPass, anchors: torch.Tensor | None = None) -> torch.Tensor:
        """-> [B, A, K, dim] for anchors [B, A] (positions; None: all N)."""
        return model.norm(pseudo_hidden(model, frozen, self.weight, self.bias, self.chain, anchors=anchors,
                                        mlp=self.mlp, extra_weight=self.extra_weight))

    @torch.no_grad()
    def init_lstsq(self, xtx: torch.Tensor, xty: torch.Tensor, ridge: float = 1e-3) -> None:
        """Least-squares start: weight[i], bias[i] best map h_t(n) to h_t(n + i) over the anchors seen.
        xtx: [dim + 1, dim + 1] sum of [h, 1] outer products; xty: [K, dim + 1, dim] sums of [h, 1] h(n+i)^T."""
        D = xtx.shape[0] - 1
        reg = ridge * xtx.diagonal()[:D].mean() * torch.eye(D + 1, dtype=xtx.dtype)
        reg[D, D] = 0
        theta = torch.linalg.solve(xtx + reg, xty)                                # [K, D + 1, D]
        self.weight.copy_(theta[:, :D].transpose(1, 2))
        self.bias.copy_(theta[:, D])


class MedusaDrafter(nn.Module):
    """Medusa heads (Cai et al. 2024): head i is a residual SiLU block on the last layer's normalised
    hidden state, x + SiLU(weight[i] x + bias[i]), feeding the model's own LM head. Zero start: every
    head begins as a copy of the next-token prediction."""

    kind = "medusa"

    def __init__(self, K: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(K, dim, dim))
        self.bias = nn.Parameter(torch.zeros(K, dim))

    def forward(self, model, frozen: FrozenPass, anchors: torch.Tensor | None = None) -> torch.Tensor:
        """-> [B, A, K, dim] for anchors [B, A] (positions; None: all N)."""
        last = frozen.last if anchors is None else frozen.last.gather(1, anchors[..., None].expand(-1, -1, frozen.last.shape[-1]))
        return medusa_heads(model.norm(last), self.weight, self.bias)


def medusa_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x: [..., dim] normalised last hidden states -> [..., K, dim] LM-head inputs of the K heads."""
    w, b = weight.to(x.dtype), bias.to(x.dtype)
    return x[..., None, :] + F.silu(torch.einsum("...d,ked->...ke", x, w) + b)


def drafter_from_weights(weights, chain: bool = True):
    """TransferWeights or MedusaWeights -> the matching drafter module with those (fp32) parameters (and
    the weights' root refiner, as `refiner`)."""
    K, D = weights.weight.shape[:2]
    mlp, extra = getattr(weights, "mlp", None), getattr(weights, "extra", None)
    drafter = TransferDrafter(K, D, weights.layer, chain, 0 if mlp is None else mlp[0].shape[-1],
                              None if extra is None else extra[0]) if hasattr(weights, "layer") else MedusaDrafter(K, D)
    with torch.no_grad():
        drafter.weight.copy_(weights.weight.float())
        drafter.bias.copy_(weights.bias.float())
        if extra is not None:
            drafter.extra_weight.copy_(extra[1].float())
        if mlp is not None:
            drafter.mlp_down.copy_(mlp[0].float())
            drafter.mlp_up.copy_(mlp[1].float())
    if getattr(weights, "refine", None) is not None:
        drafter.refiner = RootRefiner.from_weights(*weights.refine)
    return drafter
