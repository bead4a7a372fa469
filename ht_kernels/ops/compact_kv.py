"""`ht_kernels.compact_kv`: move the accepted tree nodes' keys/values behind the prefix (public op)."""
from __future__ import annotations

from typing import Optional

import torch

from ._backend import check_writable, device_guard, resolve_backend, shape_of, shares_memory

BACKENDS = ("cuda", "torch")
INDEX_DTYPES = (torch.int32, torch.int64)


def compact_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accepted: torch.Tensor,
    accept_len: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """After verification, move each row's accepted nodes to the slots right after its prefix, in place.

    A step wrote the K/V of its T tree nodes at slots cache_seqlens[b] + i (i = node index) of every
    layer; row b accepted the path accepted[b, :accept_len[b]]. For every layer and row, with
    n = cache_seqlens[b] and i < accept_len[b]:
        cache[..., b, n + i] = old cache[..., b, n + accepted[b, i]]
    All sources are read before any slot is written, so source and destination ranges may overlap and
    any index list works (a path of a topologically ordered tree has accepted[b, i] >= i, but nothing
    relies on it). Slots from n + accept_len[b] on keep whatever they held (scratch); every other
    element is untouched. cache_seqlens is not updated: the caller adds accept_len.

    k_cache, v_cache: [L, B, S, H, D] (all layers stacked) or [B, S, H, D] (one layer), one shape and
    one floating dtype, any strides. cache_seqlens: [B] int32. accepted: [B, A] int64 or int32, the
    path's node indices in order (accepted[b, 0] = 0, the root); entries at index >= accept_len[b]
    are ignored (e.g. -1 padding). accept_len: [B] int32 or int64 with 1 <= accept_len <= A.
    block_table: [B, max_blocks] int32 or None: paged caches, [L, num_blocks, block_size, H, D] or
    [num_blocks, block_size, H, D], as in `tree_attention`: slot p of row b above is
    cache[..., block_table[b, p // block_size], p % block_size], and S is max_blocks * block_size.
    backend: "auto" (torch) | "cuda" (CUDA tensors) | "torch"; "triton" raises
    BackendUnavailableError.

    Shapes, dtypes and devices are always checked. The values (1 <= accept_len <= A, cache_seqlens
    >= 0, 0 <= accepted[b, i] and cache_seqlens[b] + max(accept_len[b] - 1, accepted[b, i]) < S, and
    block ids in [0, num_blocks) up to the last slot a row moves) are checked only for CPU tensors: on
    a GPU that would cost a host sync, and out-of-range values are undefined behaviour there (except
    block ids: the cuda kernel skips a move from or to a block id outside [0, num_blocks)).
    """
    _check_inputs(k_cache, v_cache, cache_seqlens, accepted, accept_len, block_table)
    name = resolve_backend("compact_kv", backend, k_cache.device, available=BACKENDS)
    # Eager calls run the op's body directly: the dispatch of a custom op that mutates its inputs costs
    # about 0.3 ms a call on CPU, more than the body. torch.compile sees the registered op.
    op = torch.ops.ht_kernels.compact_kv if torch.compiler.is_compiling() else _compact_kv_impl
    op(k_cache, v_cache, cache_seqlens, accepted, accept_len, name, block_table)


def _check_inputs(k_cache, v_cache, cache_seqlens, accepted, accept_len, block_table=None) -> None:
    def fail(msg: str):
        raise ValueError(f"compact_kv: {msg}")

    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() not in (4, 5):
        fail(f"k_cache must be [L, B, S, H, D] or [B, S, H, D], got {shape_of(k_cache)}")
    if not k_cache.dtype.is_floating_point:
        fail(f"k_cache must have a floating dtype, got {k_cache.dtype}")
    if not isinstance(v_cache, torch.Tensor) or v_cache.shape != k_cache.shape:
        fail(f"k_cache and v_cache must have the same shape, got {shape_of(k_cache)} and {shape_of(v_cache)}")
    if v_cache.dtype != k_cache.dtype:
        fail(f"v_cache must have k_cache's dtype {k_cache.dtype}, got {v_cache.dtype}")
    check_writable("compact_kv", "k_cache", k_cache)
    check_writable("compact_kv", "v_cache", v_cache)
    if shares_memory(k_cache, v_cache):
        fail("k_cache and v_cache must not share memory (the op would move those slots twice)")
    B, rows_of = k_cache.shape[-4], f"k_cache {shape_of(k_cache)}"
    if block_table is not None:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            fail(f"block_table must be [B, max_blocks], got {shape_of(block_table)}")
        if block_table.dtype != torch.int32:
            fail(f"block_table must be int32, got {block_table.dtype}")
        if k_cache.shape[-3] == 0:
            fail(f"k_cache must be [L, num_blocks, block_size >= 1, H, D] or [num_blocks, block_size >= 1, H, D] "
                 f"with a block_table, got {shape_of(k_cache)}")
        B, rows_of = block_table.shape[0], f"block_table {shape_of(block_table)}"
    if not isinstance(cache_seqlens, torch.Tensor) or tuple(cache_seqlens.shape) != (B,):
        fail(f"cache_seqlens must be [B] = [{B}] for {rows_of}, got {shape_of(cache_seqlens)}")
    if cache_seqlens.dtype != torch.int32:
        fail(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if not isinstance(accepted, torch.Tensor) or accepted.dim() != 2 or accepted.shape[0] != B:
        fail(f"accepted must be [B, A] with B={B} from {rows_of}, got {shape_of(accepted)}")
    if accepted.shape[1] == 0:
        fail(f"accepted must be [B, A] with A >= 1 (the root is always accepted), got {shape_of(accepted)}")
    if accepted.dtype not in INDEX_DTYPES:
        fail(f"accepted must be int64 or int32, got {accepted.dtype}")
    if not isinstance(accept_len, torch.Tensor) or tuple(accept_len.shape) != (B,):
        fail(f"accept_len must be [B] = [{B}] for {rows_of}, got {shape_of(accept_len)}")
    if accept_len.dtype not in INDEX_DTYPES:
        fail(f"accept_len must be int32 or int64, got {accept_len.dtype}")
    tensors = (("v_cache", v_cache), ("cache_seqlens", cache_seqlens), ("accepted", accepted),
               ("accept_len", accept_len), ("block_table", block_table))
    for name, t in tensors:
        if t is not None and t.device != k_cache.device:
            fail(f"{name} is on {t.device} but k_cache is on {k_cache.device}")


def _check_values(k_cache, cache_seqlens, accepted, accept_len, block_table) -> None:
    """The data-dependent bounds (reads the tensors on the host: CPU tensors only)."""
    A = accepted.shape[1]
    S = k_cache.shape[-3]
    limit = f"S = {S}"
    if block_table is not None:
        num_blocks, block_size = k_cache.shape[-4:-2]
        S = block_table.shape[1] * block_size
        limit = f"S = {S} (block_table {shape_of(block_table)} of blocks of {block_size} slots)"
    for b, (n, count, row) in enumerate(zip(cache_seqlens.tolist(), accept_len.tolist(), accepted.tolist())):
        if not 1 <= count <= A:
            raise ValueError(f"compact_kv: accept_len[{b}] must be in [1, A] = [1, {A}] for accepted of "
                             f"shape {shape_of(accepted)}, got {count}")
        if n < 0:
            raise ValueError(f"compact_kv: cache_seqlens[{b}] must be >= 0, got {n}")
        nodes = row[:count]
        top = max(count - 1, *nodes)
        if min(nodes) < 0 or n + top >= S:
            raise ValueError(
                f"compact_kv: row {b} reads node indices {nodes} and writes {count} slots after a prefix of "
                f"cache_seqlens[{b}] = {n}; indices must be >= 0 and the slots must lie below {limit}"
            )
        blocks = [] if block_table is None else block_table[b, :(n + top) // block_size + 1].tolist()
        if any(not 0 <= i < num_blocks for i in blocks):
            raise ValueError(f"compact_kv: block_table[{b}] must hold block ids in [0, num_blocks) = "
                             f"[0, {num_blocks}) up to the last slot the row moves ({n + top}), got {blocks}")


def _compact_kv_torch(k_cache, v_cache, cache_seqlens, accepted, accept_len, block_table=None) -> None:
    """Gather-then-scatter of the accepted slots of every layer, without host syncs.

    Padding entries (index >= accept_len[b]) are redirected to entry 0, so they rewrite slot n with
    the value entry 0 writes there: duplicate writes of one value, fixed [L, B, A, H, D] work. With a
    block_table the logical slots are translated to (block, offset) pairs of the paged caches.
    """
    B, A = accepted.shape
    i = torch.arange(A, device=accepted.device)
    entry = torch.where(i < accept_len[:, None], i, 0)                       # [B, A]
    nodes = accepted.long().gather(1, entry)                                # [B, A]
    n = cache_seqlens.long()[:, None]
    rows = torch.arange(B, device=accepted.device)[:, None]
    src, dst = n + nodes, n + entry
    if block_table is None:
        at_src, at_dst = (rows, src), (rows, dst)
    else:
        block_size, table = k_cache.shape[-3], block_table.long()
        at_src = (table.gather(1, src // block_size), src % block_size)
        at_dst = (table.gather(1, dst // block_size), dst % block_size)
    for cache in (k_cache, v_cache):
        layers = cache if cache.dim() == 5 else cache.unsqueeze(0)         # [L, B, S, H, D] or paged
        layers[:, at_dst[0], at_dst[1]] = layers[:, at_src[0], at_src[1]]   # the gather copies first


def _compact_kv_impl(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    accepted: torch.Tensor,
    accept_len: torch.Tensor,
    backend: str,
    block_table: Optional[torch.Tensor] = None,
) -> None:
    if k_cache.device.type == "cpu":
        _check_values(k_cache, cache_seqlens, accepted, accept_len, block_table)
    if backend == "cuda":
        from ..cuda.compact_kv import compact_kv_fwd

        with device_guard(k_cache.device):
            compact_kv_fwd(k_cache, v_cache, cache_seqlens, accepted, accept_len, block_table)
    else:
        _compact_kv_torch(k_cache, v_cache, cache_seqlens, accepted, accept_len, block_table)


_compact_kv_op = torch.library.custom_op("ht_kernels::compact_kv", _compact_kv_impl,
                                         mutates_args=("k_cache", "v_cache"))


@_compact_kv_op.register_fake
def _(k_cache, v_cache, cache_seqlens, accepted, accept_len, backend, block_table=None):
    return None
