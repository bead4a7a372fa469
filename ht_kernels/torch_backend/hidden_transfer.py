"""Hidden transfer as one GEMM in the input dtype: the "torch" backend's fast path (CPU, any device)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def hidden_transfer_torch(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `reference.hidden_transfer_ref` for fp16/bf16/fp32: hidden [..., D], weight
    [K, D, D], bias [K, D] or None -> [..., K, D]. The K maps are one [K * D, D] linear layer, so the
    weight is read once and accumulated in fp32 by the GEMM, rounded once to hidden's dtype."""
    K, D = weight.shape[:2]
    flat_bias = None if bias is None else bias.reshape(K * D)
    return F.linear(hidden, weight.reshape(K * D, D), flat_bias).unflatten(-1, (K, D))
