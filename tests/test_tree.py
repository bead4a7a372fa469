"""Tree structures: masks, depths, paths and pseudo chains against brute-force walks up the parents."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ht_kernels.tree import PseudoTree, Tree, pack_mask_bits, unpack_mask_bits

ODD_SIZES = [1, 31, 32, 33, 64, 65, 130]


@st.composite
def parent_arrays(draw, max_size=200):
    """Random topologically ordered parent arrays: chains, deep bushy trees and shallow wide ones."""
    T = draw(st.one_of(st.sampled_from([s for s in ODD_SIZES if s <= max_size]), st.integers(1, max_size)))
    reach = draw(st.sampled_from([1, 3, None]))  # parent among the last `reach` nodes (None: any)
    parents = [-1]
    for i in range(1, T):
        parents.append(draw(st.integers(0 if reach is None else max(0, i - reach), i - 1)))
    return parents


def ancestors(parents, i):
    """[i, parent(i), ..., 0] by walking up."""
    path = [i]
    while parents[path[-1]] != -1:
        path.append(parents[path[-1]])
    return path


@settings(max_examples=60, deadline=None)
@given(parent_arrays())
def test_masks_and_depths_match_walk(parents):
    tree = Tree.from_parents(parents)
    T = len(parents)
    expected = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        expected[i, ancestors(parents, i)] = True
    assert tree.size == T
    assert tree.parents.dtype == tree.depths.dtype == torch.int64
    assert tree.parents.tolist() == parents
    assert torch.equal(tree.ancestor_mask, expected)
    assert tree.ancestor_mask.diagonal().all()
    rows, parent_rows = tree.ancestor_mask[1:], tree.ancestor_mask[tree.parents[1:]]
    assert (rows | parent_rows).equal(rows)  # a node sees everything its parent sees
    assert tree.depths.tolist() == [len(ancestors(parents, i)) - 1 for i in range(T)]
    assert torch.equal(tree.position_offsets, tree.depths)
    assert tree.packed_mask.dtype == torch.int32 and tree.packed_mask.shape == (T, -(-T // 32))
    assert torch.equal(unpack_mask_bits(tree.packed_mask, T), tree.ancestor_mask)
    assert tree.children == [[c for c in range(T) if parents[c] == v] for v in range(T)]
    assert tree.ranks is None


@settings(max_examples=60, deadline=None)
@given(parent_arrays())
def test_retrieve_indices_are_root_to_leaf_paths(parents):
    tree = Tree.from_parents(parents)
    T = len(parents)
    leaves = [v for v in range(T) if v not in parents]
    assert tree.leaves.tolist() == leaves
    depth = max(len(ancestors(parents, i)) for i in range(T))
    expected = [ancestors(parents, leaf)[::-1] for leaf in leaves]
    expected = [path + [-1] * (depth - len(path)) for path in expected]
    assert tree.retrieve_indices.dtype == torch.int64
    assert tree.retrieve_indices.tolist() == expected
    assert set(tree.retrieve_indices.flatten().tolist()) - {-1} == set(range(T))


@settings(max_examples=40, deadline=None)
@given(
    batch=st.sampled_from([(), (1,), (3,), (2, 2)]),
    T=st.one_of(st.sampled_from(ODD_SIZES), st.integers(1, 100)),
    density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip_on_any_mask(batch, T, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(*batch, T, T, generator=gen) < density
    bits = pack_mask_bits(mask)
    W = -(-T // 32)
    assert bits.dtype == torch.int32 and bits.shape == (*batch, T, W)
    assert torch.equal(unpack_mask_bits(bits, T), mask)
    if T <= 65:  # every bit, decoded the way the Triton launcher does
        flat_bits, flat_mask = bits.reshape(-1, T, W).tolist(), mask.reshape(-1, T, T).tolist()
        for b in range(len(flat_mask)):
            for i in range(T):
                for j in range(T):
                    assert bool((flat_bits[b][i][j // 32] >> (j % 32)) & 1) == flat_mask[b][i][j], (b, i, j)


def test_pack_bit_31_and_padding():
    mask = torch.zeros(2, 40, 40, dtype=torch.bool)
    mask[0, :, 31] = True
    assert pack_mask_bits(mask)[0, :, 0].eq(-(2**31)).all()
    assert pack_mask_bits(torch.ones(33, 33, dtype=torch.bool)).tolist() == [[-1, 1]] * 33
    eye = pack_mask_bits(torch.eye(3, dtype=torch.bool))
    assert eye.tolist() == [[1], [2], [4]]


def test_pack_needs_no_data():
    """Shape-only (meta) tensors work, so the function has no data-dependent host syncs."""
    bits = pack_mask_bits(torch.empty(2, 70, 70, dtype=torch.bool, device="meta"))
    assert bits.shape == (2, 70, 3) and bits.dtype == torch.int32
    assert unpack_mask_bits(bits, 70).shape == (2, 70, 70)


@settings(max_examples=40, deadline=None)
@given(parents=parent_arrays(max_size=70), K=st.integers(1, 5), data=st.data())
def test_with_pseudo(parents, K, data):
    tree = Tree.from_parents(parents)
    T = len(parents)
    nodes = data.draw(st.one_of(st.none(), st.lists(st.integers(0, T - 1), unique=True, max_size=T)))
    ext = tree.with_pseudo(K, nodes)
    owners = list(range(T)) if nodes is None else nodes
    n = len(owners)
    assert isinstance(ext, PseudoTree) and ext.num_real == T and ext.K == K
    assert ext.owners.tolist() == owners
    assert ext.pseudo_ids.tolist() == [[T + c * K + i for i in range(K)] for c in range(n)]
    mask, pos = ext.tree.ancestor_mask, ext.tree.position_offsets
    assert ext.tree.size == T + n * K
    assert torch.equal(mask[:T, :T], tree.ancestor_mask)
    assert not mask[:T, T:].any()  # real nodes never see pseudo nodes
    assert torch.equal(pos[:T], tree.depths)
    for c, v in enumerate(owners):
        for i in range(1, K + 1):
            node = ext.pseudo_ids[c, i - 1]
            expected = torch.zeros(T + n * K, dtype=torch.bool)
            expected[ancestors(parents, v)] = True
            expected[ext.pseudo_ids[c, :i]] = True
            assert torch.equal(mask[node], expected), (v, i)
            assert pos[node] == tree.depths[v] + i


def test_with_pseudo_by_hand():
    ext = Tree.from_parents([-1, 0, 0]).with_pseudo(2, nodes=[2, 0])
    assert ext.tree.parents.tolist() == [-1, 0, 0, 2, 3, 0, 5]
    assert ext.pseudo_ids.tolist() == [[3, 4], [5, 6]]
    assert ext.tree.position_offsets.tolist() == [0, 1, 1, 2, 3, 1, 2]
    assert Tree.from_parents([-1, 0]).with_pseudo(3, nodes=[]).tree.size == 2


def test_from_paths_medusa_example():
    paths = [(0, 0, 0), (1,), (0, 1), (0,), (1, 0), (0, 0)]  # any order
    tree = Tree.from_paths(paths)
    # ids: 0 root, 1 (0,), 2 (1,), 3 (0,0), 4 (0,1), 5 (1,0), 6 (0,0,0)
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert tree.ranks.tolist() == [-1, 0, 1, 0, 1, 0, 0]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tree.leaves.tolist() == [4, 5, 6]
    assert tree.retrieve_indices.tolist() == [[0, 1, 4, -1], [0, 2, 5, -1], [0, 1, 3, 6]]
    assert tree.ancestor_mask.int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 0, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 0, 1],
    ]
    assert Tree.from_paths([]).size == 1


@pytest.mark.parametrize(
    "parents, match",
    [
        ([], "parents must be non-empty"),
        (torch.zeros(0, dtype=torch.int64), "parents must be non-empty"),
        ([0, 0], r"parents\[0\] must be -1"),
        ([-1, 1], r"parents\[1\] must be in \[0, 1\)"),
        ([-1, 0, 2], r"parents\[2\] must be in \[0, 2\)"),
        ([-1, 0, -1], r"parents\[2\] must be in \[0, 2\)"),
        ([[-1, 0]], r"parents must be 1-D, got shape \(1, 2\)"),
        (-1, r"parents must be 1-D, got shape \(\)"),
        ([-1.0, 0.0], "parents must hold ints, got dtype torch.float32"),
        ([-1, [0]], "parents must be a 1-D sequence of ints"),
    ],
)
def test_from_parents_rejects(parents, match):
    with pytest.raises(ValueError, match=match):
        Tree.from_parents(parents)


@pytest.mark.parametrize(
    "paths, match",
    [
        ([(0,), (0, 1, 0)], r"paths holds \(0, 1, 0\) but not its prefix \(0, 1\)"),
        ([(1, 0)], r"paths holds \(1, 0\) but not its prefix \(1,\)"),
        ([(0,), ()], r"paths\[1\] must be a non-empty tuple"),
        ([(0,), (-1,)], r"paths\[1\] must be a non-empty tuple of ranks >= 0"),
        ([(0.5,)], r"paths\[0\] must be a non-empty tuple"),
        ([(0,), (0,)], "paths must be distinct"),
    ],
)
def test_from_paths_rejects(paths, match):
    with pytest.raises(ValueError, match=match):
        Tree.from_paths(paths)


@pytest.mark.parametrize(
    "K, nodes, match",
    [
        (0, None, "K must be an int >= 1, got 0"),
        (1.5, None, "K must be an int >= 1, got 1.5"),
        (2, [0, 3], r"nodes must be real node ids in \[0, 3\)"),
        (2, [-1], r"nodes must be real node ids in \[0, 3\)"),
        (2, [1, 1], "nodes must be distinct"),
        (2, [[0, 1]], "nodes must be 1-D"),
        (2, [0.0], "nodes must hold ints"),
    ],
)
def test_with_pseudo_rejects(K, nodes, match):
    with pytest.raises(ValueError, match=match):
        Tree.from_parents([-1, 0, 0]).with_pseudo(K, nodes)


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(4, 4, dtype=torch.int32), r"mask must be a bool tensor .* got torch.int32"),
        (torch.ones(4, dtype=torch.bool), r"mask must be a bool tensor .* shape \(4,\)"),
        (torch.ones(2, 3, 4, dtype=torch.bool), r"mask must be square .* shape \(2, 3, 4\)"),
        ([[True]], "mask must be a bool tensor .* got list"),
    ],
)
def test_pack_rejects(mask, match):
    with pytest.raises(ValueError, match=match):
        pack_mask_bits(mask)


@pytest.mark.parametrize(
    "bits, T, match",
    [
        (torch.zeros(4, 1, dtype=torch.int64), 4, r"bits must be an int32 tensor \[\.\.\., 4, 1\]"),
        (torch.zeros(33, 1, dtype=torch.int32), 33, r"bits must be an int32 tensor \[\.\.\., 33, 2\]"),
        (torch.zeros(5, 1, dtype=torch.int32), 4, r"got torch.int32 tensor of shape \(5, 1\)"),
    ],
)
def test_unpack_rejects(bits, T, match):
    with pytest.raises(ValueError, match=match):
        unpack_mask_bits(bits, T)
