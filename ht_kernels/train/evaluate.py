"""Measuring draft heads on greedy continuations: per-depth accuracy and the accepted length per step.

With greedy verification the decoding of a prompt is fixed (its greedy continuation), and the drafts
of a step are those of the last accepted token, which sees exactly the tokens before it (real nodes
never see pseudo nodes). So one teacher-forced pass over the continuation gives the drafts of every
token, and the decoding loop can be replayed from them: at root position c the drafts come from
anchor c - 1, the step's tree is chosen by the same TreePolicy, and verification accepts the longest
tree path equal to the continuation. `replay_accept_lengths` returns what `generate` reports (the
decoder's own pseudo chains under every node; numerics aside, e.g. bf16 near-ties), at the cost of
one forward pass per sequence.
"""
from __future__ import annotations

import math

import torch

from ..decode.trees import TreePolicy, chain_owners
from ..ops.verify_tree import verify_tree_greedy
from .data import Example
from .drafters import MedusaDrafter, TransferDrafter
from .objective import anchor_positions, frozen_pass, pseudo_hidden
from .trainer import collate


def drafter_from_weights(weights, chain: bool = True):
    """TransferWeights or MedusaWeights -> the matching drafter module with those (fp32) parameters."""
    K, D = weights.weight.shape[:2]
    drafter = TransferDrafter(K, D, weights.layer, chain) if hasattr(weights, "layer") else MedusaDrafter(K, D)
    with torch.no_grad():
        drafter.weight.copy_(weights.weight.float())
        drafter.bias.copy_(weights.bias.float())
    return drafter


@torch.no_grad()
def draft_logprobs(model, drafter, examples: list[Example], batch_size: int = 4):
    """Yields, for each example in turn, (draft log-probabilities [n, K, V] of anchors start..len-2,
    the token after each anchor [n]) - anchor n's depth-i draft predicts token n + i + 1."""
    layer = getattr(drafter, "layer", model.config.n_layers)
    for s in range(0, len(examples), batch_size):
        batch = examples[s:s + batch_size]
        tokens, lengths, starts = collate(batch, model.device)
        anchors = anchor_positions(lengths, starts, tokens.shape[1])                 # [B, A] from each start
        head_in = drafter(model, frozen_pass(model, tokens, layer, 1), anchors)      # [B, A, K, D]
        for b, e in enumerate(batch):
            n = len(e.tokens) - 1 - e.start
            yield model.output(head_in[b, :n]).float().log_softmax(-1), tokens[b, e.start + 1:len(e.tokens)]


def depth_accuracy(logp: torch.Tensor, greedy: torch.Tensor, top: int = 5) -> torch.Tensor:
    """logp: [n, K, V] drafts of anchors 0..n-1 of a sequence; greedy: [n] the token after each anchor.
    Returns (hits [2, K]: top-1 and top-`top` hits of depth i against token n + i + 1, counts [K])."""
    n, K, _ = logp.shape
    idx = logp.topk(top, dim=-1).indices                                      # [n, K, top]
    hits, counts = torch.zeros(2, K), torch.zeros(K)
    for i in range(1, K + 1):
        if n - i <= 0:
            continue
        target = greedy[i:]                                                   # token n + i + 1 = greedy[n + i]
        cand = idx[: n - i, i - 1]
        hits[0, i - 1] += (cand[:, 0] == target).sum()
        hits[1, i - 1] += (cand == target[:, None]).any(-1).sum()
        counts[i - 1] += n - i
    return hits, counts


def replay_accept_lengths(policy: TreePolicy, logp: torch.Tensor, greedy: torch.Tensor,
                          max_new_tokens: int, n_chains: int | None = None) -> list[int]:
    """The tokens each decoding step commits, replayed from teacher-forced drafts.

    logp: [n, K, V] drafts of anchors P-1 .. P+n-2 (P the prompt length: anchor 0 is the prompt's last
    token); greedy: [n] the greedy token after each of them (greedy[j] is new token j). n_chains: the
    decoder's setting (None: a pseudo chain under every node). Returns the accept lengths of the steps
    after the prefill, cut like `generate` cuts them at max_new_tokens (at most n new tokens are replayed).
    """
    return Replay(policy, logp, greedy).accept_lengths(max_new_tokens, n_chains)


class Replay:
    """The decoding of one greedy continuation under one tree policy, replayed for any n_chains.

    A step's drafts are those of anchor j - s shifted by s, for root j (new token j) and shift s: the
    levels between the last accepted node and the deepest chain owner on the accepted path (0 when the
    last node owns a chain, always so with chains under every node; `HiddenTransferDecoder._next_drafts`).
    The steps of every root for one shift are verified at once, once per shift; the walk is then cheap.
    """

    def __init__(self, policy: TreePolicy, logp: torch.Tensor, greedy: torch.Tensor):
        self.policy, self.logp, self.greedy = policy, logp, greedy
        self._steps: dict[int, tuple] = {}
        self._owner: dict[tuple[int, int | None], list[int]] = {}

    def accept_lengths(self, max_new_tokens: int, n_chains: int | None = None) -> list[int]:
        total = min(max_new_tokens, self.logp.shape[0])
        lengths, j, shift = [], 0, 0  # new token 0 came from the prefill; the step rooted at token j commits a
        while j + 1 < total:
            accept, owner = self._table(shift, n_chains)
            a = accept[j - shift]
            lengths.append(min(a, total - 1 - j))
            shift = a - 1 - owner[j - shift]
            j += a
        return lengths

    def _table(self, shift: int, n_chains: int | None) -> tuple[list[int], list[int]]:
        """Accept length and deepest owner depth on the accepted path, for roots shift .. n - 2."""
        n, K, V = self.logp.shape
        if shift not in self._steps:
            roots = torch.arange(shift, n - 1)
            src = self.logp[roots - shift]
            drafts = torch.cat([src[:, shift:], src.new_full((len(roots), shift, V), -math.log(V))], 1)
            tree = self.policy.choose(self.greedy[roots], drafts)
            # The target of a node at depth d under root j is new token j + d + 1 (on-path nodes matter).
            after = roots[:, None] + tree.depths + 1
            target = torch.where(after < n, self.greedy[after.clamp_max(n - 1)], -1)
            accepted, accept_len = verify_tree_greedy(tree.tokens, tree.parents, target)
            self._steps[shift] = tree, accepted, accept_len, accept_len.tolist()
        tree, accepted, accept_len, accept = self._steps[shift]
        if (shift, n_chains) not in self._owner:
            owned = torch.zeros_like(tree.tokens, dtype=torch.bool).scatter_(1, chain_owners(tree, n_chains), True)
            path = accepted.clamp_min(0)
            on_path = torch.arange(tree.size) < accept_len[:, None]
            depth = torch.where(owned.gather(1, path) & on_path, tree.depths.gather(1, path), -1).amax(1)
            self._owner[shift, n_chains] = depth.tolist()  # the root always owns a chain: >= 0
        return accept, self._owner[shift, n_chains]


@torch.no_grad()
def pseudo_similarity(model, drafter: TransferDrafter, examples: list[Example]) -> torch.Tensor:
    """Mean cosine similarity [L - t + 1, K] of pseudo state i of anchor n to the real hidden state of
    position n + i, after layer t (the transfer itself), t + 1, ..., L; anchors start..len-1-i."""
    L, t = model.config.n_layers, drafter.layer
    total, count = torch.zeros(L - t + 1, drafter.weight.shape[0]), torch.zeros(drafter.weight.shape[0])
    for e in examples:
        tokens = torch.tensor([e.tokens], device=model.device)
        N = tokens.shape[1]
        frozen = frozen_pass(model, tokens, t, 1)
        cache, real = model.new_cache(1, N), []
        h = model.embed(tokens)
        positions = torch.arange(N, device=model.device)[None]
        causal = torch.ones(N, N, dtype=torch.bool, device=model.device).tril()
        for l in range(L):
            h = model.run_layers(h, positions, cache, causal, range(l, l + 1))
            if l + 1 >= t:
                real.append(h[0].float())
        record = []
        pseudo_hidden(model, frozen, drafter.weight, drafter.bias, drafter.chain, record,
                      torch.arange(e.start, N, device=model.device)[None])
        for i in range(1, drafter.weight.shape[0] + 1):
            anchors = slice(0, N - i - e.start)
            for j, (p, r) in enumerate(zip(record, real)):
                sim = torch.nn.functional.cosine_similarity(p[0, anchors, i - 1].float(), r[e.start + i:N], dim=-1)
                total[j, i - 1] += sim.sum()
            count[i - 1] += max(0, N - i - e.start)
    return total / count.clamp_min(1)
