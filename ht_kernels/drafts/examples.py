"""Token sequences in batches: right-padding, and the examples that drafts are measured and trained on."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Example:
    """One sequence that drafts are trained or measured on: tokens (prompt + answer) and start, the first
    anchor that counts (the prompt's last token for generated answers, 0 for plain text)."""

    tokens: list[int]
    start: int


def right_pad(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> tokens [B, max len] int64 right-padded with 0, and the index of each last token [B]."""
    tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, : len(s)] = torch.tensor(s)
    return tokens.to(device), torch.tensor([len(s) - 1 for s in seqs], device=device)


def collate(examples: list[Example], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> tokens [B, N] (right-padded with 0), lengths [B], starts [B]."""
    tokens, last = right_pad([e.tokens for e in examples], device)
    return tokens, last + 1, torch.tensor([e.start for e in examples], device=device)
