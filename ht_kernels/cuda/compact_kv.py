"""Launcher of the CUDA `compact_kv` kernel (csrc/compact_kv.cu)."""
from __future__ import annotations

import torch

from .build import load


def compact_kv_fwd(k_cache, v_cache, cache_seqlens, accepted, accept_len, block_table=None) -> None:
    """Moves the accepted slots of k_cache and v_cache ([L, B, S, H, D] or [B, S, H, D], CUDA, any strides;
    paged with block_table [B, max_blocks] int32: [L, num_blocks, block_size, H, D] or without L) in place;
    inputs checked by ht_kernels.compact_kv. One launch when both caches share their strides."""
    C = load()
    k5, v5 = (c if c.dim() == 5 else c.unsqueeze(0) for c in (k_cache, v_cache))
    L, B, page, H, D = k5.shape
    table = (0, 0, 0, 0, 0)
    if block_table is not None:
        B = block_table.shape[0]
        table = (block_table.data_ptr(), *block_table.stride(), page, k5.shape[1])
    e = k5.element_size()
    cache_seqlens, accept_len = cache_seqlens.contiguous(), accept_len.contiguous()
    accepted = accepted if accepted.stride(1) == 1 else accepted.contiguous()
    stream = torch.cuda.current_stream(k5.device).cuda_stream
    pairs = [(k5, v5)] if k5.stride() == v5.stride() else [(k5, None), (v5, None)]
    for k, v in pairs:
        sl, sb, ss, sh, sd = (s * e for s in k.stride())
        C.compact_kv(k.data_ptr(), 0 if v is None else v.data_ptr(), sl, sb, ss, sh, sd, L, B, H, D, e, *table,
                     cache_seqlens.data_ptr(), accepted.data_ptr(), accepted.stride(0),
                     accepted.dtype == torch.int64, accept_len.data_ptr(),
                     accept_len.dtype == torch.int64, accepted.shape[1], stream)
