"""Greedy decoding replayed from teacher-forced drafts: the accepted length per step without decoding.

With greedy verification the decoding of a prompt is fixed (its greedy continuation, `answers`), and the
drafts of a step are those of the last accepted token, which sees exactly the tokens before it (real
nodes never see pseudo nodes). So one teacher-forced pass over the continuation gives the drafts of every
token (`drafts.forced.draft_logprobs`), and the decoding loop can be replayed from them: at root position
c the drafts come from anchor c - 1, the step's tree is chosen by the same TreePolicy, and verification
accepts the longest tree path equal to the continuation. `replay_accept_lengths` returns what `generate`
reports (the decoder's own pseudo chains under every node; numerics aside, e.g. bf16 near-ties), at the
cost of one forward pass per sequence. Tree auto measures tau with it; training reports it.
"""
from __future__ import annotations

import math

import torch

from ..drafts.examples import Example
from ..ops.verify_tree import verify_tree_greedy
from .lookup import extend_tree, lookup_drafts, with_lookup
from .trees import TreePolicy, chain_owners


def answers(decoder, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32,
            temperature: float = 0.0, seed: int = 0, eos_token_id=None, progress=None) -> list[Example]:
    """`decoder`'s plain decoding (`generate_ar`) of the encoded prompts, in batches of similar length.
    Returns one Example per prompt: prompt + answer, measured from the prompt's last token.
    eos_token_id: as for `generate` (None: the model's own end-of-sequence tokens; (): none, every
    answer runs max_new_tokens). progress(n) is called after each batch of n prompts."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Example | None] = [None] * len(prompts)
    gen = torch.Generator(decoder.model.device).manual_seed(seed)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        res = decoder.generate_ar([prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature,
                                  generator=gen, eos_token_id=eos_token_id)
        for i, new in zip(idx, res.sequences):
            out[i] = Example(prompts[i] + new, len(prompts[i]) - 1)
        if progress is not None:
            progress(len(idx))
    return out


def replay_accept_lengths(policy: TreePolicy, logp: torch.Tensor, greedy: torch.Tensor,
                          max_new_tokens: int, n_chains: int | None = None, guess: torch.Tensor | None = None,
                          lookup: float = 0.0, nodes: int = 0) -> list[int]:
    """The tokens each decoding step commits, replayed from teacher-forced drafts.

    logp: [n, K, V] drafts of anchors P-1 .. P+n-2 (P the prompt length: anchor 0 is the prompt's last
    token); greedy: [n] the greedy token after each of them (greedy[j] is new token j). n_chains: the
    decoder's setting (None: a pseudo chain under every node). guess: None, or [n, K + nodes] the context
    lookup's guesses of the step rooted at each new token (`root_guesses`), mixed into its drafts with
    weight `lookup` (`lookup.with_lookup`) and carried on by `nodes` more nodes (`lookup.extend_tree`). Returns the accept lengths of the steps after the prefill, cut like
    `generate` cuts them at max_new_tokens (at most n new tokens are replayed).
    """
    return Replay(policy, logp, greedy, guess, lookup, nodes).accept_lengths(max_new_tokens, n_chains)


def root_guesses(example: Example, K: int, ngram: int = 3) -> torch.Tensor:
    """The context lookup's guesses [n, K] of the step rooted at each new token of `example`
    (n = its new tokens; row j: the step whose root is new token j, the history up to it)."""
    tokens = torch.as_tensor(example.tokens, dtype=torch.long)
    ends = torch.arange(example.start + 1, len(example.tokens))
    return lookup_drafts(tokens.expand(len(ends), -1), ends, K, ngram)


class Replay:
    """The decoding of one greedy continuation under one tree policy, replayed for any n_chains.

    A step's drafts are those of anchor j - s shifted by s, for root j (new token j) and shift s: the
    levels between the last accepted node and the deepest chain owner on the accepted path (0 when the
    last node owns a chain, always so with chains under every node; `HiddenTransferDecoder._next_drafts`).
    The steps of every root for one shift are verified at once, once per shift; the walk is then cheap.
    """

    def __init__(self, policy: TreePolicy, logp: torch.Tensor, greedy: torch.Tensor,
                 guess: torch.Tensor | None = None, lookup: float = 0.0, nodes: int = 0):
        # a host-side walk over small tables: on the CPU, where root_guesses are built, whatever the model's device
        self.policy, self.logp, self.greedy = policy, logp.cpu(), greedy.cpu()
        self.guess, self.lookup, self.nodes = guess, lookup, nodes
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
            # shift can pass K below the lookup's extra nodes (`lookup.extend_tree`): then no draft is left
            drafts = torch.cat([src[:, shift:], src.new_full((len(roots), min(shift, K), V), -math.log(V))], 1)
            if self.guess is not None:
                drafts = with_lookup(drafts, self.guess[roots, :K], self.lookup)
            tree = self.policy.choose(self.greedy[roots], drafts)
            if self.nodes:
                tree = extend_tree(tree, self.guess[roots], self.nodes, self.lookup)
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
