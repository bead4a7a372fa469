"""verify_tree_greedy: exact against the reference and path invariants on random and hand-made trees,
hypothesis cases, errors, registration (opcheck, torch.compile), no host sync."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import ht_kernels
from helpers import CUDA_BACKEND, DEVICE
from ht_kernels.ops.verify_tree import _verify_tree_greedy_torch
from ht_kernels.reference.verify_tree import verify_tree_greedy_ref


@pytest.fixture(params=["torch"] + CUDA_BACKEND)
def backend(request) -> str:
    return request.param


def random_parents(T: int) -> torch.Tensor:
    return torch.tensor([-1] + [int(torch.randint(0, i, ())) for i in range(1, T)])


def make_case(B: int, T: int, vocab: int, per_row: bool):
    """Random trees and tokens from a tiny vocab, so matches and matching duplicate siblings are common."""
    parents = torch.stack([random_parents(T) for _ in range(B)]) if per_row else random_parents(T)
    draft = torch.randint(0, vocab, (B, T))
    target = torch.randint(0, vocab, (B, T))
    return draft.to(DEVICE), parents.to(DEVICE), target.to(DEVICE)


def check_path_invariants(draft, parents, target, accepted, accept_len):
    """Independent of the reference: a matched root path, -1 padding, and no matching child at its end."""
    B, T = draft.shape
    par = parents.expand(B, T).cpu()
    draft, target, accepted, accept_len = draft.cpu(), target.cpu(), accepted.cpu(), accept_len.cpu()
    for b in range(B):
        n = int(accept_len[b])
        path = accepted[b, :n].tolist()
        assert 1 <= n <= T and path[0] == 0 and (accepted[b, n:] == -1).all()
        for u, c in zip(path, path[1:]):
            assert int(par[b, c]) == u and int(draft[b, c]) == int(target[b, u])
            siblings = [s for s in range(1, c) if int(par[b, s]) == u]
            assert all(int(draft[b, s]) != int(target[b, u]) for s in siblings), "not the lowest match"
        last = path[-1]
        children = [c for c in range(1, T) if int(par[b, c]) == last]
        assert all(int(draft[b, c]) != int(target[b, last]) for c in children), "a child still matches"


def check(draft, parents, target, **kw):
    accepted, accept_len = ht_kernels.verify_tree_greedy(draft, parents, target, **kw)
    ref_acc, ref_len = verify_tree_greedy_ref(draft.cpu(), parents.cpu(), target.cpu())
    assert accepted.dtype == accept_len.dtype == torch.int64
    assert accepted.shape == draft.shape and accept_len.shape == draft.shape[:1]
    assert torch.equal(accept_len.cpu(), ref_len), f"accept_len {accept_len.tolist()} != {ref_len.tolist()}"
    assert torch.equal(accepted.cpu(), ref_acc)
    check_path_invariants(draft, parents, target, accepted, accept_len)
    return accepted, accept_len


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("T", [1, 2, 7, 63, 65, 130, 300])
def test_random_trees_match_reference(T, per_row, backend):
    lengths = []
    for vocab in (2, 3, 50):
        _, accept_len = check(*make_case(6, T, vocab, per_row), backend=backend)
        lengths += accept_len.tolist()
    if T >= 63:
        assert max(lengths) >= 3  # deep accepted paths did occur


def test_shallow_wide_tree_with_duplicate_siblings(backend):
    """Star trees (every node a child of the root) with vocab 2: many siblings match at once."""
    T, B = 40, 8
    parents = torch.tensor([-1] + [0] * (T - 1), device=DEVICE)
    draft = torch.randint(0, 2, (B, T), device=DEVICE)
    target = torch.randint(0, 2, (B, T), device=DEVICE)
    accepted, accept_len = check(draft, parents, target, backend=backend)
    assert (accept_len <= 2).all()


def test_lowest_matching_sibling_wins_even_if_a_later_one_goes_deeper(backend):
    #   0 -> 1 (x), 2 (x); 2 -> 3 (y); target[0] = x, target[2] = y: greedy takes 1 and stops there.
    parents = torch.tensor([-1, 0, 0, 2], device=DEVICE)
    draft = torch.tensor([[9, 5, 5, 7]], device=DEVICE)
    target = torch.tensor([[5, 1, 7, 0]], device=DEVICE)
    accepted, accept_len = check(draft, parents, target, backend=backend)
    assert accepted.tolist() == [[0, 1, -1, -1]] and accept_len.tolist() == [2]
    bonus = target.gather(1, accepted.gather(1, accept_len[:, None] - 1)).squeeze(1)  # docstring recipe
    assert bonus.tolist() == [1]


def test_chain_that_matches_everywhere_accepts_all(backend):
    """A Medusa depth path whose every draft is the target's argmax: accept_len = T, bonus = last target."""
    B, T = 3, 9
    parents = torch.arange(-1, T - 1, device=DEVICE)
    draft = torch.randint(0, 1000, (B, T), device=DEVICE)
    target = torch.cat([draft[:, 1:], torch.randint(0, 1000, (B, 1), device=DEVICE)], 1)
    target[2, 4] = draft[2, 5] + 1                                    # row 2 stops after node 4
    accepted, accept_len = check(draft, parents, target, backend=backend)
    assert accept_len.tolist() == [T, T, 5]
    assert accepted[0].tolist() == list(range(T))


@pytest.mark.parametrize("T", [2, 3, 4, 5, 8, 9, 16, 17, 64, 65, 130])
def test_chain_rejected_at_every_depth(T, backend):
    """Row r of a chain rejects node r + 1 only; every deeper node still matches its parent, so only the
    test of all ancestors (the full pointer-jumping depth) stops the path at accept_len = r + 1."""
    B = T - 1
    parents = torch.arange(-1, T - 1, device=DEVICE)
    draft = torch.randint(0, 1000, (B, T), device=DEVICE)
    target = torch.cat([draft[:, 1:], torch.randint(0, 1000, (B, 1), device=DEVICE)], 1)
    rows = torch.arange(B, device=DEVICE)
    target[rows, rows] = draft[rows, rows + 1] + 1
    accepted, accept_len = check(draft, parents, target, backend=backend)
    assert accept_len.tolist() == list(range(1, T))


def test_single_node_tree(backend):
    draft = torch.tensor([[4], [2]], device=DEVICE)
    parents = torch.tensor([-1], device=DEVICE)
    accepted, accept_len = check(draft, parents, draft.clone(), backend=backend)
    assert accepted.tolist() == [[0], [0]] and accept_len.tolist() == [1, 1]


@st.composite
def cases(draw):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 24))
    vocab = draw(st.integers(1, 3))
    per_row = draw(st.booleans())
    rows = B if per_row else 1
    parents = [[-1] + [draw(st.integers(0, i - 1)) for i in range(1, T)] for _ in range(rows)]
    tokens = st.lists(st.lists(st.integers(0, vocab - 1), min_size=T, max_size=T), min_size=B, max_size=B)
    parents = torch.tensor(parents, device=DEVICE)
    return (torch.tensor(draw(tokens), device=DEVICE), parents if per_row else parents[0],
            torch.tensor(draw(tokens), device=DEVICE))


@settings(max_examples=150, deadline=None)
@given(cases())
def test_hypothesis_matches_reference(case):
    for backend in ["torch"] + (["cuda"] if DEVICE.type == "cuda" else []):
        check(*case, backend=backend)


def _bad_inputs():
    B, T = 2, 5
    draft = torch.zeros(B, T, dtype=torch.int64)
    parents = torch.tensor([-1, 0, 0, 1, 2])
    good = dict(draft_tokens=draft, parents=parents, target_tokens=draft.clone())
    return good, [
        ("draft_tokens", dict(draft_tokens=draft[0])),
        ("draft_tokens", dict(draft_tokens=draft[:, :0], target_tokens=draft[:, :0], parents=parents[:0])),
        ("draft_tokens", dict(draft_tokens=draft.int())),
        ("target_tokens", dict(target_tokens=draft[:, :4])),
        ("target_tokens", dict(target_tokens=draft.int())),
        ("parents", dict(parents=parents[:4])),
        ("parents", dict(parents=parents.expand(3, T))),
        ("parents", dict(parents=parents.int())),
        (r"parents\[0\] must be -1", dict(parents=torch.tensor([0, 0, 0, 1, 2]))),
        (r"parents\[3\] must be in \[0, 3\)", dict(parents=torch.tensor([-1, 0, 0, 3, 2]))),
        (r"parents\[1, 2\] must be in \[0, 2\)",
         dict(parents=torch.tensor([[-1, 0, 0, 1, 2], [-1, 0, -1, 1, 2]]))),
        ("device|meta", dict(target_tokens=draft.to("meta"))),
        ("device|meta", dict(parents=parents.to("meta"))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs()[1])))
def test_bad_input_raises_value_error(case):
    good, bad = _bad_inputs()
    name, change = bad[case]
    with pytest.raises(ValueError, match=rf"verify_tree_greedy: .*{name}"):
        ht_kernels.verify_tree_greedy(*{**good, **change}.values(), backend="torch")


def test_backends():
    good, _ = _bad_inputs()
    for name in ("cuda", "triton"):
        with pytest.raises(ht_kernels.BackendUnavailableError, match=name):
            ht_kernels.verify_tree_greedy(*good.values(), backend=name)
    with pytest.raises(ValueError, match="backend"):
        ht_kernels.verify_tree_greedy(*good.values(), backend="flash")
    assert ht_kernels.verify_tree_greedy(*good.values())[1].tolist() == [3, 3]  # 0 -> 1 -> 3


@pytest.mark.parametrize("per_row", [False, True])
def test_opcheck(per_row, backend):
    for T in (1, 17):
        case = make_case(3, T, 2, per_row)
        torch.library.opcheck(torch.ops.ht_kernels.verify_tree_greedy.default, (*case, backend))


def test_compile_fullgraph_matches_eager():
    draft, parents, target = make_case(4, 33, 2, True)

    def step(draft, parents, target):
        accepted, accept_len = ht_kernels.verify_tree_greedy(draft, parents, target, backend="torch")
        bonus = target.gather(1, accepted.gather(1, accept_len[:, None] - 1)).squeeze(1)
        return accepted, accept_len, bonus

    compiled = torch.compile(step, fullgraph=True)
    for got, want in zip(compiled(draft, parents, target), step(draft, parents, target)):
        assert torch.equal(got, want)


def test_torch_implementation_is_sync_free():
    """The torch path runs on fake tensors, where reading a value on the host (.item(), .tolist(),
    bool(tensor)) or a data-dependent shape (nonzero, boolean-mask indexing) raises."""
    for per_row in (False, True):
        case = make_case(3, 20, 2, per_row)
        with FakeTensorMode() as mode:
            accepted, accept_len = _verify_tree_greedy_torch(*(mode.from_tensor(t) for t in case))
        assert accepted.shape == (3, 20) and accept_len.shape == (3,)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_no_host_sync_on_cuda(backend):
    case = make_case(8, 130, 2, True)
    want = verify_tree_greedy_ref(*(t.cpu() for t in case))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = ht_kernels.verify_tree_greedy(*case, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
