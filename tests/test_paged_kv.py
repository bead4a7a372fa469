"""Paged KV caches (block_table). tree_attention: every backend against the fp64 reference of the
contiguous layout and bitwise against the contiguous call, the slots k/v are written to, errors,
registration. compact_kv: bitwise against the contiguous call and the reference, errors, registration."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ht_kernels
from helpers import BACKENDS, CUDA_BACKEND, DEVICE, DTYPES, POISON, assert_close
from ht_kernels.cuda.tree_attention import sm90_takes_page, use_sm90
from ht_kernels.ops.compact_kv import _compact_kv_torch
from ht_kernels.reference.compact_kv import compact_kv_ref
from ht_kernels.reference.tree_attention import tree_attention_ref
from test_compact_kv import make_case as compact_case, random_path, random_tree
from test_tree_attention import make_case, reference

BLOCK_SIZES = [16, 64, 256]
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so NaN == NaN and equality is bitwise."""
    return t.view(BITS[t.element_size()])


def paged_layout(lens, T, block_size, *, spare=3, pad=None, strided=False):
    """A block table for rows of prefix lengths `lens` and T tree tokens: row b gets the
    ceil((lens[b] + T) / block_size) blocks it uses from a random permutation of a pool of their total
    + `spare` blocks; the entries past a row's blocks hold `pad` (default: a spare block, which holds NaN,
    so reading one shows). strided: the table is every other column of a wider one.
    Returns (block_table [B, max_blocks] int32, used [B], num_blocks)."""
    used = [-(-(n + T) // block_size) for n in lens]
    num_blocks = sum(used) + spare
    ids = torch.randperm(num_blocks)
    table = torch.full((len(lens), max(used) + 1), int(ids[-1]) if pad is None else pad, dtype=torch.int32)
    start = 0
    for b, u in enumerate(used):
        table[b, :u] = ids[start:start + u]
        start += u
    if strided:
        wide = torch.full((table.shape[0], 2 * table.shape[1]), 7, dtype=torch.int32)
        wide[:, ::2] = table
        table = wide[:, ::2]
    return table.to(DEVICE), used, num_blocks


def to_pool(cache, table, used, num_blocks, block_size):
    """cache [B, S, Hkv, D] -> pool [num_blocks, block_size, Hkv, D]: row b's logical positions in its
    used[b] blocks of table, NaN everywhere else (spare blocks, slots past S)."""
    pool = torch.full((num_blocks, block_size, *cache.shape[2:]), POISON, dtype=cache.dtype, device=cache.device)
    for b, u in enumerate(used):
        for i in range(u):
            part = cache[b, i * block_size:(i + 1) * block_size]
            pool[table[b, i], :part.shape[0]] = part
    return pool


def launcher(backend):
    """The tree_attention_fwd of the triton or cuda backend."""
    if backend == "cuda":
        from ht_kernels.cuda.tree_attention import tree_attention_fwd
    else:
        from ht_kernels.triton.tree_attention import tree_attention_fwd
    return tree_attention_fwd


def run(backend, q, k_cache, v_cache, seqlens, mask, k, v, scale, table, launch):
    """(out, lse) of the public op, or of the backend's launcher when launch options are given."""
    if launch:
        return launcher(backend)(q, k_cache, v_cache, seqlens, mask, k, v, scale, block_table=table, **launch)
    return ht_kernels.tree_attention(q, k_cache, v_cache, seqlens, mask, k=k, v=v, softmax_scale=scale,
                                     return_lse=True, block_table=table, backend=backend)


def check_paged(backend, case, block_size, *, pad=None, strided=False, scale=None, **launch):
    """The paged call matches the fp64 reference, equals the contiguous call bitwise (both with the same
    split count: the heuristic's follows the capacity, which a paged table rounds up to whole blocks),
    writes k/v to the paged slots of the contiguous call's writes, and changes nothing else in the pool."""
    q, k_cache, v_cache, seqlens, mask, k, v = case
    table, used, num_blocks = paged_layout(seqlens.tolist(), q.shape[1], block_size, pad=pad, strided=strided)
    k_pool, v_pool = (to_pool(c, table, used, num_blocks, block_size) for c in (k_cache, v_cache))
    ref_out, ref_lse, _, _ = reference(*case, scale)
    out, lse = run(backend, q, k_pool, v_pool, seqlens, mask, k, v, scale, table, launch)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, q.dtype, "out")
    assert_close(lse, ref_lse, torch.float32 if q.dtype == torch.float32 else q.dtype, "lse")
    if backend != "torch" and not launch:  # the same split count for both calls, and the paged call again
        launch = {"num_splits": 1}
        out, lse = run(backend, q, k_pool, v_pool, seqlens, mask, k, v, scale, table, launch)
    out_c, lse_c = run(backend, q, k_cache, v_cache, seqlens, mask, k, v, scale, None, launch)
    if not (backend == "cuda" and use_sm90(q.device) and not sm90_takes_page(block_size)):  # else: two kernels
        assert torch.equal(bits(out), bits(out_c)) and torch.equal(lse, lse_c), "paged and contiguous calls differ"
    for name, pool, cache in (("k", k_pool, k_cache), ("v", v_pool, v_cache)):
        want = to_pool(cache, table, used, num_blocks, block_size)  # the contiguous call wrote k/v there
        assert torch.equal(bits(pool), bits(want)), f"{name} pool differs from the contiguous cache's blocks"


# Prefixes of 0, ending mid-block and on a block boundary; MHA, GQA, MQA; trees and any pattern (with
# queries that see nothing), shared and per-row masks; head dims that do and do not fill a tile.
CASES = [  # Hq, Hkv, D, T, lens, mask, per_row
    (2, 2, 32, 1, [0, 37, 100], "tree", False),
    (6, 2, 80, 21, [16, 5, 63], "any", True),
    (4, 1, 64, 40, [300, 0, 129], "tree", True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_kv", [True, False])
def test_matches_reference(backend, block_size, dtype, with_kv):
    i = (BLOCK_SIZES.index(block_size) + DTYPES.index(dtype) + with_kv) % len(CASES)
    Hq, Hkv, D, T, lens, mask, per_row = CASES[i]
    case = make_case(len(lens), T, Hq, Hkv, D, dtype, lens, mask=mask, per_row=per_row, with_kv=with_kv)
    check_paged(backend, case, block_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_kv,pad", [(True, -1), (False, 2**31 - 1)])
def test_padded_strided_table_and_scale(backend, with_kv, pad):
    """Entries past a row's blocks hold ids outside the pool (padding, never read), the table is a
    strided view, a set softmax scale."""
    case = make_case(3, 9, 6, 3, 32, torch.float16, [40, 0, 23], per_row=True, with_kv=with_kv)
    check_paged(backend, case, 16, pad=pad, strided=True, scale=0.3)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend cannot run here")
@pytest.mark.parametrize("config,splits", [(dict(BLOCK_N=64, BLOCK_T=16), 3),
                                           (dict(BLOCK_M=16, BLOCK_N=16, BLOCK_T=64), 1)])
@pytest.mark.parametrize("block_size", [16, 64])
def test_triton_tiles_and_splits(config, splits, block_size):
    """Key tiles wider and narrower than a block, the prefix split over programs."""
    case = make_case(3, 20, 4, 2, 64, torch.float16, [200, 0, 129], per_row=True)
    check_paged("triton", case, block_size, num_splits=splits, config=config)


# The CUDA kernel on the shapes it takes (fp16/bf16, head dims 64 and 128): block sizes narrower and wider
# than its 64-key tiles, prefixes ending mid-block, GQA, per-row masks, one split and several.
CUDA_CASES = [  # Hq, Hkv, D, T, lens, dtype, splits
    (8, 2, 64, 21, [16, 5, 63], torch.float16, 1),
    (4, 4, 128, 40, [300, 0, 129], torch.bfloat16, 3),
    (6, 2, 128, 9, [700, 64, 1], torch.float16, 4),
]


@pytest.mark.parametrize("backend", CUDA_BACKEND)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("case", range(len(CUDA_CASES)))
@pytest.mark.parametrize("with_kv", [True, False])
def test_cuda_matches_reference(backend, block_size, case, with_kv):
    Hq, Hkv, D, T, lens, dtype, splits = CUDA_CASES[case]
    tree = make_case(len(lens), T, Hq, Hkv, D, dtype, lens, per_row=True, with_kv=with_kv)
    check_paged(backend, tree, block_size, num_splits=splits)
    check_paged(backend, tree, block_size, strided=True, pad=-1, scale=0.3, num_splits=splits)


@pytest.mark.parametrize("backend", CUDA_BACKEND)
@pytest.mark.parametrize("block_size", [16, 64])
def test_cuda_through_the_public_op(backend, block_size):
    """ht_kernels.tree_attention(backend="cuda") with a block table (its split count: one split for these
    capacities, paged and contiguous alike, so the two calls agree bitwise)."""
    Hq, Hkv, D, T, lens, dtype, _ = CUDA_CASES[0]
    check_paged(backend, make_case(len(lens), T, Hq, Hkv, D, dtype, lens, per_row=True), block_size)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"] + CUDA_BACKEND)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("where", ["prefix", "tree", "length"])
def test_kernels_check_block_ids_and_lengths_on_the_device(backend, splits, where):
    """A row that uses a block id outside [0, num_blocks), in its prefix or its tree slots, or whose length
    breaks the capacity, gets NaN outputs and lse; nothing is read or written through a bad id, and a bad
    length writes nothing. The other row is exact. Entries past a row's used blocks are never looked at."""
    tree_attention_fwd = launcher(backend)
    T, bs = 6, 16
    D, dtype = (64, torch.float16) if backend == "cuda" else (32, torch.float32)
    q, k_cache, v_cache, seqlens, mask, k, v = make_case(2, T, 4, 2, D, dtype, [40, 300])
    table, used, num_blocks = paged_layout(seqlens.tolist(), T, bs, pad=-7)
    k_pool, v_pool = (to_pool(c, table, used, num_blocks, bs) for c in (k_cache, v_cache))
    ref_out, ref_lse = reference(q, k_cache, v_cache, seqlens, mask, k, v)[:2]
    lens = seqlens.clone()
    if where == "length":
        lens[1] = table.shape[1] * bs - T + 1
    else:  # block 3 of row 1 holds prefix positions 48..63; its last used block, tree slots 304 and 305
        table[1, 3 if where == "prefix" else used[1] - 1] = num_blocks
    expected = k_pool.clone(), v_pool.clone()
    for b in range(2):  # the tree slots written through good ids (none for a bad length)
        for j in range(T if lens[b] == seqlens[b] else 0):
            block, slot = int(table[b, (seqlens[b] + j) // bs]), int(seqlens[b] + j) % bs
            if block < num_blocks:
                expected[0][block, slot], expected[1][block, slot] = k[b, j], v[b, j]
    out = torch.full_like(q, 12345.0)
    lse = torch.full(ref_lse.shape, 12345.0, device=q.device)
    tree_attention_fwd(q, k_pool, v_pool, lens, mask, k, v, block_table=table, out=out, lse=lse, num_splits=splits)
    assert_close(out[:1], ref_out[:1], dtype, "out")
    assert_close(lse[:1], ref_lse[:1], dtype, "lse")
    assert out[1].isnan().all() and lse[1].isnan().all()
    assert torch.equal(bits(k_pool), bits(expected[0])) and torch.equal(bits(v_pool), bits(expected[1]))


def test_reference_on_the_paged_layout():
    """tree_attention_ref reads and writes through the table like the contiguous reference."""
    case = make_case(3, 12, 4, 2, 32, torch.float32, [5, 0, 70], per_row=True)
    q, k_cache, v_cache, seqlens, mask, k, v = case
    table, used, num_blocks = paged_layout(seqlens.tolist(), 12, 16)
    k_pool, v_pool = (to_pool(c.double(), table, used, num_blocks, 16) for c in (k_cache, v_cache))
    out, lse = tree_attention_ref(q.double(), k_pool, v_pool, seqlens, mask, k.double(), v.double(), None, table)
    ref_out, ref_lse, ref_kc, ref_vc = reference(*case)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert torch.equal(bits(k_pool), bits(to_pool(ref_kc, table, used, num_blocks, 16)))
    assert torch.equal(bits(v_pool), bits(to_pool(ref_vc, table, used, num_blocks, 16)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tree(backend):
    q, k_cache, v_cache, seqlens, mask, k, v = make_case(2, 1, 2, 1, 32, torch.float32, [3, 20])
    table, used, num_blocks = paged_layout(seqlens.tolist(), 1, 16)
    k_pool = to_pool(k_cache, table, used, num_blocks, 16)
    before = k_pool.clone()
    out, lse = ht_kernels.tree_attention(q[:, :0], k_pool, k_pool.clone(), seqlens, mask[:0, :0], k=k[:, :0],
                                         v=v[:, :0], return_lse=True, block_table=table, backend=backend)
    assert out.shape == (2, 0, 2, 32) and lse.shape == (2, 2, 0)
    assert torch.equal(bits(k_pool), bits(before))


def _bad_inputs():
    B, T, Hq, Hkv, D, bs = 2, 4, 4, 2, 32, 16
    q = torch.randn(B, T, Hq, D)
    pool = torch.randn(6, bs, Hkv, D)
    lens = torch.tensor([3, 20], dtype=torch.int32)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    good = dict(q=q, k_cache=pool, v_cache=pool.clone(), cache_seqlens=lens,
                tree_mask=torch.ones(T, T, dtype=torch.bool), block_table=table)
    return good, [
        ("block_table must be int32", dict(block_table=table.long())),
        ("block_table must be \\[B=2", dict(block_table=table[0])),
        ("block_table must be \\[B=2", dict(block_table=table[:1])),
        ("block_table must be \\[B=2", dict(block_table=[[0, 1], [2, 3]])),
        ("block_table.*\\[0, 6\\).*block_table\\[1, 1\\] = 6", dict(block_table=torch.tensor([[0, 5], [2, 6]],
                                                                                               dtype=torch.int32))),
        ("block_table.*\\[0, 6\\).*block_table\\[0, 0\\] = -1", dict(block_table=torch.tensor([[-1, 5], [2, 3]],
                                                                                                dtype=torch.int32))),
        ("block_table \\[2, 1\\].*capacity 16", dict(block_table=table[:, :1])),
        ("block_table \\[2, 0\\].*fewer than the T=4", dict(block_table=table[:, :0])),
        ("block_table is on meta", dict(block_table=table.to("meta"))),
        ("k_cache must be \\[num_blocks, block_size >= 1", dict(k_cache=pool[..., :16], v_cache=pool[..., :16])),
        ("k_cache must be \\[num_blocks, block_size >= 1", dict(k_cache=pool[:, :0], v_cache=pool[:, :0])),
        ("Hkv", dict(k_cache=torch.randn(6, bs, 3, D), v_cache=torch.randn(6, bs, 3, D))),
        ("v_cache must have", dict(v_cache=pool.half())),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs()[1])))
def test_bad_input_raises_value_error(case):
    good, bad = _bad_inputs()
    match, change = bad[case]
    with pytest.raises(ValueError, match=match):
        ht_kernels.tree_attention(**{**good, **change}, backend="torch")


def test_unused_table_entries_are_not_checked():
    """Only the blocks a row uses are checked: entries past them may hold anything (padding)."""
    good, _ = _bad_inputs()
    table = torch.tensor([[0, -1, 99], [2, 3, -5]], dtype=torch.int32)
    ht_kernels.tree_attention(**{**good, "block_table": table}, backend="torch")


def test_cache_bounds_known_skips_the_table_check():
    from ht_kernels.ops import tree_attention as op

    lens = torch.tensor([3, 20], dtype=torch.int32)
    table = torch.tensor([[0, 9]], dtype=torch.int32).expand(2, 2)
    with op.cache_bounds_known():
        op.check_block_table(lens, 4, table, 6, 16)
    with pytest.raises(ValueError, match="block_table"):
        op.check_block_table(lens, 4, table, 6, 16)


def test_cuda_backend_takes_paged_caches_it_can_run():
    """The CUDA kernel's limits are those of contiguous caches: fp16/bf16 pools of head dim 64 or 128 pass
    `unsupported`, fp32 ones raise BackendUnavailableError."""
    from ht_kernels.cuda.tree_attention import unsupported

    good, _ = _bad_inputs()
    good = {name: t.to(DEVICE) for name, t in good.items()}
    with pytest.raises(ht_kernels.BackendUnavailableError, match="cuda"):
        ht_kernels.tree_attention(**good, backend="cuda")
    q, pool = torch.randn(2, 4, 4, 64).half(), torch.randn(6, 16, 2, 64).half()
    assert unsupported(q, pool, pool.clone(), good["block_table"]) is None
    why = unsupported(q.float(), pool.float(), pool.float(), good["block_table"])
    assert why and "fp16 and bf16" in why


def test_auto_runs_paged_caches():
    """Backend "auto" never picks cuda for paged caches (on CPU it runs torch, on a GPU triton)."""
    case = make_case(2, 5, 4, 2, 32, torch.float32, [9, 30])
    check_paged("auto", case, 16)


def test_opcheck_and_compile():
    case = [t.cpu() for t in make_case(2, 6, 4, 2, 32, torch.float32, [9, 0], per_row=True)]
    q, k_cache, v_cache, seqlens, mask, k, v = case
    table, used, num_blocks = paged_layout(seqlens.tolist(), 6, 16)
    table = table.cpu()
    k_pool, v_pool = (to_pool(c, table, used, num_blocks, 16).nan_to_num(0.0) for c in (k_cache, v_cache))
    torch.library.opcheck(torch.ops.ht_kernels.tree_attention.default,
                          (q, k_pool, v_pool, seqlens, mask, k, v, None, "torch", table))

    def step(q, k_pool, v_pool, seqlens, mask, k, v, table):
        out, lse = ht_kernels.tree_attention(q, k_pool, v_pool, seqlens, mask, k=k, v=v, return_lse=True,
                                             block_table=table, backend="torch")
        return out * 2, lse.exp()

    kp2, vp2 = k_pool.clone(), v_pool.clone()
    expected = step(q, k_pool, v_pool, seqlens, mask, k, v, table)
    got = torch.compile(step, fullgraph=True)(q, kp2, vp2, seqlens, mask, k, v, table)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert torch.equal(kp2, k_pool) and torch.equal(vp2, v_pool)


def pool_layers(cache, table, used, num_blocks, block_size):
    """`to_pool` of each layer of cache [L, B, S, H, D] -> [L, num_blocks, block_size, H, D], or of [B, S, H, D]."""
    if cache.dim() == 4:
        return to_pool(cache, table, used, num_blocks, block_size)
    return torch.stack([to_pool(c, table, used, num_blocks, block_size) for c in cache])


def compact_paged_case(layered, dtype, lens, T, block_size):
    """A compact_kv case (test_compact_kv.make_case) over random paths of one tree, and its paged layout."""
    tree = random_tree(T)
    paths = [random_path(tree) for _ in lens]
    paths[0] = random_path(tree, length=T)
    shape = (2, len(lens), 0, 2, 8) if layered else (len(lens), 0, 2, 8)
    case = compact_case(shape, dtype, lens, paths, T=T, A=T)
    return case, paged_layout(lens, T, block_size)


@pytest.mark.parametrize("layered", [True, False], ids=["LBSHD", "BSHD"])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_kv(layered, block_size, dtype):
    """The paged move equals the contiguous call's on the same logical contents, and the reference's."""
    lens, T = [0, 13, 5, 37], 20
    (k_cache, v_cache, *rest), (table, used, num_blocks) = compact_paged_case(layered, dtype, lens, T, block_size)
    k_pool, v_pool = (pool_layers(c, table, used, num_blocks, block_size) for c in (k_cache, v_cache))
    ref_k, ref_v = k_pool.clone(), v_pool.clone()
    compact_kv_ref(ref_k, ref_v, *rest, table)
    ht_kernels.compact_kv(k_pool, v_pool, *rest, block_table=table, backend="auto")
    ht_kernels.compact_kv(k_cache, v_cache, *rest, backend="torch")
    for name, got, ref, cache in (("k", k_pool, ref_k, k_cache), ("v", v_pool, ref_v, v_cache)):
        want = pool_layers(cache, table, used, num_blocks, block_size)
        assert torch.equal(bits(ref), bits(want)), f"reference {name} pool differs from the contiguous call's"
        assert torch.equal(bits(got), bits(want)), f"{name} pool differs from the contiguous call's"


def _compact_bad_inputs():
    pool = torch.randn(2, 6, 4, 2, 8)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    acc = torch.tensor([[0, 1, 2, -1], [0, 2, -1, -1]])
    table = torch.tensor([[0, 1, 5], [2, 3, 4]], dtype=torch.int32)
    good = dict(k_cache=pool, v_cache=pool.clone(), cache_seqlens=lens, accepted=acc,
                accept_len=torch.tensor([3, 2], dtype=torch.int32), block_table=table)
    return good, [
        ("block_table must be int32", dict(block_table=table.long())),
        ("block_table must be \\[B, max_blocks\\]", dict(block_table=table[0])),
        ("for block_table \\[1, 3\\]", dict(block_table=table[:1])),
        ("block_table\\[1\\] must hold block ids in \\[0, num_blocks\\) = \\[0, 6\\)",
         dict(block_table=torch.tensor([[0, 1, 5], [2, 6, 4]], dtype=torch.int32))),
        ("S = 8 \\(block_table \\[2, 2\\]", dict(block_table=table[:, :2],
                                                 cache_seqlens=torch.tensor([3, 6], dtype=torch.int32))),
        ("block_table is on meta", dict(block_table=table.to("meta"))),
    ]


@pytest.mark.parametrize("case", range(len(_compact_bad_inputs()[1])))
def test_compact_kv_bad_block_table_raises_value_error(case):
    good, bad = _compact_bad_inputs()
    match, change = bad[case]
    args = {**good, **change}
    before = args["k_cache"].clone()
    with pytest.raises(ValueError, match=f"compact_kv: .*{match}"):
        ht_kernels.compact_kv(**args, backend="torch")
    assert torch.equal(args["k_cache"], before)


@pytest.mark.parametrize("backend", CUDA_BACKEND)
@pytest.mark.parametrize("layered", [True, False], ids=["LBSHD", "BSHD"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_compact_kv_cuda(backend, layered, block_size):
    """The CUDA kernel's paged move equals the torch backend's, bitwise; the moves of a row whose blocks
    all have ids outside [0, num_blocks) are skipped (as if it had accepted only its root)."""
    lens, T = [0, 13, 5, 37], 20
    (k_cache, v_cache, seqlens, accepted, accept_len), (table, used, num_blocks) = compact_paged_case(
        layered, torch.float16, lens, T, block_size)
    bad = table.clone()
    bad[0] = num_blocks
    root_only = accept_len.clone()
    root_only[0] = 1
    for got_table, want_len in ((table, accept_len), (bad, root_only)):
        k_pool, v_pool = (pool_layers(c, table, used, num_blocks, block_size) for c in (k_cache, v_cache))
        want = k_pool.clone(), v_pool.clone()
        ht_kernels.compact_kv(*want, seqlens, accepted, want_len, block_table=table, backend="torch")
        ht_kernels.compact_kv(k_pool, v_pool, seqlens, accepted, accept_len, block_table=got_table, backend=backend)
        assert torch.equal(bits(k_pool), bits(want[0])) and torch.equal(bits(v_pool), bits(want[1]))


def test_compact_kv_cuda_refuses_cpu_tensors_and_the_op_registers():
    good, _ = _compact_bad_inputs()
    with pytest.raises(ht_kernels.BackendUnavailableError, match="cuda"):
        ht_kernels.compact_kv(**good, backend="cuda")
    (k, v, *rest), (table, used, num_blocks) = compact_paged_case(True, torch.float32, [4, 0, 9], 10, 4)
    k, v = (pool_layers(c, table, used, num_blocks, 4).nan_to_num(0.0) for c in (k, v))
    torch.library.opcheck(torch.ops.ht_kernels.compact_kv.default, (k, v, *rest, "torch", table))
    with FakeTensorMode() as mode:  # no host sync: reading a value or a data-dependent shape raises here
        _compact_kv_torch(*(mode.from_tensor(t) for t in (k, v, *rest, table)))
