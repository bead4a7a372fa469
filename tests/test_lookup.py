"""Context lookup drafts: the guesses against a plain-Python search, the mixture, and their bad inputs."""
from __future__ import annotations

import math

import pytest
import torch

from ht_kernels.decode.lookup import extend_tree, lookup_drafts, with_lookup
from ht_kernels.decode.trees import TreePolicy


def reference_guess(seq: list[int], end: int, K: int, ngram: int) -> list[int]:
    """The K tokens after the latest i < end whose n tokens ending at i equal those ending at end, for
    the longest n <= ngram that occurs (-1 past end or without a match)."""
    for n in range(min(ngram, end + 1), 0, -1):
        tail = seq[end - n + 1:end + 1]
        for i in range(end - 1, n - 2, -1):
            if seq[i - n + 1:i + 1] == tail:
                return [seq[i + 1 + d] if i + 1 + d <= end else -1 for d in range(K)]
    return [-1] * K


@pytest.mark.parametrize("vocab, ngram, K", [(3, 1, 1), (4, 3, 3), (5, 2, 4), (7, 3, 2), (50, 4, 3)])
def test_guesses_match_a_plain_search(vocab, ngram, K):
    g = torch.Generator().manual_seed(vocab * 10 + ngram)
    R, N = 23, 41
    tokens = torch.randint(0, vocab, (R, N), generator=g)
    ends = torch.randint(0, N, (R,), generator=g)
    ends[0], ends[1] = 0, N - 1  # a lone root (nothing before it) and a full history
    got = lookup_drafts(tokens, ends, K, ngram)
    want = [reference_guess(tokens[r].tolist(), int(ends[r]), K, ngram) for r in range(R)]
    assert got.tolist() == want
    assert (got[0] == -1).all()
    assert (got >= 0).any() and (got == -1).any()  # both cases occurred


def test_guesses_ignore_tokens_past_the_root():
    tokens = torch.tensor([[5, 6, 7, 5, 9, 9, 9]])
    # root at index 3 (token 5): the earlier 5 at index 0 was followed by 6, 7, then the root itself
    assert lookup_drafts(tokens, torch.tensor([3]), 4, 3).tolist() == [[6, 7, 5, -1]]
    poisoned = tokens.clone()
    poisoned[0, 4:] = 6
    assert lookup_drafts(poisoned, torch.tensor([3]), 4, 3).tolist() == [[6, 7, 5, -1]]


def test_longer_matches_win_over_later_ones():
    # ... 1 2 3 4 | 9 2 3 8 | 1 2 3 (root): the 3-gram 1 2 3 at index 2 beats the later 2-gram 2 3 at index 6
    tokens = torch.tensor([[1, 2, 3, 4, 9, 2, 3, 8, 1, 2, 3]])
    assert lookup_drafts(tokens, torch.tensor([10]), 2, 3).tolist() == [[4, 9]]
    assert lookup_drafts(tokens, torch.tensor([10]), 2, 2).tolist() == [[8, 1]]  # 2 3 at index 6 is later


@pytest.mark.parametrize("weight", [0.05, 0.5, 0.9])
def test_mixture(weight):
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(4, 3, 11, generator=g).log_softmax(-1).double()
    guess = torch.tensor([[2, -1, 10], [-1, -1, -1], [0, 0, 0], [7, 3, -1]])
    got = with_lookup(logp, guess, weight)
    assert got.dtype == torch.float32
    drafts = logp.float()
    kept = drafts.clone()
    assert torch.equal(with_lookup(drafts, guess, weight), got) and torch.equal(drafts, kept)  # input untouched
    p = logp.exp()
    for r in range(4):
        for d in range(3):
            want = p[r, d].clone()
            if guess[r, d] >= 0:
                want = (1 - weight) * want
                want[guess[r, d]] += weight
            torch.testing.assert_close(got[r, d].double().exp(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.double().logsumexp(-1), torch.zeros(4, 3, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("weight", [0.0, 1.0, -0.1, math.nan])
def test_bad_weight(weight):
    with pytest.raises(ValueError, match="lookup weight"):
        with_lookup(torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long), weight)


def reference_extension(tokens, parents, depths, guess, nodes):
    """Plain Python: the deepest node whose root path carries guess[0], guess[1], ... (the root without
    one), then (parent, token, depth) of each new node."""
    on = {0}
    for i in range(1, len(tokens)):  # parents precede children
        d = depths[i]
        if parents[i] in on and d <= len(guess) and guess[d - 1] >= 0 and tokens[i] == guess[d - 1]:
            on.add(i)
    deepest = max(sorted(on), key=lambda i: depths[i])  # the first of the deepest
    d, out, parent = depths[deepest], [], deepest
    for j in range(nodes):
        g = guess[d + j] if d + j < len(guess) else -1
        out.append((parent, max(g, 0), d + 1 + j))
        parent = len(tokens) + j
    return deepest, out


@pytest.mark.parametrize("nodes", [1, 3])
@pytest.mark.parametrize("paths", [None, [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]])
def test_extension_continues_the_guess_below_its_deepest_node(nodes, paths):
    g = torch.Generator().manual_seed(nodes)
    B, K, V = 64, 3, 5  # a small vocabulary: the guess is often on the tree, to various depths
    policy = TreePolicy(K, paths, budget=9, width=3)
    drafts = torch.randn(B, K, V, generator=g).log_softmax(-1)
    tree = policy.choose(torch.randint(0, V, (B,), generator=g), drafts)
    guess = torch.randint(-1, V, (B, K + nodes), generator=g)
    got = extend_tree(tree, guess, nodes, 0.3)
    T = tree.size
    assert got.size == T + nodes
    for name in ("tokens", "parents", "depths", "scores"):
        assert torch.equal(getattr(got, name)[:, :T], getattr(tree, name))  # the policy's nodes stay
    depths_seen = set()
    for b in range(B):
        deepest, want = reference_extension(tree.tokens[b].tolist(), tree.parents[b].tolist(),
                                            tree.depths[b].tolist(), guess[b].tolist(), nodes)
        assert [(int(got.parents[b, T + j]), int(got.tokens[b, T + j]), int(got.depths[b, T + j]))
                for j in range(nodes)] == want
        base = float(tree.scores[b, deepest])
        torch.testing.assert_close(got.scores[b, T:], base + math.log(0.3) * torch.arange(1.0, nodes + 1))
        depths_seen.add(int(tree.depths[b, deepest]))
    assert len(depths_seen) >= 3  # guesses off the tree, and on it to depth 1, 2 (and 3)


@pytest.mark.parametrize("kwargs, match", [({"lookup": 1.0}, "lookup must be"), ({"lookup": -0.1}, "lookup must be"),
                                           ({"lookup_ngram": 0}, "lookup_ngram"),
                                           ({"lookup_nodes": -1}, "lookup_nodes"),
                                           ({"lookup": 0.0, "lookup_nodes": 2}, "lookup_nodes")])
def test_bad_decoder_lookup_arguments(kwargs, match):
    from test_decode import random_transfer, tiny_model

    from ht_kernels.baselines.medusa import MedusaDecoder, MedusaWeights
    from ht_kernels.decode.decoder import HiddenTransferDecoder

    model = tiny_model()
    D = model.config.dim
    with pytest.raises(ValueError, match=match):
        HiddenTransferDecoder(model, random_transfer(model), **kwargs)
    with pytest.raises(ValueError, match=match):
        MedusaDecoder(model, MedusaWeights(torch.zeros(3, D, D), torch.zeros(3, D)), **{"lookup": 0.25, **kwargs})
