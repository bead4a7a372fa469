"""Draft trees of a decoding step, chosen over the top-k drafts of each depth, and their masks.

The drafts of a step are K distributions, one per depth below the root (pseudo i of the last accepted
node predicts depth i). A candidate is a path of top-k ranks (r_1, ..., r_d): its node carries token
topk(draft_d)[r_d] and its score is the path's summed draft log-probability. A static policy keeps a
fixed list of paths (Medusa style); a dynamic one keeps the best-scoring candidates under a node budget
(EAGLE-2 style), per batch row. With a calibration (a_d, b_d) per depth, an edge of depth d scores
log sigmoid(a_d logp + b_d) instead of logp: the probability, fitted on held-back data
(`train.calibrate`), that the draft is the token the model picks once its parent was, so that depths
whose drafts are over- or underconfident weigh what they are worth. Everything here is batched tensor work without host synchronisation.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import count

# Medusa-style default for K = 3: 16 nodes with the root, wide at depth 1, narrowing with depth.
DEFAULT_PATHS = [(0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (3, 0),
                 (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]
_MIN_LOGPROB = -1e4  # keeps scores finite so that a path always scores below its prefix


@dataclass
class StepTree:
    """The real nodes of one step for B rows: node 0 is the root, parents precede children.

    tokens: [B, T] int64 (column 0: the root); parents: [B, T] int64 (-1 for the root); depths: [B, T];
    scores: [B, T] fp32 summed draft log-probability of each node's path (0 for the root).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    scores: torch.Tensor

    @property
    def size(self) -> int:
        return self.tokens.shape[1]


class TreePolicy:
    """Chooses each step's tree from the drafts.

    K: the number of draft depths. paths: a static tree as a list of rank tuples (every prefix
    present, depth <= K), or None for a dynamic tree of `budget` nodes (root included) chosen by score
    among the paths whose rank at every depth is below `width`. calibration: None, or [>= K, 2] (a_d > 0,
    b_d) per depth (only the first K rows are used): the edge scores log sigmoid(a_d logp + b_d).
    """

    def __init__(self, K: int, paths: list[tuple[int, ...]] | None = None, budget: int = 16, width: int = 8,
                 calibration: torch.Tensor | None = None):
        K, budget, width = count("TreePolicy: K", K, 1), count("TreePolicy: budget", budget, 1), \
            count("TreePolicy: width", width, 1)
        if paths is not None:
            ok = isinstance(paths, (list, tuple)) and all(
                isinstance(p, (list, tuple)) and all(isinstance(r, int) and not isinstance(r, bool) for r in p)
                for p in paths)
            paths = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p)) if ok else paths
            if not ok or not paths or any(len(p) == 0 or len(p) > K or min(p) < 0 for p in paths):
                raise ValueError(f"TreePolicy: paths must be non-empty rank tuples of depth 1..K={K}, got {paths}")
            missing = [p for p in paths if len(p) > 1 and p[:-1] not in set(paths)]
            if missing:
                raise ValueError(f"TreePolicy: paths lack the prefixes of {missing}")
            widths = [1 + max((p[d] for p in paths if len(p) > d), default=0) for d in range(K)]
        else:
            widths = [width] * K
        if calibration is not None:
            try:
                calibration = torch.as_tensor(calibration, dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"TreePolicy: calibration must be a [>= K={K}, 2] tensor, got "
                                 f"{calibration!r}") from None
            if calibration.dim() != 2 or calibration.shape[0] < K or calibration.shape[1] != 2 \
                    or not bool((calibration[:K, 0] > 0).all()) or not bool(calibration[:K].isfinite().all()):
                raise ValueError(f"TreePolicy: calibration must be [>= K={K}, 2] finite (a, b) with a > 0, got "
                                 f"{calibration.tolist() if calibration.numel() < 32 else list(calibration.shape)}")
            calibration = calibration[:K]
        self.calibration = calibration
        self.K, self.budget, self.static = K, (len(paths) + 1 if paths else budget), paths is not None
        # Candidates: every path with rank < widths[d] at depth d + 1, breadth first (parents first).
        cands = [p for d in range(1, K + 1) for p in itertools.product(*(range(w) for w in widths[:d]))]
        index = {p: i for i, p in enumerate(cands)}
        self.width = max(widths)
        self.cand_depth = torch.tensor([len(p) for p in cands])
        self.cand_rank = torch.tensor([p[-1] for p in cands])
        self.cand_parent = torch.tensor([index.get(p[:-1], -1) for p in cands])
        self.chosen = torch.tensor([index[p] for p in paths]) if paths else None
        self.size = len(paths) + 1 if paths else min(budget, 1 + len(cands))  # nodes of every tree it chooses
        self._tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _on(self, dev: torch.device) -> tuple[torch.Tensor, ...]:
        """The candidate tables on `dev`, copied once: a step (or its CUDA graph) copies nothing from the host."""
        if dev not in self._tables:
            tables = (self.cand_depth, self.cand_rank, self.cand_parent, self.chosen, self.calibration)
            self._tables[dev] = tuple(None if t is None else t.to(dev) for t in tables)
        return self._tables[dev]

    def choose(self, root: torch.Tensor, draft_logprobs: torch.Tensor) -> StepTree:
        """root: [B] int64; draft_logprobs: [B, K, V] log-probabilities of depths 1..K -> StepTree."""
        B, dev = root.shape[0], root.device
        if root.dim() != 1 or draft_logprobs.dim() != 3 or tuple(draft_logprobs.shape[:2]) != (B, self.K):
            raise ValueError(f"TreePolicy.choose: root must be [B] and draft_logprobs [B, K={self.K}, V], got "
                             f"{list(root.shape)} and {list(draft_logprobs.shape)}")
        logp = draft_logprobs.float().clamp_min(_MIN_LOGPROB)
        if logp.shape[-1] < self.width:  # fewer tokens than ranks: the missing ranks score lowest
            logp = torch.cat([logp, logp.new_full((B, self.K, self.width - logp.shape[-1]), 2 * _MIN_LOGPROB)], -1)
        vals, idx = logp.topk(self.width, dim=-1)                          # [B, K, W]
        idx = idx.clamp_max(draft_logprobs.shape[-1] - 1)
        depth, rank, parent, chosen, calibration = self._on(dev)
        if calibration is not None:  # monotone per depth (a > 0): the ranks stay, the depths reweigh
            vals = F.logsigmoid(calibration[:, 0, None] * vals + calibration[:, 1, None])
        step = vals[:, depth - 1, rank]                                   # [B, C] log-prob of each edge
        score = step.clone()
        for _ in range(self.K - 1):  # add the ancestors' edges: paths are at most K deep
            score = step + torch.where(parent >= 0, score[:, parent.clamp_min(0)], 0.0)
        if self.static:
            chosen = chosen.expand(B, -1)
        else:  # best candidates; a path scores strictly below its prefix, so the choice is prefix-closed
            chosen = (score - 1e-3 * depth).topk(self.size - 1, dim=-1).indices.sort(dim=-1).values
        node_of = torch.zeros(B, depth.numel(), dtype=torch.long, device=dev)  # candidate -> node id
        node_of.scatter_(1, chosen, torch.arange(1, chosen.shape[1] + 1, device=dev).expand(B, -1))
        cand_parent = parent[chosen]
        parents = torch.where(cand_parent >= 0, node_of.gather(1, cand_parent.clamp_min(0)), 0)
        tokens = idx[:, depth - 1, rank].gather(1, chosen)
        zero = torch.zeros(B, 1, dtype=torch.long, device=dev)
        return StepTree(torch.cat([root[:, None], tokens], 1), torch.cat([zero - 1, parents], 1),
                        torch.cat([zero, depth[chosen]], 1), torch.cat([zero.float(), score.gather(1, chosen)], 1))


def ancestor_masks(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """parents: [B, T] (-1 for the root) of trees at most max_depth deep -> bool [B, T, T] ancestor masks
    (mask[b, i, j] iff j is i or an ancestor of i)."""
    B, T = parents.shape
    node = torch.arange(T, device=parents.device).expand(B, T)
    mask = torch.zeros(B, T, T + 1, dtype=torch.bool, device=parents.device)  # column T: "no node"
    for _ in range(max_depth + 1):
        mask.scatter_(2, torch.where(node >= 0, node, T)[..., None], True)
        node = torch.where(node >= 0, parents.gather(1, node.clamp_min(0)), -1)
    return mask[..., :T]


def chain_owners(tree: StepTree, n_chains: int | None = None) -> torch.Tensor:
    """[B, n] the nodes that get pseudo chains, ascending: all T nodes (n_chains None), or the n_chains
    best-scoring ones with the root always among them (shallower first among equal scores)."""
    B, T = tree.tokens.shape
    dev = tree.tokens.device
    if n_chains is None or n_chains >= T:
        return torch.arange(T, device=dev).expand(B, T)
    key = tree.scores - 1e-3 * tree.depths
    key[:, 0].fill_(float("inf"))
    return key.topk(n_chains, dim=1).indices.sort(dim=1).values


@dataclass
class StepLayout:
    """The tokens of one hidden-transfer step: T real nodes, then a chain of K pseudo nodes under each of
    the n owners (pseudo i of owner s at index T + s * K + i - 1).

    real_mask: bool [B, T, T] (layers up to t); mask: bool [B, N, N] with N = T + n * K (layers after t;
    real nodes never see pseudo nodes); offsets: [B, N] position of each token after the prefix;
    owners: [B, n] real node of each chain.
    """

    real_mask: torch.Tensor
    mask: torch.Tensor
    offsets: torch.Tensor
    owners: torch.Tensor


def step_layout(tree: StepTree, K: int, n_chains: int | None = None, max_depth: int | None = None) -> StepLayout:
    """Masks and positions of a step; chains hang under the n_chains best-scoring nodes (default: all),
    the root always among them (shallower first among equal scores). max_depth: the tree's depth at most
    (default K)."""
    B, T = tree.tokens.shape
    dev = tree.tokens.device
    owners = chain_owners(tree, n_chains)
    n = owners.shape[1]
    real = ancestor_masks(tree.parents, K if max_depth is None else max_depth)
    chain = torch.ones(K, K, dtype=torch.bool, device=dev).tril()
    pseudo_real = real.gather(1, owners[..., None].expand(B, n, T)).repeat_interleave(K, dim=1)
    pseudo_pseudo = torch.block_diag(*[chain] * n).expand(B, n * K, n * K) if n else \
        torch.zeros(B, 0, 0, dtype=torch.bool, device=dev)
    top = torch.cat([real, real.new_zeros(B, T, n * K)], dim=2)
    mask = torch.cat([top, torch.cat([pseudo_real, pseudo_pseudo], dim=2)], dim=1)
    chain_offsets = (tree.depths.gather(1, owners)[..., None] + torch.arange(1, K + 1, device=dev)).flatten(1)
    return StepLayout(real, mask, torch.cat([tree.depths, chain_offsets], dim=1), owners)
