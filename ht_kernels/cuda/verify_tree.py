"""Launcher of the CUDA `verify_tree_greedy` kernel (csrc/verify_tree.cu)."""
from __future__ import annotations

import torch

from .build import load


def verify_tree_greedy_fwd(draft_tokens, parents, target_tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """draft_tokens, target_tokens [B, T], parents [T] or [B, T], int64 on CUDA (checked by
    ht_kernels.verify_tree_greedy) -> accepted [B, T] int64 (-1 padded), accept_len [B] int64."""
    B, T = draft_tokens.shape
    draft, parents, target = (t.contiguous() for t in (draft_tokens, parents, target_tokens))
    accepted = draft.new_empty(B, T)
    accept_len = draft.new_empty(B)
    load().verify_tree_greedy(draft.data_ptr(), parents.data_ptr(), T if parents.dim() == 2 else 0,
                              target.data_ptr(), accepted.data_ptr(), accept_len.data_ptr(), B, T,
                              torch.cuda.current_stream(draft.device).cuda_stream)
    return accepted, accept_len
