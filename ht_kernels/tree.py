"""Token trees of one decoding step: parents -> attention masks, depths, positions, accepted paths.

A step's tree has T nodes in topological order (node 0 is the root, every parent precedes its
children). Hidden transfer hangs a chain of K pseudo nodes under selected real nodes after layer t;
the result is again a tree (`Tree.with_pseudo`), whose ancestor mask is the attention mask of the
layers after t.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch


def pack_mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask into 32-bit words: bool [..., T, T] -> int32 [..., T, W], W = ceil(T / 32).

    Bit j % 32 of word j // 32 of row i is mask[..., i, j] (a word with bit 31 set is negative).
    Runs on mask's device without host syncs.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.ndim < 2:
        raise ValueError(f"pack_mask_bits: mask must be a bool tensor [..., T, T], got {_describe(mask)}")
    *batch, T, C = mask.shape
    if C != T:
        raise ValueError(
            f"pack_mask_bits: mask must be square in its last two dims, got shape {tuple(mask.shape)}"
        )
    W = -(-T // 32)
    padded = mask.new_zeros(*batch, T, W * 32)
    padded[..., :T] = mask
    shifts = torch.arange(32, device=mask.device)
    weights = torch.where(shifts == 31, -(2**31), 1 << shifts).to(torch.int32)  # bit 31 as -2^31
    # Distinct bits never carry, so the int32 sum is the bitwise OR.
    return (padded.view(*batch, T, W, 32).to(torch.int32) * weights).sum(-1, dtype=torch.int32)


def unpack_mask_bits(bits: torch.Tensor, T: int) -> torch.Tensor:
    """Inverse of pack_mask_bits: int32 [..., T, W] -> bool [..., T, T]."""
    W = -(-T // 32)
    if not (isinstance(bits, torch.Tensor) and bits.dtype == torch.int32 and bits.shape[-2:] == (T, W)):
        raise ValueError(
            f"unpack_mask_bits: bits must be an int32 tensor [..., {T}, {W}] for T={T}, got {_describe(bits)}"
        )
    shifts = torch.arange(32, dtype=torch.int32, device=bits.device)
    return ((bits[..., None] >> shifts) & 1).bool().flatten(-2)[..., :T]


@dataclass(frozen=True, eq=False)
class Tree:
    """A tree of T nodes in topological order; build it with `from_parents` or `from_paths`.

    parents: [T] int64, -1 for the root (node 0). depths: [T] int64, root 0.
    ancestor_mask: bool [T, T], [i, j] True iff j is i or an ancestor of i.
    ranks: [T] int64 top-k rank of each node among its depth's candidates (-1 for the root), set by
    `from_paths`, else None. All tensors live on the CPU.
    """

    parents: torch.Tensor
    depths: torch.Tensor
    ancestor_mask: torch.Tensor
    ranks: torch.Tensor | None = None

    @classmethod
    def from_parents(cls, parents) -> Tree:
        """parents: sequence or 1-D tensor of ints, parents[0] == -1, 0 <= parents[i] < i for i > 0."""
        parents = _index_vector(parents, "Tree.from_parents: parents")
        if parents.numel() == 0:
            raise ValueError("Tree.from_parents: parents must be non-empty (node 0 is the root), got none")
        p = parents.tolist()
        if p[0] != -1:
            raise ValueError(f"Tree.from_parents: parents[0] must be -1 (the root), got {p[0]}")
        depths = [0] * len(p)
        for i in range(1, len(p)):
            if not 0 <= p[i] < i:
                raise ValueError(
                    f"Tree.from_parents: parents[{i}] must be in [0, {i}) (a node before it), got {p[i]}"
                )
            depths[i] = depths[p[i]] + 1
        depths = torch.tensor(depths, dtype=torch.int64)
        T = len(p)
        mask = torch.zeros(T, T, dtype=torch.bool)
        mask[0, 0] = True
        for d in range(1, int(depths.max()) + 1):  # a node's row is its parent's row plus itself
            nodes = (depths == d).nonzero().squeeze(1)
            mask[nodes] = mask[parents[nodes]]
            mask[nodes, nodes] = True
        return cls(parents=parents, depths=depths, ancestor_mask=mask)

    @classmethod
    def from_paths(cls, paths) -> Tree:
        """Medusa-style tree: paths is a list of non-empty tuples of top-k ranks, e.g. [(0,), (1,), (0, 0)].

        Node 0 is the root (the empty path, implicit); the paths follow ordered by (depth, path). Every
        proper prefix of a path must be in paths. `ranks` holds each path's last rank (-1 for the root).
        """
        if not isinstance(paths, (list, tuple)) or not all(isinstance(path, (list, tuple)) for path in paths):
            raise ValueError(f"Tree.from_paths: paths must be a list of rank tuples, got {paths!r}")
        paths = [tuple(path) for path in paths]
        for n, path in enumerate(paths):
            if not path or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in path):
                raise ValueError(
                    f"Tree.from_paths: paths[{n}] must be a non-empty tuple of ranks >= 0, got {path}"
                )
        ordered = sorted(set(paths), key=lambda path: (len(path), path))
        if len(ordered) != len(paths):
            n_dup = len(paths) - len(ordered)
            raise ValueError(f"Tree.from_paths: paths must be distinct, got {n_dup} duplicates")
        node_of = {(): 0, **{path: n + 1 for n, path in enumerate(ordered)}}
        for path in ordered:
            if path[:-1] not in node_of:
                raise ValueError(f"Tree.from_paths: paths holds {path} but not its prefix {path[:-1]}")
        parents = [-1] + [node_of[path[:-1]] for path in ordered]
        ranks = torch.tensor([-1] + [path[-1] for path in ordered], dtype=torch.int64)
        return replace(cls.from_parents(parents), ranks=ranks)

    @property
    def size(self) -> int:
        return self.parents.numel()

    @property
    def position_offsets(self) -> torch.Tensor:
        """[T] int64: node i sits at position prefix_len + position_offsets[i] (its depth)."""
        return self.depths

    @cached_property
    def packed_mask(self) -> torch.Tensor:
        """int32 [T, ceil(T / 32)]: pack_mask_bits(ancestor_mask)."""
        return pack_mask_bits(self.ancestor_mask)

    @cached_property
    def children(self) -> list[list[int]]:
        """children[v]: the children of node v in increasing id order."""
        children = [[] for _ in range(self.size)]
        for i, p in enumerate(self.parents.tolist()[1:], start=1):
            children[p].append(i)
        return children

    @cached_property
    def leaves(self) -> torch.Tensor:
        """[n_leaves] int64: the nodes without children, in increasing order."""
        has_child = torch.zeros(self.size, dtype=torch.bool)
        has_child[self.parents[1:]] = True
        return (~has_child).nonzero().squeeze(1)

    @cached_property
    def retrieve_indices(self) -> torch.Tensor:
        """int64 [n_leaves, max_depth + 1]: row l is the root-to-leaf path of leaves[l], padded with -1."""
        out = torch.full((self.leaves.numel(), int(self.depths.max()) + 1), -1, dtype=torch.int64)
        row, node = self.ancestor_mask[self.leaves].nonzero(as_tuple=True)
        out[row, self.depths[node]] = node
        return out

    def with_pseudo(self, K: int, nodes=None) -> PseudoTree:
        """Hang a chain of K pseudo nodes under each of `nodes` (default: every real node).

        Pseudo i (1..K) of the n-th selected node v gets id T + n * K + (i - 1), parent v for i = 1
        and pseudo i - 1 otherwise, so it sits at depth(v) + i and sees v's ancestors, v and pseudo
        1..i of its own chain; real nodes keep their ids and never see pseudo nodes.
        """
        if not isinstance(K, int) or isinstance(K, bool) or K < 1:
            raise ValueError(f"Tree.with_pseudo: K must be an int >= 1, got {K!r}")
        T = self.size
        owners = torch.arange(T) if nodes is None else _index_vector(nodes, "Tree.with_pseudo: nodes")
        if owners.numel() and not (0 <= int(owners.min()) and int(owners.max()) < T):
            raise ValueError(
                f"Tree.with_pseudo: nodes must be real node ids in [0, {T}), got {owners.tolist()}"
            )
        if owners.unique().numel() != owners.numel():
            raise ValueError(f"Tree.with_pseudo: nodes must be distinct, got {owners.tolist()}")
        pseudo_ids = T + torch.arange(owners.numel() * K).view(-1, K)
        chain_parents = torch.cat([owners[:, None], pseudo_ids[:, :-1]], dim=1)
        tree = Tree.from_parents(torch.cat([self.parents, chain_parents.flatten()]))
        return PseudoTree(tree=tree, num_real=T, K=K, owners=owners, pseudo_ids=pseudo_ids)

    def __repr__(self) -> str:
        return f"Tree(size={self.size}, max_depth={int(self.depths.max())}, leaves={self.leaves.numel()})"


@dataclass(frozen=True, eq=False)
class PseudoTree:
    """A step's tree extended with pseudo chains (see `Tree.with_pseudo`).

    tree: the extended tree of num_real + n_sel * K nodes, real nodes first; its ancestor_mask is the
    attention mask and its position_offsets the positions of the layers after t.
    owners: [n_sel] int64, the real node of each chain; pseudo_ids: [n_sel, K] int64, the node id of
    pseudo i (column i - 1) of each chain.
    """

    tree: Tree
    num_real: int
    K: int
    owners: torch.Tensor = field(repr=False)
    pseudo_ids: torch.Tensor = field(repr=False)


def _index_vector(values, name: str) -> torch.Tensor:
    """values (sequence or tensor of ints) -> 1-D int64 CPU tensor; ValueError naming `name` otherwise."""
    try:
        t = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a 1-D sequence of ints, got {values!r}") from e
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise ValueError(f"{name} must hold ints, got dtype {t.dtype}")
    return t.to("cpu", torch.int64)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
