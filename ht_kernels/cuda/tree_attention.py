"""Launcher of the CUDA `tree_attention` kernel (csrc/tree_attention.cu).

`HT_KERNELS_CUDA_SM90=1` opts in to the Hopper kernel (csrc/tree_attention_sm90.cuh: wgmma, TMA, warp
specialisation) on compute capability 9.0 devices; it stays off by default until a GPU run has validated
it, and the sm_80 kernel runs everywhere else (and for paged caches of block sizes it does not take, or
caches a TMA tensor map cannot describe). The variable is read at every call.
"""
from __future__ import annotations

import math
import os

import torch

from .build import load

DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2}
HEAD_DIMS = (64, 128)
SM90_ENV = "HT_KERNELS_CUDA_SM90"


def use_sm90(device) -> bool:
    """Whether calls on `device` take the Hopper kernel: HT_KERNELS_CUDA_SM90=1 and compute capability 9.0."""
    return os.environ.get(SM90_ENV, "0") == "1" and torch.cuda.get_device_capability(device) == (9, 0)


def sm90_takes_page(page: int) -> bool:
    """Whether the Hopper kernel takes paged caches of blocks of `page` positions (csrc/ht_kernels.h's
    sm90_takes_page: a multiple of 128, or 8, 16, 32, 64)."""
    return page > 0 and (page % 128 == 0 or (128 % page == 0 and page >= 8))


def unsupported(q, k_cache, v_cache, block_table=None) -> str | None:
    """Why the CUDA kernel cannot take these inputs (None when it can): fp16/bf16, head dim 64 or 128,
    caches (contiguous or paged) with a contiguous last dim, 16-byte aligned rows and the same strides
    for k and v."""
    if q.dtype not in DTYPE_CODES:
        return f"it takes fp16 and bf16, got {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"it takes head dims {HEAD_DIMS}, got q of shape {tuple(q.shape)}"
    if k_cache.stride() != v_cache.stride():
        return f"k_cache and v_cache must have the same strides, got {k_cache.stride()} and {v_cache.stride()}"
    e = k_cache.element_size()
    if k_cache.stride(-1) != 1 or any(s * e % 16 for s in k_cache.stride()[:-1]) or \
            k_cache.data_ptr() % 16 or v_cache.data_ptr() % 16:
        return f"the caches need a contiguous last dim and 16-byte aligned rows, got strides {k_cache.stride()}"
    return None


def _workspace(*shape: int, device) -> torch.Tensor:
    """The fp32 buffers of the split partials (every element is written before it is read)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def tree_attention_fwd(q, k_cache, v_cache, cache_seqlens, tree_mask, k=None, v=None, softmax_scale=None, *,
                       out=None, lse=None, num_splits: int | None = None,
                       block_table=None) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, T, Hq, D], lse [B, Hq, T] fp32 of ht_kernels.tree_attention (inputs checked there and by
    `unsupported`); k, v are written into the caches first. out, lse: optional buffers of those shapes
    (out with a contiguous last dim). num_splits: None picks about two waves of blocks. block_table
    [B, max_blocks] int32: paged caches [num_blocks, block_size, Hkv, D]."""
    C = load()
    B, T, Hq, D = q.shape
    S, Hkv = k_cache.shape[1:3]
    table = (0, 0, 0, 0, 0)  # block table, its strides, positions per block, blocks: none (contiguous)
    if block_table is not None:
        table = (block_table.data_ptr(), *block_table.stride(), S, k_cache.shape[0])
        S = block_table.shape[1] * S  # a row's logical capacity
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    if scale <= 0:  # the kernels' softmax wants a positive scale: -q for a negative one (exact), and
        q, scale = (-q, -scale) if scale < 0 else (torch.zeros_like(q), 1.0)  # for 0, equal weights
    if q.stride(-1) != 1 or q.data_ptr() % 4 or any(s % 2 for s in q.stride()):
        q = q.contiguous()
    cache_seqlens = cache_seqlens.contiguous()
    mask = tree_mask.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device) if lse is None else lse
    sm90 = use_sm90(q.device) and (block_table is None or sm90_takes_page(k_cache.shape[1]))
    splits = num_splits or C.tree_attention_num_splits(B, T, Hq, Hkv, S, sm90)
    part_out = part_lse = None
    if splits > 1:
        part_out = _workspace(splits, B, T, Hq, D, device=q.device)
        part_lse = _workspace(splits, B, Hq, T, device=q.device)
    if k is not None:
        k, v = k.contiguous(), v.contiguous()
    C.tree_attention(q.data_ptr(), *q.stride()[:3], k_cache.data_ptr(), v_cache.data_ptr(), *k_cache.stride()[:3],
                     *table, 0 if k is None else k.data_ptr(), 0 if v is None else v.data_ptr(),
                     *(k.stride()[:3] if k is not None else (0, 0, 0)), cache_seqlens.data_ptr(), mask.data_ptr(),
                     T * T if mask.dim() == 3 else 0, out.data_ptr(), *out.stride()[:3], lse.data_ptr(),
                     0 if part_out is None else part_out.data_ptr(), 0 if part_lse is None else part_lse.data_ptr(),
                     B, T, Hq, Hkv, D, S, splits, scale, DTYPE_CODES[q.dtype],
                     torch.cuda.current_stream(q.device).cuda_stream, sm90)
    return out, lse
