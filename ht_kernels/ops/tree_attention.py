"""`ht_kernels.tree_attention`: attention of a tree of new tokens over a KV cache (public op)."""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Optional

import torch

from ..torch_backend.tree_attention import tree_attention_torch, write_tree_kv
from ._backend import BackendUnavailableError, check_writable, device_guard, resolve_backend, shape_of, shares_memory

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TRITON_HEAD_DIM = 256


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    *,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    return_lse: bool = False,
    block_table: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Attention of T new (tree) tokens over a KV cache prefix plus the tree itself.

    q: [B, T, Hq, D]; k_cache, v_cache: [B, S, Hkv, D] with Hq % Hkv == 0; fp16, bf16 or fp32.
    cache_seqlens: [B] int32, the prefix length of each row. tree_mask: bool [T, T] or [B, T, T];
    tree_mask[..., i, j] is True iff query i may see tree token j (any pattern, not only trees).
    Query i of row b attends cache positions [0, cache_seqlens[b]) unmasked and tree positions
    cache_seqlens[b] + j where tree_mask[b, i, j].
    k, v: [B, T, Hkv, D] or None; when given they are written into the cache at cache_seqlens[b] + j
    before attending, otherwise those cache slots must already hold the tree's keys/values.
    softmax_scale: a finite real number; defaults to 1 / sqrt(D).
    Returns out [B, T, Hq, D] in q's dtype, and with return_lse also lse [B, Hq, T] fp32 (natural
    log). A query that sees nothing gets out 0 and lse -inf. Forward only: the kernel backends' outputs
    carry no autograd history.
    block_table: [B, max_blocks] int32 or None: a paged cache (flash-attn's convention). k_cache, v_cache
    are then [num_blocks, block_size, Hkv, D] and logical position p of row b lives at
    k_cache[block_table[b, p // block_size], p % block_size]; results equal the contiguous call's.
    backend: "auto" (triton on CUDA tensors, torch elsewhere) | "cuda" (fp16/bf16, head dims 64 and 128,
    16-byte aligned cache rows, contiguous or paged; other inputs raise BackendUnavailableError) | "triton" |
    "torch".

    The lengths must satisfy 0 <= cache_seqlens <= S - T (capacity max_blocks * block_size when paged)
    and the block ids each row uses must lie in [0, num_blocks). On CPU tensors, and with the torch
    backend, the values are checked on the host (ValueError; skipped inside `cache_bounds_known()`, for
    callers that size the cache themselves, like the decoder). The Triton and CUDA kernels never read
    them on the host (no synchronisation, CUDA graphs capture them): they check each row on the device,
    and a row that breaks the bound, or uses a bad block id, reads and writes none of its cache slots
    through them and gets NaN in all its outputs and lse.
    """
    _check_inputs(q, k_cache, v_cache, cache_seqlens, tree_mask, k, v, block_table)
    scale = _scale(softmax_scale)
    name = resolve_backend("tree_attention", backend, q.device)
    if q.is_meta:
        raise BackendUnavailableError("tree_attention: the torch backend reads cache_seqlens on the host, so it "
                                      "cannot run on meta tensors (torch.compile traces the op without running it)")
    if name == "cuda":
        from ..cuda.tree_attention import unsupported

        why = unsupported(q, k_cache, v_cache, block_table)
        if why:
            raise BackendUnavailableError(f"tree_attention: backend='cuda' cannot run these inputs: {why}")
    if name == "triton" and q.shape[-1] > MAX_TRITON_HEAD_DIM:
        raise BackendUnavailableError(
            f"tree_attention: backend='triton' supports head dims up to {MAX_TRITON_HEAD_DIM}, "
            f"got q of shape {tuple(q.shape)}"
        )
    # Eager calls run the op's body directly: the custom-op dispatch costs tens of microseconds a call,
    # once per layer. torch.compile sees the registered op.
    op = torch.ops.ht_kernels.tree_attention if torch.compiler.is_compiling() else _tree_attention_impl
    out, lse = op(q, k_cache, v_cache, cache_seqlens, tree_mask, k, v, scale, name, block_table)
    return (out, lse) if return_lse else out


def _scale(softmax_scale) -> float | None:
    """softmax_scale as a float (None: the default), or ValueError unless it is one finite real number."""
    if softmax_scale is None:
        return None
    bad = isinstance(softmax_scale, (complex, str, bytes)) or (
        isinstance(softmax_scale, torch.Tensor) and (softmax_scale.numel() != 1 or softmax_scale.is_complex()))
    try:
        scale = float(softmax_scale)
    except (TypeError, ValueError, RuntimeError):
        bad = True
    if bad or not math.isfinite(scale):
        raise ValueError(f"tree_attention: softmax_scale must be a finite real number, got {shape_of(softmax_scale)}")
    return scale


def _check_inputs(q, k_cache, v_cache, cache_seqlens, tree_mask, k, v, block_table=None) -> None:
    def fail(msg: str):
        raise ValueError(f"tree_attention: {msg}")

    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            fail(f"{name} must be a 4-D tensor, got {shape_of(t)}")
    B, T, Hq, D = q.shape
    if D == 0:
        fail(f"q must have a head dim D >= 1, got q of shape {shape_of(q)}")
    if q.dtype not in DTYPES:
        fail(f"q must be fp16, bf16 or fp32, got {q.dtype}")
    if k_cache.shape != v_cache.shape:
        fail(f"k_cache and v_cache must have the same shape, got {shape_of(k_cache)} and {shape_of(v_cache)}")
    Bc, S, Hkv, Dc = k_cache.shape
    if block_table is None:
        if Bc != B or Dc != D:
            fail(f"k_cache must be [B={B}, S, Hkv, D={D}] for q of shape {shape_of(q)}, got {shape_of(k_cache)}")
    else:
        if Dc != D or S == 0:
            fail(f"k_cache must be [num_blocks, block_size >= 1, Hkv, D={D}] with a block_table for q of "
                 f"shape {shape_of(q)}, got {shape_of(k_cache)}")
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != B:
            fail(f"block_table must be [B={B}, max_blocks] for q of shape {shape_of(q)}, got {shape_of(block_table)}")
        if block_table.dtype != torch.int32:
            fail(f"block_table must be int32, got {block_table.dtype}")
    if Hkv == 0:
        fail(f"k_cache must have at least one KV head, got {shape_of(k_cache)}")
    if Hq % Hkv != 0:
        fail(f"the query heads Hq={Hq} of q {shape_of(q)} must be a multiple of the KV heads Hkv={Hkv} "
             f"of k_cache {shape_of(k_cache)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            fail(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if (k is None) != (v is None):
        fail(f"k and v must be given together, got k {shape_of(k)} and v {shape_of(v)}")
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, T, Hkv, D):
                fail(f"{name} must be [B, T, Hkv, D] = {[B, T, Hkv, D]}, got {shape_of(t)}")
            if t.dtype != q.dtype:
                fail(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if not isinstance(cache_seqlens, torch.Tensor) or tuple(cache_seqlens.shape) != (B,):
        fail(f"cache_seqlens must be [B] = [{B}], got {shape_of(cache_seqlens)}")
    if cache_seqlens.dtype != torch.int32:
        fail(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if not isinstance(tree_mask, torch.Tensor) or tree_mask.dtype != torch.bool:
        fail(f"tree_mask must be a bool tensor, got {getattr(tree_mask, 'dtype', type(tree_mask))}")
    if tuple(tree_mask.shape) not in ((T, T), (B, T, T)):
        fail(f"tree_mask must be [T, T] or [B, T, T] with B={B}, T={T}, got {shape_of(tree_mask)}")
    if block_table is None and S < T:
        fail(f"the cache of k_cache {shape_of(k_cache)} is shorter than the T={T} tree tokens")
    if block_table is not None and block_table.shape[1] * S < T:
        fail(f"block_table {shape_of(block_table)} of blocks of {S} positions (k_cache {shape_of(k_cache)}) "
             f"holds fewer than the T={T} tree tokens")
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": cache_seqlens,
               "tree_mask": tree_mask, "k": k, "v": v, "block_table": block_table}
    for name, t in tensors.items():
        if t is not None and t.device != q.device:
            fail(f"{name} is on {t.device} but q is on {q.device}")
    if k is not None:  # the caches are written
        check_writable("tree_attention", "k_cache", k_cache)
        check_writable("tree_attention", "v_cache", v_cache)
        if shares_memory(k_cache, v_cache):
            fail("k_cache and v_cache must not share memory when k and v are written into them")


_BOUNDS_KNOWN = contextvars.ContextVar("ht_kernels_bounds_known", default=False)


@contextlib.contextmanager
def cache_bounds_known():
    """Within: tree_attention skips its host check of cache_seqlens + T against the cache (CPU tensors and
    the torch backend; on CUDA tensors a synchronisation per call). For callers that sized the cache
    themselves, like the decoder."""
    token = _BOUNDS_KNOWN.set(True)
    try:
        yield
    finally:
        _BOUNDS_KNOWN.reset(token)


def _skip_host_checks(cache_seqlens: torch.Tensor) -> bool:
    return cache_seqlens.numel() == 0 or _BOUNDS_KNOWN.get() or (
        cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing())


def check_cache_bounds(cache_seqlens: torch.Tensor, T: int, S: int) -> None:
    """cache_seqlens + T must fit in the cache of capacity S (reads the lengths on the host)."""
    if _skip_host_checks(cache_seqlens):
        return
    lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
    if lo < 0 or hi + T > S:
        raise ValueError(
            f"tree_attention: cache_seqlens must lie in [0, S - T] = [0, {S - T}] for a cache of S={S} "
            f"positions and T={T} tree tokens, got values in [{lo}, {hi}]"
        )


def check_block_table(cache_seqlens: torch.Tensor, T: int, block_table: torch.Tensor, num_blocks: int,
                      block_size: int) -> None:
    """cache_seqlens + T must fit in the max_blocks * block_size positions of block_table [B, max_blocks],
    and the ids of the ceil((cache_seqlens[b] + T) / block_size) blocks each row uses must lie in
    [0, num_blocks) (reads the lengths and one flag on the host)."""
    if _skip_host_checks(cache_seqlens):
        return
    capacity = block_table.shape[1] * block_size
    lens = cache_seqlens.long()
    n_used = (lens + T + block_size - 1) // block_size                                # [B] blocks per row
    used = torch.arange(block_table.shape[1], device=lens.device) < n_used[:, None]   # [B, max_blocks]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    lo, hi, n_bad = torch.stack([lens.min(), lens.max(), bad.sum()]).tolist()
    if lo < 0 or hi + T > capacity:
        raise ValueError(
            f"tree_attention: cache_seqlens must lie in [0, capacity - T] = [0, {capacity - T}] for T={T} tree "
            f"tokens and block_table {shape_of(block_table)} of blocks of {block_size} positions "
            f"(capacity {capacity}), got values in [{lo}, {hi}]"
        )
    if n_bad:
        b, i = bad.nonzero()[0].tolist()
        raise ValueError(
            f"tree_attention: block_table {shape_of(block_table)} must hold block ids in [0, num_blocks) = "
            f"[0, {num_blocks}) where rows use them, got block_table[{b}, {i}] = {int(block_table[b, i])}"
        )


def _tree_attention_impl(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    tree_mask: torch.Tensor,
    k: Optional[torch.Tensor],
    v: Optional[torch.Tensor],
    softmax_scale: Optional[float],
    backend: str,
    block_table: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, Hq, _ = q.shape
    kernel = q.numel() > 0 and q.is_cuda and backend in ("triton", "cuda")  # it checks the lengths on the device
    if not kernel:
        if block_table is None:
            check_cache_bounds(cache_seqlens, T, k_cache.shape[1])
        else:
            check_block_table(cache_seqlens, T, block_table, *k_cache.shape[:2])
    if q.numel() == 0:  # no query (empty batch, tree or query heads): no kernel runs, k and v are still written
        if k is not None and k.numel() > 0:
            write_tree_kv(k_cache, v_cache, cache_seqlens, k, v, block_table)
        return q.new_zeros(q.shape), q.new_full((B, Hq, T), float("-inf"), dtype=torch.float32)
    if backend == "cuda":
        from ..cuda.tree_attention import tree_attention_fwd

        with device_guard(q.device):
            return tree_attention_fwd(q, k_cache, v_cache, cache_seqlens, tree_mask, k, v, softmax_scale,
                                      block_table=block_table)
    if backend == "triton":
        from ..triton.tree_attention import tree_attention_fwd

        with device_guard(q.device):
            return tree_attention_fwd(q, k_cache, v_cache, cache_seqlens, tree_mask, k, v, softmax_scale,
                                      block_table=block_table)
    out, lse = tree_attention_torch(q, k_cache, v_cache, cache_seqlens, tree_mask, k, v, softmax_scale, block_table)
    return out, lse.float()


_tree_attention_op = torch.library.custom_op("ht_kernels::tree_attention", _tree_attention_impl,
                                             mutates_args=("k_cache", "v_cache"))


@_tree_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, tree_mask, k, v, softmax_scale, backend, block_table=None):
    B, T, Hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, Hq, T), dtype=torch.float32)
