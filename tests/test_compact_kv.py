"""compact_kv: bitwise against the reference and an explicit expectation, untouched elements, errors,
registration (opcheck, torch.compile), no host sync."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ht_kernels
from helpers import CUDA_BACKEND, DEVICE, POISON
from ht_kernels import Tree
from ht_kernels.ops.compact_kv import _compact_kv_torch
from ht_kernels.reference.compact_kv import compact_kv_ref

BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(params=["torch"] + CUDA_BACKEND)
def backend(request) -> str:
    return request.param


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so NaN == NaN and equality is bitwise."""
    return t.view(BITS[t.element_size()])


def random_tree(T: int) -> Tree:
    return Tree.from_parents([-1] + [int(torch.randint(0, i, ())) for i in range(1, T)])


def random_path(tree: Tree, length: int | None = None) -> list[int]:
    """A root-to-node path: a prefix of a random leaf's root path (random length unless given)."""
    paths = tree.retrieve_indices
    row = paths[int(torch.randint(0, paths.shape[0], ()))]
    full = row[row >= 0].tolist()
    if length is None:
        length = int(torch.randint(1, len(full) + 1, ()))
    return full[:min(length, len(full))]


def make_case(shape, dtype, lens, paths, *, T, A=None, pad=-1, extra=2, index_dtype=torch.int64,
              len_dtype=torch.int32, strided=False):
    """Caches of `shape` ([L, B, S, H, D] or [B, S, H, D] with S set here) holding random prefixes and tree
    slots and NaN from n + T on, plus the index tensors for `paths` (one list of node ids per row)."""
    *lead, _, H, D = shape
    S = max(lens) + T + extra
    full = (*lead, S, H, 2 * D if strided else D)
    k_cache = torch.randn(full, device=DEVICE).to(dtype)
    v_cache = torch.randn(full, device=DEVICE).to(dtype)
    if strided:  # a non-contiguous view, as a slice of a wider buffer
        k_cache, v_cache = k_cache[..., 1::2], v_cache[..., ::2]
    for b, n in enumerate(lens):
        k_cache[..., b, n + T:, :, :] = POISON
        v_cache[..., b, n + T:, :, :] = POISON
    A = A or max(len(p) for p in paths)
    accepted = torch.full((len(paths), A), pad, dtype=torch.int64)
    for b, p in enumerate(paths):
        accepted[b, :len(p)] = torch.tensor(p)
    accept_len = torch.tensor([len(p) for p in paths], dtype=len_dtype, device=DEVICE)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, seqlens, accepted.to(DEVICE, index_dtype), accept_len


def expected(cache, lens, paths):
    """The old cache with slots n .. n + len - 1 of each row replaced by the old slots n + path[i]."""
    out = cache.clone()
    for b, (n, p) in enumerate(zip(lens, paths)):
        out[..., b, n:n + len(p), :, :] = cache[..., b, [n + i for i in p], :, :]
    return out


def check(case, lens, paths, backend="auto"):
    k_cache, v_cache = case[:2]
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    compact_kv_ref(ref_k, ref_v, *case[2:])
    want_k, want_v = expected(k_cache, lens, paths), expected(v_cache, lens, paths)
    ht_kernels.compact_kv(*case, backend=backend)
    for name, got, ref, want in (("k", k_cache, ref_k, want_k), ("v", v_cache, ref_v, want_v)):
        assert torch.equal(bits(ref), bits(want)), f"reference {name}_cache differs from the expectation"
        same = bits(got) == bits(want)
        assert same.all(), f"{name}_cache differs at {tuple(int(i) for i in (~same).nonzero()[0])}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layered", [True, False], ids=["LBSHD", "BSHD"])
@pytest.mark.parametrize("T", [1, 7, 65])
def test_random_paths_match_reference(dtype, layered, T, backend):
    B = 5
    lens = [0, 13, 1, 64, 37]
    tree = random_tree(T)
    paths = [random_path(tree) for _ in range(B)]
    paths[0] = [0]                                   # accept_len 1: only the root
    paths[1] = random_path(tree, length=T)           # the deepest path of some leaf
    shape = (3, B, 0, 2, 80) if layered else (B, 0, 2, 80)
    check(make_case(shape, dtype, lens, paths, T=T, A=T), lens, paths, backend)


@pytest.mark.parametrize("per_row_tree", [False, True])
def test_per_row_trees_and_index_dtypes(per_row_tree, backend):
    B, T = 4, 30
    lens = [5, 0, 11, 2]
    trees = [random_tree(T) for _ in range(B)] if per_row_tree else [random_tree(T)] * B
    paths = [random_path(t) for t in trees]
    dtypes = ((torch.int32, torch.int64), (torch.int64, torch.int64), (torch.int32, torch.int32))
    for index_dtype, len_dtype in dtypes:
        case = make_case((2, B, 0, 1, 16), torch.float32, lens, paths, T=T, A=T,
                         index_dtype=index_dtype, len_dtype=len_dtype)
        check(case, lens, paths, backend)


def test_far_sources_overlap_destinations(backend):
    """Root's first children are leaves, the deep chain sits at the end: path node ids far above their
    destination slots, sources and destinations overlapping inside one row's step range."""
    T = 40
    parents = [-1] + [0] * 30 + [0] + list(range(31, 39))   # nodes 1..30 leaves, 31..39 a chain
    tree = Tree.from_parents(parents)
    deep = [0] + list(range(31, 40))
    paths = [deep, deep[:4], [0, 1], deep[:1]]
    lens = [3, 0, 9, 20]
    check(make_case((2, 4, 0, 3, 8), torch.bfloat16, lens, paths, T=T, A=T), lens, paths, backend)
    assert tree.retrieve_indices.tolist()[-1][:len(deep)] == deep


def test_chain_full_accept_is_identity(backend):
    """A Medusa chain accepted to the end moves every slot onto itself."""
    T, lens = 9, [4, 7]
    paths = [list(range(T))] * 2
    check(make_case((2, 2, 0, 2, 8), torch.float32, lens, paths, T=T), lens, paths, backend)


def test_any_index_list_gathers_before_scattering(backend):
    """Not only paths: indices below their destination (accepted[b, i] < i) read the OLD slot values."""
    lens = [2, 0, 5]
    paths = [[0, 3, 1, 2], [2, 0, 1, 0], [4, 4, 4]]
    check(make_case((3, 0, 2, 4), torch.float32, lens, paths, T=5), lens, paths, backend)


@pytest.mark.parametrize("pad", [-1, 10**6, -(10**6)])
def test_padding_entries_are_ignored(pad, backend):
    T, lens = 12, [1, 6, 0]
    tree = random_tree(T)
    paths = [random_path(tree) for _ in range(3)]
    check(make_case((2, 3, 0, 2, 8), torch.float32, lens, paths, T=T, A=T + 3, pad=pad), lens, paths, backend)


def test_cache_filled_to_the_end_and_strided_views(backend):
    """n + T == S exactly (no spare slot), and caches that are non-contiguous views."""
    T = 6
    tree = random_tree(T)
    lens = [10, 4]
    paths = [random_path(tree, length=T), random_path(tree)]
    case = make_case((2, 2, 0, 2, 8), torch.bfloat16, lens, paths, T=T, extra=0, strided=True)
    assert not case[0].is_contiguous() and case[0].shape[-3] == lens[0] + T
    check(case, lens, paths, backend)


def test_caches_with_different_layouts(backend):
    """k_cache contiguous, v_cache a strided view: the CUDA path moves them in two launches."""
    T, lens = 8, [3, 0, 12]
    tree = random_tree(T)
    paths = [random_path(tree) for _ in range(3)]
    plain = make_case((2, 3, 0, 2, 16), torch.float16, lens, paths, T=T)
    strided = make_case((2, 3, 0, 2, 16), torch.float16, lens, paths, T=T, strided=True)
    check((plain[0], strided[1], *plain[2:]), lens, paths, backend)


def _bad_inputs():
    L, B, S, H, D = 2, 2, 16, 2, 8
    kc = torch.randn(L, B, S, H, D)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    acc = torch.tensor([[0, 1, 2, -1], [0, 2, -1, -1]])
    alen = torch.tensor([3, 2], dtype=torch.int32)
    good = dict(k_cache=kc, v_cache=kc.clone(), cache_seqlens=lens, accepted=acc, accept_len=alen)
    return good, [
        ("k_cache", dict(k_cache=kc[0, 0], v_cache=kc[0, 0].clone())),
        ("k_cache", dict(k_cache=kc.int(), v_cache=kc.int())),
        ("v_cache", dict(v_cache=kc[:, :, :8])),
        ("v_cache", dict(v_cache=kc.half())),
        ("share memory", dict(v_cache=kc)),
        ("share memory", dict(v_cache=kc.view(kc.shape))),
        ("share memory", dict(k_cache=kc[:, :, :15], v_cache=kc[:, :, 1:])),  # slots one apart
        ("expanded", dict(k_cache=kc[:1].expand(L, B, S, H, D))),
        ("require grad", dict(k_cache=kc.clone().requires_grad_())),
        ("cache_seqlens", dict(cache_seqlens=lens.long())),
        ("cache_seqlens", dict(cache_seqlens=lens[:1])),
        ("cache_seqlens", dict(cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32))),
        ("accepted", dict(accepted=acc[0])),
        ("accepted", dict(accepted=acc[:1])),
        ("accepted", dict(accepted=acc[:, :0])),
        ("accepted", dict(accepted=acc.float())),
        ("accept_len", dict(accept_len=alen[:, None])),
        ("accept_len", dict(accept_len=alen.float())),
        ("accept_len", dict(accept_len=torch.tensor([0, 2], dtype=torch.int32))),
        ("accept_len", dict(accept_len=torch.tensor([3, 5], dtype=torch.int32))),
        ("indices", dict(accepted=torch.tensor([[0, -2, 1, 0], [0, 1, 0, 0]]))),
        ("S = 16", dict(accepted=torch.tensor([[0, 13, 1, 0], [0, 1, 0, 0]]))),
        ("S = 16", dict(cache_seqlens=torch.tensor([3, 15], dtype=torch.int32),
                        accepted=torch.zeros_like(acc))),
        ("device|meta", dict(accepted=acc.to("meta"))),
        ("device|meta", dict(cache_seqlens=lens.to("meta"))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs()[1])))
def test_bad_input_raises_value_error(case):
    good, bad = _bad_inputs()
    name, change = bad[case]
    args = {**good, **change}
    before = args["k_cache"].clone()
    with pytest.raises(ValueError, match=rf"compact_kv: .*({name})"):
        ht_kernels.compact_kv(*args.values(), backend="torch")
    if args["k_cache"].dtype.is_floating_point:
        assert torch.equal(args["k_cache"], before)      # nothing moved before the error


def test_interleaved_caches_do_not_share_memory():
    """K and V as the two halves of one [L, B, S, 2, H, D] buffer are accepted: no element is in both."""
    kv = torch.randn(2, 2, 16, 2, 2, 8)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    acc, alen = torch.tensor([[0, 2, 3], [0, 1, 2]]), torch.tensor([3, 2], dtype=torch.int32)
    want = [kv[:, :, :, i].clone() for i in range(2)]
    ht_kernels.compact_kv(*want, lens, acc, alen, backend="torch")
    ht_kernels.compact_kv(kv[:, :, :, 0], kv[:, :, :, 1], lens, acc, alen, backend="torch")
    assert torch.equal(kv[:, :, :, 0], want[0]) and torch.equal(kv[:, :, :, 1], want[1])


def test_backends():
    good, _ = _bad_inputs()
    for name in ("cuda", "triton"):
        with pytest.raises(ht_kernels.BackendUnavailableError, match=name):
            ht_kernels.compact_kv(*good.values(), backend=name)
    with pytest.raises(ValueError, match="backend"):
        ht_kernels.compact_kv(*good.values(), backend="flash")
    ht_kernels.compact_kv(*good.values(), backend="auto")


def test_opcheck(backend):
    tree = random_tree(10)
    lens = [4, 0, 9]
    paths = [random_path(tree) for _ in range(3)]
    for shape in ((2, 3, 0, 2, 8), (3, 0, 2, 8)):
        k, v, *rest = make_case(shape, torch.float32, lens, paths, T=10, A=10)
        k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
        torch.library.opcheck(torch.ops.ht_kernels.compact_kv.default, (k, v, *rest, backend))


def test_compile_fullgraph_matches_eager():
    tree = random_tree(12)
    lens = [4, 0, 9]
    paths = [random_path(tree) for _ in range(3)]
    case = make_case((2, 3, 0, 2, 8), torch.float32, lens, paths, T=12, A=12)

    def step(k_cache, v_cache, seqlens, accepted, accept_len):
        ht_kernels.compact_kv(k_cache, v_cache, seqlens, accepted, accept_len, backend="torch")
        seqlens += accept_len.to(seqlens.dtype)
        return k_cache.nan_to_num(0.0).sum((0, 2, 3))

    eager = [t.clone() for t in case]
    compiled = [t.clone() for t in case]
    want = step(*eager)
    got = torch.compile(step, fullgraph=True)(*compiled)
    torch.testing.assert_close(got, want)
    for a, b in zip(compiled, eager):
        assert torch.equal(bits(a) if a.is_floating_point() else a, bits(b) if b.is_floating_point() else b)


def test_torch_implementation_is_sync_free():
    """The torch path runs on fake tensors, where reading a value on the host (.item(), .tolist(),
    bool(tensor)) or a data-dependent shape (nonzero, boolean-mask indexing) raises."""
    tree = random_tree(9)
    paths = [random_path(tree) for _ in range(2)]
    for shape in ((2, 2, 0, 1, 4), (2, 0, 1, 4)):
        case = make_case(shape, torch.float32, [2, 5], paths, T=9, A=9)
        with FakeTensorMode() as mode:
            _compact_kv_torch(*(mode.from_tensor(t) for t in case))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_no_host_sync_on_cuda(backend):
    tree = random_tree(20)
    lens = [3, 40]
    paths = [random_path(tree) for _ in range(2)]
    case = make_case((2, 2, 0, 2, 64), torch.bfloat16, lens, paths, T=20, A=20)
    want = [t.clone() for t in case]
    compact_kv_ref(*want)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ht_kernels.compact_kv(*case, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(case[:2], want[:2]))
