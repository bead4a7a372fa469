"""Readable PyTorch reference of hidden transfer: the CPU fallback and the test oracle."""
from __future__ import annotations

import torch


def hidden_transfer_ref(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """K linear maps of each hidden state: pseudo[..., i, :] = hidden @ weight[i].T + bias[i].

    hidden: [..., D]; weight: [K, D, D] (weight[i] maps like nn.Linear); bias: [K, D] or None.
    Computes in fp32 (fp64 for fp64 inputs). Returns [..., K, D] in hidden's dtype.
    """
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # pseudo[..., k, e] = sum_d hidden[..., d] * weight[k, e, d]
    pseudo = torch.einsum("...d,ked->...ke", hidden.to(acc_dtype), weight.to(acc_dtype))
    if bias is not None:
        pseudo = pseudo + bias.to(acc_dtype)
    return pseudo.to(hidden.dtype)
