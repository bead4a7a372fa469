"""tree_attention: every backend against the fp64 reference, cache writes, split-KV, errors, registration."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ht_kernels
from helpers import BACKENDS, CUDA_BACKEND, DEVICE, DTYPES, POISON, assert_close
from ht_kernels.reference.tree_attention import tree_attention_ref


def random_tree_mask(T: int) -> torch.Tensor:
    """Ancestor mask [T, T] of a random tree in topological order (parents[i] < i)."""
    mask = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        mask[i] |= mask[torch.randint(0, i, ()).item()]
    return mask


def make_case(B, T, Hq, Hkv, D, dtype, lens, *, mask="tree", per_row=False, with_kv=True, extra=3):
    """Random inputs; every cache slot beyond a row's live prefix (and the tree slots when k/v are
    given) holds NaN, so reading one shows in the output."""
    S = max(lens) + T + extra
    q = torch.randn(B, T, Hq, D, dtype=dtype, device=DEVICE)
    k_cache = torch.randn(B, S, Hkv, D, dtype=dtype, device=DEVICE)
    v_cache = torch.randn(B, S, Hkv, D, dtype=dtype, device=DEVICE)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    k = v = None
    for b, n in enumerate(lens):
        stale = slice(n, None) if with_kv else slice(n + T, None)
        k_cache[b, stale] = POISON
        v_cache[b, stale] = POISON
    if with_kv:
        k = torch.randn(B, T, Hkv, D, dtype=dtype, device=DEVICE)
        v = torch.randn(B, T, Hkv, D, dtype=dtype, device=DEVICE)
    else:
        for b, n in enumerate(lens):
            k_cache[b, n:n + T] = torch.randn(T, Hkv, D, dtype=dtype)
            v_cache[b, n:n + T] = torch.randn(T, Hkv, D, dtype=dtype)
    n_masks = B if per_row else 1
    if mask == "tree":
        m = torch.stack([random_tree_mask(T) for _ in range(n_masks)])
    else:  # any boolean pattern, with some rows that see no tree token
        m = torch.rand(n_masks, T, T) < 0.3
        m[:, ::7] = False
    m = (m if per_row else m[0]).to(DEVICE)
    return q, k_cache, v_cache, seqlens, m, k, v


def reference(q, k_cache, v_cache, seqlens, mask, k, v, scale=None):
    """fp64 reference on copies; returns (out, lse, k_cache after, v_cache after)."""
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    kd, vd = (None, None) if k is None else (k.double(), v.double())
    out, lse = tree_attention_ref(q.double(), kc, vc, seqlens, mask, kd, vd, scale)
    return out, lse, kc, vc


def check(backend, case, scale=None, **launch):
    q, k_cache, v_cache, seqlens, mask, k, v = case
    ref_out, ref_lse, ref_kc, ref_vc = reference(*case, scale)
    if launch:  # call the backend's launcher directly, with poisoned output buffers
        if backend == "cuda":
            from ht_kernels.cuda.tree_attention import tree_attention_fwd
        else:
            from ht_kernels.triton.tree_attention import tree_attention_fwd

        out = torch.full_like(q, POISON)
        lse = torch.full(ref_lse.shape, POISON, device=q.device)
        tree_attention_fwd(q, k_cache, v_cache, seqlens, mask, k, v, scale, out=out, lse=lse, **launch)
    else:
        out, lse = ht_kernels.tree_attention(q, k_cache, v_cache, seqlens, mask, k=k, v=v,
                                             softmax_scale=scale, return_lse=True, backend=backend)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, q.dtype, "out")
    assert_close(lse, ref_lse, torch.float32 if q.dtype == torch.float32 else q.dtype, "lse")
    if k is not None:  # the tree slots hold k/v exactly; every other cache element is untouched
        assert torch.equal(k_cache.double().nan_to_num(7.0), ref_kc.nan_to_num(7.0))
        assert torch.equal(v_cache.double().nan_to_num(7.0), ref_vc.nan_to_num(7.0))


# Each (GQA ratio, T) pair once, with head dims, dtypes and prefix lengths rotating through the
# required values (prefix 0, 1 and lengths that are no multiple of any block size).
SHAPES = [
    (G, T, [32, 64, 80, 128][i % 4], DTYPES[i % 3], [[0, 1, 97], [133, 64, 5], [1, 0, 300]][i % 3])
    for i, (G, T) in enumerate(itertools.product([1, 3, 4], [1, 63, 65, 130]))
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G,T,D,dtype,lens", SHAPES)
def test_matches_reference(backend, G, T, D, dtype, lens):
    check(backend, make_case(len(lens), T, 2 * G, 2, D, dtype, lens))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64, 80, 128, 256])
def test_head_dims_and_dtypes(backend, dtype, D):
    check(backend, make_case(2, 9, 4, 1, D, dtype, [70, 3]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["tree", "any"])
@pytest.mark.parametrize("with_kv", [True, False])
def test_masks_per_row(backend, mask, with_kv):
    check(backend, make_case(3, 37, 6, 2, 64, torch.float32, [0, 65, 129], mask=mask, per_row=True,
                             with_kv=with_kv))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,lens,mask,dtype", [
    (1, 1, [57], "tree", torch.bfloat16),   # a plain decoding step: no mask at all
    (1, 1, [0], "tree", torch.float32),
    (2, 5, [40, 40], "tree", torch.float16),
    (1, 33, [129], "any", torch.bfloat16),
    (2, 7, [0, 0], "any", torch.float32),   # queries that see nothing
])
def test_one_prefix_length(backend, B, T, lens, mask, dtype):
    """Rows sharing one prefix length (the decoder's batch-1 steps) take the torch backend's shared-mask path."""
    check(backend, make_case(B, T, 6, 2, 64, dtype, lens, mask=mask))


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_that_sees_nothing(backend):
    q, k_cache, v_cache, seqlens, mask, k, v = make_case(2, 5, 2, 1, 32, torch.float16, [0, 4])
    mask = mask.clone()
    mask[2] = False
    out, lse = ht_kernels.tree_attention(q, k_cache, v_cache, seqlens, mask, k=k, v=v,
                                         return_lse=True, backend=backend)
    assert torch.all(out[0, 2] == 0) and torch.all(lse[0, :, 2] == -math.inf)
    assert torch.isfinite(out).all() and torch.isfinite(lse[1]).all()  # row 1 still sees its prefix


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale_and_strided_inputs(backend):
    q, k_cache, v_cache, seqlens, mask, k, v = make_case(2, 17, 4, 2, 48, torch.float32, [31, 8])
    wide = torch.full((*k_cache.shape[:3], 80), POISON, device=DEVICE)
    wide[..., 16:64] = k_cache
    k_cache = wide[..., 16:64]  # a non-contiguous view
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    seqlens = torch.stack([seqlens, seqlens + 1], dim=1)[:, 0]  # stride 2, neighbours differ
    mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)  # column-major
    check(backend, (q, k_cache, v_cache, seqlens, mask, k, v), scale=0.3)


def every_other(t: torch.Tensor) -> torch.Tensor:
    """t as a view whose last dim has stride 2, the elements between holding NaN."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), POISON, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])  # cuda takes caches with a unit stride
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_kv", [False, True])
def test_strided_head_dims(backend, dtype, with_kv):
    """A head dim with a stride, in every input: PyTorch's fused CPU kernel ignores that stride, so the
    torch backend must not hand it such views (the NaN between the elements would show)."""
    # one GQA group and one prefix length: the views would reach the kernel uncopied
    q, k_cache, v_cache, seqlens, mask, k, v = make_case(2, 5, 2, 2, 16, dtype, [9, 9], with_kv=with_kv)
    q, k_cache, v_cache = every_other(q), every_other(k_cache), every_other(v_cache)
    if with_kv:
        k, v = every_other(k), every_other(v)
    check(backend, (q, k_cache, v_cache, seqlens, mask, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [-0.4, 0.0, 2.5])
def test_any_softmax_scale(backend, scale):
    """The kernels scale the row max, not every score, so they take positive scales only: a negative scale
    runs on -q and a zero one weighs every visible key alike; both must still match the reference."""
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    check(backend, make_case(2, 9, 4, 2, 64, dtype, [40, 3], mask="any"), scale=scale)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend cannot run here")
@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tiles", [{}, dict(BLOCK_N=16, BLOCK_T=16)])
def test_split_kv(num_splits, dtype, tiles):
    # 8 splits over at most 4 full blocks: empty splits must merge as nothing. With 16-key tiles the tree
    # stage's blocks (the prefix tail, the 20 tree tokens) are dealt over the splits too.
    case = make_case(3, 20, 8, 2, 80, dtype, [260, 0, 129], per_row=True)
    check("triton", case, num_splits=num_splits, config=tiles)


@pytest.mark.parametrize("sms", [108, 132])
def test_split_heuristic_fills_the_gpu_without_reading_the_lengths(sms):
    """Splits for B = 1..64 rows and caches of 512..128k positions (Hkv 8, one query tile per (b, h)):
    as many as two waves hold where the cache allows it, one split once the programs alone fill 90% of a
    wave, never more than one per MIN_SPLIT_KEYS positions of capacity or MAX_SPLITS, fewer as B grows."""
    from ht_kernels.triton.tree_attention import MAX_SPLITS, MIN_SPLIT_KEYS, split_count

    for L in (512, 4096, 16384, 131072):
        prev = None
        for B in (1, 2, 4, 8, 16, 32, 64):
            programs = B * 8
            n = split_count(programs, L, sms)
            assert 1 <= n <= min(MAX_SPLITS, max(1, L // MIN_SPLIT_KEYS))
            if 10 * programs >= 9 * sms:
                assert n == 1
            elif L // MIN_SPLIT_KEYS >= MAX_SPLITS:  # the cache allows it: as many as two waves hold
                assert programs * n <= 2 * sms and (n == MAX_SPLITS or programs * (n + 1) > 2 * sms)
            assert prev is None or n <= prev
            prev = n
    assert split_count(8, 131072, sms) == min(MAX_SPLITS, 2 * sms // 8)
    assert split_count(8, 512, sms) == 2


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend cannot run here")
@pytest.mark.parametrize("splits", [3, 8])
def test_heuristic_splits_follow_the_live_prefix(monkeypatch, splits):
    """With heuristic splits a split takes at least MIN_SPLIT_KEYS of its row's prefix: rows of 0, 100 and
    700 cached tokens run on 0, 1 and a few splits of a launch of `splits`; all merge to the reference."""
    import ht_kernels.triton.tree_attention as tri

    monkeypatch.setattr(tri, "_num_splits", lambda *a: splits)
    case = make_case(3, 9, 4, 2, 32, torch.float32, [0, 100, 700], per_row=True)
    check("triton", case, config=dict(BLOCK_N=32))


# Tiles the tuner (benchmarks/tune_tree_attention.py) tries: prefix blocks wider than tree-stage blocks,
# narrow query tiles. Prefix lengths put the tail and the tree across several tree-stage blocks.
TILE_CONFIGS = [dict(BLOCK_N=64, BLOCK_T=16), dict(BLOCK_M=16, BLOCK_N=128, BLOCK_T=16, num_stages=3),
                dict(BLOCK_M=32, BLOCK_N=16, BLOCK_T=64, num_warps=4)]


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend cannot run here")
@pytest.mark.parametrize("config", TILE_CONFIGS)
@pytest.mark.parametrize("with_kv,splits", [(True, 1), (False, 3)])
def test_tile_configs(config, with_kv, splits):
    case = make_case(3, 37, 8, 2, 64, torch.float16, [300, 0, 129], per_row=True, with_kv=with_kv)
    check("triton", case, num_splits=splits, config=config)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend cannot run here")
@pytest.mark.parametrize("config", [dict(BLOCK_N=48), dict(BLOCK_T=8), dict(num_warps=0), dict(BLOCK_K=32),
                                    dict(num_stages=2.0)])
def test_bad_tile_config_raises(config):
    from ht_kernels.triton.tree_attention import tree_attention_fwd

    with pytest.raises(ValueError, match="config"):
        tree_attention_fwd(*make_case(1, 4, 2, 1, 16, torch.float32, [5]), config=config)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend cannot run here")
@given(
    B=st.integers(1, 3), T=st.integers(1, 70), G=st.sampled_from([1, 2, 3, 4, 8]),
    Hkv=st.integers(1, 3), D=st.sampled_from([16, 32, 40, 64, 72, 96, 128]),
    dtype=st.sampled_from(DTYPES), data=st.data(),
)
@settings(max_examples=12, deadline=None)
def test_random_cases(B, T, G, Hkv, D, dtype, data):
    lens = data.draw(st.lists(st.integers(0, 200), min_size=B, max_size=B))
    mask = data.draw(st.sampled_from(["tree", "any"]))
    per_row = data.draw(st.booleans())
    with_kv = data.draw(st.booleans())
    splits = data.draw(st.integers(1, 4))
    case = make_case(B, T, G * Hkv, Hkv, D, dtype, lens, mask=mask, per_row=per_row, with_kv=with_kv)
    check("triton", case, num_splits=splits)


# The CUDA kernel: fp16/bf16, head dims 64 and 128; the same shapes, masks and prefix lengths.
CUDA_SHAPES = [
    (G, T, [64, 128][i % 2], [torch.float16, torch.bfloat16][i // 2 % 2], [[0, 1, 97], [133, 64, 5], [1, 0, 300]][i % 3])
    for i, (G, T) in enumerate(itertools.product([1, 3, 4, 8], [1, 63, 65, 130]))
]


@pytest.fixture
def poisoned_workspace(monkeypatch):
    """The CUDA launcher's split partials start as NaN, so a partial the kernel misses shows."""
    import ht_kernels.cuda.tree_attention as cuda_ta

    monkeypatch.setattr(cuda_ta, "_workspace", lambda *shape, device: torch.full(shape, POISON, device=device))


@pytest.mark.cuda
@pytest.mark.parametrize("num_splits", [1, 2, 7])
@pytest.mark.parametrize("G,T,D,dtype,lens", CUDA_SHAPES)
def test_cuda_matches_reference(G, T, D, dtype, lens, num_splits, poisoned_workspace):
    check("cuda", make_case(len(lens), T, 2 * G, 2, D, dtype, lens), num_splits=num_splits)


@pytest.mark.cuda
@pytest.mark.parametrize("mask", ["tree", "any"])
@pytest.mark.parametrize("with_kv", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_masks_per_row_and_default_splits(mask, with_kv, dtype, poisoned_workspace):
    case = make_case(3, 37, 6, 2, 64, dtype, [0, 65, 129], mask=mask, per_row=True, with_kv=with_kv)
    check("cuda", case)
    check("cuda", make_case(2, 64, 32, 8, 128, dtype, [4100, 77], mask=mask, with_kv=with_kv), scale=0.05)


@pytest.mark.cuda
def test_cuda_query_that_sees_nothing_and_unsupported_inputs():
    q, k_cache, v_cache, seqlens, mask, k, v = make_case(2, 5, 2, 1, 64, torch.float16, [0, 4])
    mask = mask.clone()
    mask[2] = False
    out, lse = ht_kernels.tree_attention(q, k_cache, v_cache, seqlens, mask, k=k, v=v, return_lse=True, backend="cuda")
    assert torch.all(out[0, 2] == 0) and torch.all(lse[0, :, 2] == -math.inf)
    assert torch.isfinite(out).all() and torch.isfinite(lse[1]).all()
    for D, dtype in ((80, torch.float16), (64, torch.float32)):
        case = make_case(1, 3, 2, 1, D, dtype, [5])
        with pytest.raises(ht_kernels.BackendUnavailableError, match="cuda"):
            ht_kernels.tree_attention(*case[:5], k=case[5], v=case[6], backend="cuda")
    q, k_cache, v_cache, seqlens, mask, k, v = make_case(1, 3, 2, 1, 64, torch.float16, [5])
    wide = [torch.zeros(*k_cache.shape[:3], 72, dtype=torch.float16, device=DEVICE) for _ in range(2)]
    shifted = [w[..., 1:65] for w in wide]  # rows start 2 bytes past a 16-byte boundary
    with pytest.raises(ht_kernels.BackendUnavailableError, match="aligned"):
        ht_kernels.tree_attention(q, *shifted, seqlens, mask, k=k, v=v, backend="cuda")


def test_auto_picks_torch_on_cpu(monkeypatch):
    calls = []
    import ht_kernels.triton.tree_attention as tri  # noqa: F401  (must not be needed on CPU)

    monkeypatch.setattr(tri, "tree_attention_fwd", lambda *a, **kw: calls.append(1))
    case = make_case(1, 3, 2, 1, 32, torch.float32, [5])
    q, k_cache, v_cache, seqlens, mask, k, v = [t.cpu() if t is not None else None for t in case]
    ht_kernels.tree_attention(q, k_cache, v_cache, seqlens, mask, k=k, v=v)
    assert not calls


def test_named_backend_that_cannot_run_raises(monkeypatch):
    case = [t.cpu() for t in make_case(1, 3, 2, 1, 32, torch.float32, [5], with_kv=False)[:5]]
    with pytest.raises(ht_kernels.BackendUnavailableError, match="cuda"):
        ht_kernels.tree_attention(*case, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ht_kernels.BackendUnavailableError, match="triton"):
        ht_kernels.tree_attention(*case, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        ht_kernels.tree_attention(*case, backend="flash")
    with pytest.raises(ht_kernels.BackendUnavailableError, match="meta"):
        ht_kernels.tree_attention(*(t.to("meta") for t in case))


def test_error_messages_name_non_tensors_briefly():
    q, kc, vc, lens, mask = make_case(1, 3, 2, 1, 32, torch.float32, [5], with_kv=False)[:5]
    with pytest.raises(ValueError, match=r"q must be a 4-D tensor, got a list of length 300$"):
        ht_kernels.tree_attention([0.5] * 300, kc, vc, lens, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T", [(2, 0), (0, 3), (0, 0)])
def test_empty_tree_or_batch(backend, B, T):
    """An empty tree or batch returns empty outputs on every backend and leaves the cache as it was."""
    q, k_cache, v_cache, seqlens, _, k, v = make_case(max(B, 1), max(T, 1), 2, 1, 32, torch.float32, [3, 5][:max(B, 1)])
    q, k, v, seqlens = q[:B, :T], k[:B, :T], v[:B, :T], seqlens[:B]
    k_cache, v_cache = k_cache[:B], v_cache[:B]
    before = k_cache.clone()
    out, lse = ht_kernels.tree_attention(q, k_cache, v_cache, seqlens, torch.ones(T, T, dtype=torch.bool), k=k, v=v,
                                         return_lse=True, backend=backend)
    assert out.shape == q.shape and lse.shape == (B, q.shape[2], T) and lse.dtype == torch.float32
    assert torch.equal(k_cache.view(torch.int32), before.view(torch.int32))  # bitwise: the poison is NaN


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True])
def test_no_query_heads_still_writes_the_cache(backend, paged):
    """Hq = 0 (zero queries, as with B = 0 or T = 0): empty outputs, and k and v still land in the cache."""
    B, T, Hkv, D, S = 2, 3, 1, 16, 12
    k, v = (torch.randn(B, T, Hkv, D, device=DEVICE) for _ in range(2))
    lens = torch.tensor([4, 0], dtype=torch.int32, device=DEVICE)
    k_cache, v_cache = (torch.zeros(B, S, Hkv, D, device=DEVICE) for _ in range(2))
    table = None
    if paged:  # blocks of 4 positions, rows' blocks in reverse order
        k_cache, v_cache = (torch.zeros(2 * S // 4, 4, Hkv, D, device=DEVICE) for _ in range(2))
        table = torch.arange(2 * S // 4, dtype=torch.int32, device=DEVICE).flip(0).view(B, S // 4)
    q = torch.randn(B, T, 0, D, device=DEVICE)
    out, lse = ht_kernels.tree_attention(q, k_cache, v_cache, lens, torch.ones(T, T, dtype=torch.bool, device=DEVICE),
                                         k=k, v=v, return_lse=True, block_table=table, backend=backend)
    assert out.shape == (B, T, 0, D) and lse.shape == (B, 0, T)
    for b, n in enumerate(lens.tolist()):
        for j in range(T):
            p = n + j
            kc, vc = (c[b, p] if table is None else c[table[b, p // 4], p % 4] for c in (k_cache, v_cache))
            assert torch.equal(kc, k[b, j]) and torch.equal(vc, v[b, j])
    assert int((k_cache != 0).any(-1).sum()) == B * T * Hkv  # nothing else written


KERNELS = (["triton"] if "triton" in BACKENDS else []) + CUDA_BACKEND
SENTINEL = 12345.0  # the poison of outputs that should become NaN


def launcher(backend):
    if backend == "cuda":
        from ht_kernels.cuda.tree_attention import tree_attention_fwd
    else:
        from ht_kernels.triton.tree_attention import tree_attention_fwd
    return tree_attention_fwd


def test_kernel_config_takes_the_tuned_entry_of_its_arch(monkeypatch):
    """TUNED entries apply to their (arch, dtype class, BLOCK_D, row bucket) only, and never under the
    interpreter; fp16 and bf16 share entries."""
    from ht_kernels.triton import tree_attention as tri

    assert tri.table_key(90, torch.bfloat16, 80, 65) == tri.table_key(90, torch.float16, 80, 65) == (90, "16-bit", 128, 128)
    assert tri.table_key(90, torch.float32, 80, 65) == (90, "float32", 128, 128)
    assert tri.table_key(80, torch.float16, 128, 3)[3] == 16 and tri.table_key(80, torch.float16, 128, 4096)[3] == 256
    monkeypatch.setitem(tri.TUNED, (90, "16-bit", 128, 256), dict(BLOCK_N=64, BLOCK_T=16, num_stages=3))
    rule = tri.kernel_config(256, 128, torch.bfloat16, False, None)
    tuned = tri.kernel_config(200, 128, torch.bfloat16, False, 90)
    assert (tuned["BLOCK_N"], tuned["BLOCK_T"], tuned["num_stages"]) == (64, 16, 3)
    assert tri.kernel_config(200, 128, torch.float16, False, 90)["BLOCK_N"] == 64
    assert {k: v for k, v in tuned.items() if k not in ("BLOCK_N", "BLOCK_T", "num_stages")} == \
        {k: v for k, v in rule.items() if k not in ("BLOCK_N", "BLOCK_T", "num_stages")}
    for other in [(100, 128, torch.bfloat16, False, 90), (256, 128, torch.float32, False, 90),
                  (256, 128, torch.bfloat16, False, 80), (256, 64, torch.bfloat16, False, 90),
                  (256, 128, torch.bfloat16, True, 90)]:
        assert tri.kernel_config(*other)["BLOCK_N"] == tri.kernel_config(*other[:4])["BLOCK_N"] == rule["BLOCK_N"]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("with_kv", [True, False])
def test_kernels_check_the_lengths_on_the_device(backend, num_splits, with_kv):
    """The kernels read cache_seqlens on the device only: a row whose length breaks 0 <= n <= S - T
    reads and writes none of its cache and gets NaN in every output and lse; the other rows are exact."""
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    T = 5
    q, k_cache, v_cache, seqlens, mask, k, v = make_case(4, T, 4, 2, 64, dtype, [5, 7, 9, 2], with_kv=with_kv)
    S = k_cache.shape[1]
    ref_out, ref_lse, ref_kc, ref_vc = reference(q, k_cache, v_cache, seqlens, mask, k, v)
    bad_lens = torch.tensor([5, -1, S - T + 1, 2**31 - 1], dtype=torch.int32, device=DEVICE)
    before = k_cache.clone(), v_cache.clone()
    out = torch.full_like(q, SENTINEL)
    lse = torch.full(ref_lse.shape, SENTINEL, device=q.device)
    launcher(backend)(q, k_cache, v_cache, bad_lens, mask, k, v, out=out, lse=lse, num_splits=num_splits)
    assert_close(out[:1], ref_out[:1], dtype, "out")
    assert_close(lse[:1], ref_lse[:1], torch.float32 if dtype == torch.float32 else dtype, "lse")
    assert out[1:].isnan().all() and lse[1:].isnan().all()
    for cache, ref, old in ((k_cache, ref_kc, before[0]), (v_cache, ref_vc, before[1])):
        assert torch.equal(cache[:1].double().nan_to_num(7.0), ref[:1].nan_to_num(7.0))
        assert torch.equal(cache[1:].view(torch.int16), old[1:].view(torch.int16))  # bitwise: poison is NaN


def test_unsupported_head_dim_raises_backend_unavailable():
    case = [t.cpu() for t in make_case(1, 3, 2, 1, 512, torch.float32, [5], with_kv=False)[:5]]
    with pytest.raises(ht_kernels.BackendUnavailableError, match="triton.*head dims up to 256"):
        ht_kernels.tree_attention(*case, backend="triton")
    with pytest.raises(ht_kernels.BackendUnavailableError, match="cuda"):
        ht_kernels.tree_attention(*case, backend="cuda")


def _bad_inputs():
    B, T, Hq, Hkv, D, S = 2, 4, 4, 2, 32, 16
    q = torch.randn(B, T, Hq, D)
    kc = torch.randn(B, S, Hkv, D)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    mask = torch.ones(T, T, dtype=torch.bool)
    kv = torch.randn(B, T, Hkv, D)
    good = dict(q=q, k_cache=kc, v_cache=kc.clone(), cache_seqlens=lens, tree_mask=mask)
    return good, [
        ("q", dict(q=q[0])),
        ("q", dict(q=q.double())),
        ("k_cache", dict(k_cache=kc.half())),
        ("k_cache", dict(k_cache=kc[:1], v_cache=kc[:1])),
        ("v_cache", dict(v_cache=kc[:, :, :, :16])),
        ("Hkv", dict(k_cache=torch.randn(B, S, 3, D), v_cache=torch.randn(B, S, 3, D))),
        ("cache_seqlens", dict(cache_seqlens=lens.long())),
        ("cache_seqlens", dict(cache_seqlens=lens[:1])),
        ("cache_seqlens", dict(cache_seqlens=torch.tensor([3, 13], dtype=torch.int32))),
        ("cache_seqlens", dict(cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32))),
        ("tree_mask", dict(tree_mask=mask.int())),
        ("tree_mask", dict(tree_mask=mask[:3])),
        ("tree_mask", dict(tree_mask=mask.expand(3, T, T))),
        ("k and v", dict(k=kv)),
        ("k must", dict(k=kv[:, :3], v=kv[:, :3])),
        ("v must", dict(k=kv, v=kv.half())),
        ("device|meta", dict(cache_seqlens=lens.to("meta"))),
        ("head dim", dict(q=q[..., :0], k_cache=kc[..., :0], v_cache=kc[..., :0])),
        ("KV head", dict(k_cache=kc[:, :, :0], v_cache=kc[:, :, :0])),
        *(("softmax_scale", dict(softmax_scale=bad)) for bad in (float("nan"), float("inf"), -float("inf"), 1j,
                                                                   "0.5", torch.ones(2), torch.tensor(1j))),
        ("expanded", dict(k_cache=kc[:1].expand(B, S, Hkv, D), k=kv, v=kv)),  # written through stride 0
        ("share memory", dict(v_cache=kc, k=kv, v=kv)),
        ("share memory", dict(k_cache=kc[:, :-1], v_cache=kc[:, 1:], k=kv, v=kv)),  # slots one apart
        ("require grad", dict(k_cache=kc.clone().requires_grad_(), k=kv, v=kv)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs()[1])))
def test_bad_input_raises_value_error(case):
    good, bad = _bad_inputs()
    name, change = bad[case]
    args = {**good, **change}
    k, v, scale = args.pop("k", None), args.pop("v", None), args.pop("softmax_scale", None)
    with pytest.raises(ValueError, match=name):
        ht_kernels.tree_attention(*args.values(), k=k, v=v, softmax_scale=scale, backend="torch")


def test_opcheck_and_compile():
    case = make_case(2, 6, 4, 2, 32, torch.float32, [9, 0], per_row=True)
    case = [t.cpu() for t in case]
    q, k_cache, v_cache, seqlens, mask, k, v = case
    k_cache, v_cache = k_cache.nan_to_num(0.0), v_cache.nan_to_num(0.0)
    torch.library.opcheck(torch.ops.ht_kernels.tree_attention.default,
                          (q, k_cache, v_cache, seqlens, mask, k, v, None, "torch"))
    torch.library.opcheck(torch.ops.ht_kernels.tree_attention.default,
                          (q, k_cache, v_cache, seqlens, mask, None, None, 0.5, "torch"))

    def step(q, k_cache, v_cache, seqlens, mask, k, v):
        out, lse = ht_kernels.tree_attention(q, k_cache, v_cache, seqlens, mask, k=k, v=v,
                                             return_lse=True, backend="torch")
        return out * 2, lse.exp()

    kc2, vc2 = k_cache.clone(), v_cache.clone()
    expected = step(q, k_cache, v_cache, seqlens, mask, k, v)
    got = torch.compile(step, fullgraph=True)(q, kc2, vc2, seqlens, mask, k, v)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert torch.equal(kc2, k_cache) and torch.equal(vc2, v_cache)


def test_cache_bounds_known_skips_the_host_check(monkeypatch):
    """The decoder sizes its cache itself and runs its steps inside cache_bounds_known(): no host read of
    the lengths per layer. Outside the context the bound is checked again."""
    from ht_kernels.decode.decoder import HiddenTransferDecoder
    from ht_kernels.ops import tree_attention as op
    from test_decode import random_transfer, tiny_model

    lens = torch.tensor([100], dtype=torch.int32)
    with op.cache_bounds_known():
        op.check_cache_bounds(lens, 5, 10)
    with pytest.raises(ValueError, match="cache_seqlens"):
        op.check_cache_bounds(lens, 5, 10)
    seen = []
    import ht_kernels.cpu as cpu

    for where in (op, cpu):  # the op checks per call, the model once per pass (FlashCPUPlan)
        monkeypatch.setattr(where, "check_cache_bounds", lambda *args: seen.append(op._BOUNDS_KNOWN.get()))
    model = tiny_model()
    HiddenTransferDecoder(model, random_transfer(model)).generate([[1, 2, 3]], max_new_tokens=4)
    assert seen and all(seen)


@pytest.mark.parametrize("lens,mask", [([0, 65, 129], "any"), ([40, 40], "tree")])
def test_torch_backend_without_the_flash_kernel(monkeypatch, lens, mask):
    """The torch backend's materialized path (other devices, or a PyTorch without the CPU flash kernel)."""
    from ht_kernels.torch_backend import tree_attention as torch_backend

    monkeypatch.setattr(torch_backend, "FLASH_CPU", False)
    for dtype in DTYPES:
        check("torch", make_case(len(lens), 33, 6, 2, 64, dtype, lens, mask=mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_plan_masks_a_models_finite_stale_slots_without_zeroing(dtype):
    """A model's own cache holds finite keys/values past each row's prefix + tree (stale tree nodes, pads):
    FlashCPUPlan(dead_finite=True) masks them without zeroing a copy and gives the reference's output
    (large stale values included); with NaN there only the default plan, which zeroes them, is safe."""
    from ht_kernels.torch_backend.tree_attention import FlashCPUPlan

    lens, T = [5, 40, 0, 17], 4
    q, k_cache, v_cache, seqlens, mask, k, v = make_case(len(lens), T, 6, 2, 32, dtype, lens, extra=0)
    for b, n in enumerate(lens):
        k_cache[b, n:], v_cache[b, n:] = 300.0, -300.0                             # finite, stale
    ref_out, ref_lse, _, _ = reference(q, k_cache, v_cache, seqlens, mask, k, v)
    plan = FlashCPUPlan(seqlens, mask, T, 3, dtype, dead_finite=True)
    out, lse = plan(q, k_cache.clone(), v_cache.clone(), k, v)
    assert_close(out, ref_out, dtype, "out")
    assert_close(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "lse")
    for b, n in enumerate(lens):
        k_cache[b, n + T:], v_cache[b, n + T:] = float("nan"), float("nan")
    out, _ = FlashCPUPlan(seqlens, mask, T, 3, dtype)(q, k_cache.clone(), v_cache.clone(), k, v)
    assert_close(out, ref_out, dtype, "out")
    out, _ = plan(q, k_cache.clone(), v_cache.clone(), k, v)
    assert out.isnan().any()  # what dead_finite assumes away: the check above can fail
