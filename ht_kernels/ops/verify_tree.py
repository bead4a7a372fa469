"""`ht_kernels.verify_tree_greedy`: the greedily accepted path of a token tree (public op)."""
from __future__ import annotations

import torch

from ._backend import device_guard, resolve_backend, shape_of

BACKENDS = ("cuda", "torch")


def verify_tree_greedy(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    target_tokens: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The longest greedily accepted root-to-node path of each row's token tree.

    draft_tokens: [B, T] int64, the token of each node (node 0 is the root, already certain).
    parents: [T] (shared) or [B, T] (per row) int64, parents[..., 0] = -1, 0 <= parents[..., i] < i.
    target_tokens: [B, T] int64, the target model's argmax after each node.
    Walk from the root: from node u, a child c is accepted iff draft_tokens[b, c] == target_tokens[b, u]
    (the lowest-index one when several children match); the walk stops at a node with no accepted child.
    Returns accepted [B, T] int64, the path's node indices in order (accepted[b, 0] = 0), padded with
    -1, and accept_len [B] int64 (>= 1). The next root (bonus token) of row b is
    target_tokens[b, accepted[b, accept_len[b] - 1]], e.g.
    `target_tokens.gather(1, accepted.gather(1, accept_len[:, None] - 1)).squeeze(1)`.
    backend: "auto" (torch) | "cuda" (CUDA tensors) | "torch"; "triton" raises BackendUnavailableError.

    Runs without host syncs. The values of parents are checked only for CPU tensors; on a GPU a
    parents tensor that is not a topologically ordered tree gives undefined results.
    """
    _check_inputs(draft_tokens, parents, target_tokens)
    name = resolve_backend("verify_tree_greedy", backend, draft_tokens.device, available=BACKENDS)
    # Eager calls run the op's body directly (the custom-op dispatch costs tens of microseconds a call);
    # torch.compile sees the registered op.
    op = torch.ops.ht_kernels.verify_tree_greedy if torch.compiler.is_compiling() else _verify_tree_greedy_impl
    return op(draft_tokens, parents, target_tokens, name)


def _check_inputs(draft_tokens, parents, target_tokens) -> None:
    def fail(msg: str):
        raise ValueError(f"verify_tree_greedy: {msg}")

    if not isinstance(draft_tokens, torch.Tensor) or draft_tokens.dim() != 2 or draft_tokens.shape[1] == 0:
        fail(f"draft_tokens must be [B, T] with T >= 1, got {shape_of(draft_tokens)}")
    B, T = draft_tokens.shape
    if not isinstance(target_tokens, torch.Tensor) or target_tokens.shape != draft_tokens.shape:
        fail(f"target_tokens must be [B, T] = {[B, T]} like draft_tokens, got {shape_of(target_tokens)}")
    if not isinstance(parents, torch.Tensor) or tuple(parents.shape) not in ((T,), (B, T)):
        fail(f"parents must be [T] or [B, T] with B={B}, T={T} from draft_tokens, got {shape_of(parents)}")
    tensors = {"draft_tokens": draft_tokens, "parents": parents, "target_tokens": target_tokens}
    for name, t in tensors.items():
        if t.dtype != torch.int64:
            fail(f"{name} must be int64, got {t.dtype}")
        if t.device != draft_tokens.device:
            fail(f"{name} is on {t.device} but draft_tokens is on {draft_tokens.device}")


def _check_parents(parents: torch.Tensor) -> None:
    """parents[..., 0] == -1 and 0 <= parents[..., i] < i (reads the tensor on the host: CPU only)."""
    T = parents.shape[-1]
    for r, row in enumerate(parents.reshape(-1, T).tolist()):
        bad = [i for i, p in enumerate(row) if (p != -1 if i == 0 else not 0 <= p < i)]
        if bad:
            i = bad[0]
            where = f"parents[{r}, {i}]" if parents.dim() == 2 else f"parents[{i}]"
            want = "-1" if i == 0 else f"in [0, {i})"
            raise ValueError(f"verify_tree_greedy: {where} must be {want} (a topologically ordered tree), "
                             f"got {row[i]}")


def _verify_tree_greedy_torch(draft_tokens, parents, target_tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Sync-free formulation: per-node tests, then pointer jumping up the tree.

    chosen[c]: c is the lowest-index child of its parent u with draft[c] == target[u] (the root is
    chosen). A node is on the accepted path iff it and all its ancestors are chosen; ceil(log2 T)
    rounds of pointer jumping (ok &= ok[anc]; anc = anc[anc], the root its own ancestor) AND that over
    every ancestor. The path's nodes have increasing indices (parents precede children), so a node's
    place in the path is the count of path nodes before it.
    """
    B, T = draft_tokens.shape
    idx = torch.arange(T, device=draft_tokens.device).expand(B, T)
    parent = parents.expand(B, T).clamp(min=0)                               # the root points at itself
    matched = draft_tokens == target_tokens.gather(1, parent)               # [B, T]
    first = torch.full_like(idx, T)                                         # lowest matched child per node
    first.scatter_reduce_(1, parent[:, 1:], torch.where(matched[:, 1:], idx[:, 1:], T), reduce="amin")
    ok = (first.gather(1, parent) == idx) | (idx == 0)                      # chosen
    anc = parent
    for _ in range((T - 1).bit_length()):                                   # 2**rounds >= T > depth
        ok = ok & ok.gather(1, anc)
        anc = anc.gather(1, anc)
    accept_len = ok.sum(1)
    place = torch.where(ok, ok.cumsum(1) - 1, T)                            # off-path nodes -> column T
    accepted = torch.full((B, T + 1), -1, dtype=torch.int64, device=draft_tokens.device)
    accepted.scatter_(1, place, torch.where(ok, idx, -1))                   # column T only ever gets -1
    return accepted[:, :T].contiguous(), accept_len


def _verify_tree_greedy_impl(
    draft_tokens: torch.Tensor, parents: torch.Tensor, target_tokens: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if parents.device.type == "cpu":
        _check_parents(parents)
    if backend == "cuda":
        from ..cuda.verify_tree import verify_tree_greedy_fwd

        with device_guard(draft_tokens.device):
            return verify_tree_greedy_fwd(draft_tokens, parents, target_tokens)
    return _verify_tree_greedy_torch(draft_tokens, parents, target_tokens)


_verify_tree_greedy_op = torch.library.custom_op("ht_kernels::verify_tree_greedy", _verify_tree_greedy_impl,
                                                 mutates_args=())


@_verify_tree_greedy_op.register_fake
def _(draft_tokens, parents, target_tokens, backend):
    B, T = draft_tokens.shape
    return draft_tokens.new_empty(B, T), draft_tokens.new_empty(B)
