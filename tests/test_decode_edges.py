"""Decoding on a tiny random model: the edges of the loop, full and zero acceptance, the cache bound, ragged
batches against batches of one, and a two-sample test of sampled tokens (hidden transfer vs plain)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_decode import (OracleDecoder, RandomDraftDecoder, ScriptedDrafts, assert_same_greedy, logits_after,
                         random_transfer, tiny_model)

from ht_kernels.decode.decoder import HiddenTransferDecoder
from ht_kernels.decode.sampling import greedy
from ht_kernels.decode.trees import step_layout
from ht_kernels.decode.transfer import TransferWeights

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [3]]  # ragged, with a one-token prompt


class ScriptedDraftDecoder(ScriptedDrafts):
    """Drafts from the known plain continuation: the right token always at rank 0 (right=True: every
    draft of the path (0, ..., 0) is accepted) or always ranked last (right=False: no draft is ever
    accepted, as the vocabulary is wider than any tree)."""

    def __init__(self, *args, reference: list[list[int]], right: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference, self.right = reference, right

    def script(self, root_pos):
        B, K = len(root_pos), self.transfer.K
        logp = torch.randn(B, K, self.model.config.vocab_size)
        for b, i in itertools.product(range(B), range(K)):
            seq, pos = self.reference[b], root_pos[b] + i + 1
            if pos < len(seq):
                logp[b, i, seq[pos]] = 30.0 if self.right else -30.0
        return logp.log_softmax(-1)


def plain(model, prompts, n: int) -> list[list[int]]:
    """The greedy continuation by plain decoding (the reference every other run must equal)."""
    return HiddenTransferDecoder(model, None).generate_ar(prompts, max_new_tokens=n).sequences


def brute_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full forwards from scratch: no cache, no batch, no decoder."""
    out = []
    for _ in range(n):
        out.append(int(logits_after(model, prompt + out).argmax()))
    return out


def check_steps(out, n: int) -> None:
    for steps, seq in zip(out.accept_lengths, out.sequences):
        assert len(seq) == n and sum(steps) == n and min(steps) >= 1, (steps, seq)


# --- edges of the loop ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_is_argmax_ties_included(dtype):
    """Ties (frequent in bf16 logits) go to the first index, as argmax, whatever the row and the column."""
    x = torch.randn(4, 3, 1001).to(dtype)
    top = x.max() + 1
    for b, cols in enumerate([(7, 500), (0, 1000), (999, 1000), (31, 32, 33)]):
        x[b, b % 3, list(cols)] = top
    assert torch.equal(greedy(x), x.argmax(-1))
    assert greedy(x)[3, 0].item() == 31


def test_max_new_tokens_one():
    """One new token: the prefill's argmax, no step runs, accept_lengths [[1]], one callback."""
    model = tiny_model()
    expected = [[int(logits_after(model, p).argmax())] for p in PROMPTS]
    for dec in (HiddenTransferDecoder(model, None),
                HiddenTransferDecoder(model, random_transfer(model), tree="dynamic")):
        for run in (dec.generate, dec.generate_ar):
            calls = []
            out = run(PROMPTS, max_new_tokens=1, callback=calls.append)
            assert_same_greedy(model, PROMPTS, out.sequences, expected)
            assert out.accept_lengths == [[1]] * 3 and calls == [out.sequences]
    sampled = HiddenTransferDecoder(model, None).generate(PROMPTS, max_new_tokens=1, temperature=1.0,
                                                          generator=torch.Generator().manual_seed(1))
    assert [len(s) for s in sampled.sequences] == [1, 1, 1] and sampled.accept_lengths == [[1]] * 3


def test_eos_as_first_token():
    """A row whose first token is eos ends at once ([eos], one pass) while the others go on; when every row
    starts with eos no step runs at all."""
    model = tiny_model()
    ref = plain(model, PROMPTS, 12)
    eos = ref[0][0]
    expected = [r[: r.index(eos) + 1] if eos in r else r for r in ref]
    oracle = ScriptedDraftDecoder(model, None, reference=[p + r for p, r in zip(PROMPTS, ref)], right=True)
    for run in (oracle.generate, oracle.generate_ar, HiddenTransferDecoder(model, None).generate):
        out = run(PROMPTS, max_new_tokens=12, eos_token_id=eos)
        assert_same_greedy(model, PROMPTS, out.sequences, expected)
        assert out.sequences[0] == [eos] and out.accept_lengths[0] == [1]
        assert [sum(s) for s in out.accept_lengths] == [len(s) for s in out.sequences]

    firsts = sorted({r[0] for r in ref})
    steps = []
    original = oracle._step
    oracle._step = lambda *a: steps.append(1) or original(*a)
    out = oracle.generate(PROMPTS, max_new_tokens=12, eos_token_id=firsts)  # a list of eos ids
    assert out.sequences == [[r[0]] for r in ref] and out.accept_lengths == [[1]] * 3 and not steps


def test_the_models_eos_ends_a_row_by_default():
    """eos_token_id=None stops a row after the model's own end-of-sequence tokens (`model.eos_token_ids`),
    as transformers' generate does; () runs every row to max_new_tokens whatever they hold."""
    model = tiny_model()
    ref = plain(model, PROMPTS, 16)
    assert model.eos_token_ids == ()  # a random model has none: rows run their length
    end = ref[1][5]
    model.eos_token_ids = (end, 10 ** 6)
    expected = [r[: r.index(end) + 1] if end in r else r for r in ref]
    dec = HiddenTransferDecoder(model, random_transfer(model))
    for run in (dec.generate, dec.generate_ar):
        assert_same_greedy(model, PROMPTS, run(PROMPTS, max_new_tokens=16).sequences, expected)
        assert_same_greedy(model, PROMPTS, run(PROMPTS, max_new_tokens=16, eos_token_id=()).sequences, ref)
    assert len(expected[1]) <= 6 < len(ref[1])


def test_one_token_prompt():
    """A batch of one with a one-token prompt: hidden transfer (drafts rejected and accepted) and plain
    decoding both equal greedy decoding by full forwards."""
    model = tiny_model()
    prompt, n = [[7]], 20
    expected = [brute_greedy(model, prompt[0], n)]
    reference = [prompt[0] + plain(model, prompt, n + 8)[0]]
    decoders = [HiddenTransferDecoder(model, random_transfer(model)),
                OracleDecoder(model, None, reference=reference),
                ScriptedDraftDecoder(model, None, reference=reference, right=True)]
    for dec in decoders:
        for out in (dec.generate(prompt, max_new_tokens=n), dec.generate_ar(torch.tensor(prompt), max_new_tokens=n)):
            assert_same_greedy(model, prompt, out.sequences, expected)
            check_steps(out, n)


def test_root_only_steps():
    """A one-node tree every step (a dynamic tree with a budget of 1 node: drafts are made but never
    verified) emits one token per pass; K=1 with the single path (0,) verifies one draft per pass."""
    model = tiny_model()
    n = 24
    ref = plain(model, PROMPTS, n + 4)
    expected = [r[:n] for r in ref]
    reference = [p + r for p, r in zip(PROMPTS, ref)]
    root_only = ScriptedDraftDecoder(model, None, tree="dynamic", budget=1, reference=reference, right=True)
    assert root_only.tree.budget == 1
    out = root_only.generate(PROMPTS, max_new_tokens=n)
    assert_same_greedy(model, PROMPTS, out.sequences, expected)
    assert out.accept_lengths == [[1] * n] * 3

    k1 = TransferWeights.untrained(model.config.dim, model.config.n_layers, K=1)
    for dec in (HiddenTransferDecoder(model, k1, tree=[(0,)], lookup=0.0),
                ScriptedDraftDecoder(model, k1, tree=[(0,)], reference=reference, right=True)):
        assert dec.tree.budget == 2
        out = dec.generate(PROMPTS, max_new_tokens=n)
        assert_same_greedy(model, PROMPTS, out.sequences, expected)
        check_steps(out, n)
        assert max(max(s) for s in out.accept_lengths) <= 2
    assert all(s[2:-1] == [2] * (len(s) - 3) for s in out.accept_lengths), out.accept_lengths  # right drafts


def test_static_tree_without_paths_is_rejected():
    """A static tree must have at least one path (a root-only tree is `tree="dynamic", budget=1`)."""
    model = tiny_model()
    with pytest.raises(ValueError, match="paths must be non-empty"):
        HiddenTransferDecoder(model, None, tree=[])


@pytest.mark.parametrize("n_chains", [0, -1, 1.5, True])
def test_bad_n_chains_is_rejected(n_chains):
    with pytest.raises(ValueError, match="n_chains"):
        HiddenTransferDecoder(tiny_model(), None, n_chains=n_chains)


def test_root_keeps_its_chain_under_tied_scores():
    """Drafts so confident that their log-probabilities round to 0 tie with the root's score: the root
    must still own a chain (the next drafts hang under the last accepted node or an ancestor)."""
    dec = HiddenTransferDecoder(tiny_model(), None, tree="dynamic", n_chains=2)
    drafts = torch.full((1, 3, 16), -40.0)
    drafts[:, :, 5] = 30.0
    tree = dec.tree.choose(torch.tensor([1]), drafts.log_softmax(-1))
    assert (tree.scores == 0).sum() > 2  # the tie this test is about
    assert step_layout(tree, 3, n_chains=2).owners[0, 0] == 0


@pytest.mark.parametrize("tree", [None, "dynamic"])
def test_full_acceptance(tree):
    """Drafts always right at rank 0 (the prefill drafts the first step): every step accepts the whole
    depth-K path, K + 1 tokens per pass, but the last (cut at max_new_tokens)."""
    model = tiny_model()
    n, K = 41, 3
    ref = plain(model, PROMPTS, n + K + 1)
    dec = ScriptedDraftDecoder(model, None, tree=tree, reference=[p + r for p, r in zip(PROMPTS, ref)], right=True)
    out = dec.generate(PROMPTS, max_new_tokens=n)
    assert_same_greedy(model, PROMPTS, out.sequences, [r[:n] for r in ref])
    check_steps(out, n)
    for steps in out.accept_lengths:
        assert steps[0] == 1 and steps[1:-1] == [K + 1] * (len(steps) - 2) and 1 <= steps[-1] <= K + 1, steps


def test_zero_acceptance():
    """Drafts never right: every pass emits exactly one token, still the greedy continuation."""
    model = tiny_model()
    n = 30
    ref = plain(model, PROMPTS, n + 4)
    for tree in (None, "dynamic"):
        dec = ScriptedDraftDecoder(model, random_transfer(model), tree=tree,
                                   reference=[p + r for p, r in zip(PROMPTS, ref)], right=False)
        out = dec.generate(PROMPTS, max_new_tokens=n)
        assert_same_greedy(model, PROMPTS, out.sequences, [r[:n] for r in ref])
        assert out.accept_lengths == [[1] * n] * 3


def test_cache_capacity_bound():
    """prompt + max_new_tokens + one step filling max_seq_len exactly decodes (drafts fully accepted up to
    the end); one position more raises ValueError before the model runs."""
    M, P = 128, [[1, 2, 3], [4, 5]]
    model = tiny_model(max_seq_len=M)
    step = 16 * (1 + 3)  # the default tree's 16 nodes, each with K = 3 pseudo nodes
    n_ht, n_ar = M - 3 - step, M - 3 - 1
    ref = plain(model, P, n_ar)
    assert len(ref[0]) == n_ar  # plain decoding right at the bound
    dec = ScriptedDraftDecoder(model, None, reference=[p + r for p, r in zip(P, ref)], right=True)
    out = dec.generate(P, max_new_tokens=n_ht)
    assert_same_greedy(model, P, out.sequences, [r[:n_ht] for r in ref])
    check_steps(out, n_ht)

    calls = []
    model.run_layers = lambda *a, **k: calls.append(1)  # any forward would be recorded
    model.new_cache = lambda *a, **k: calls.append(1)
    for run, n in ((dec.generate, n_ht + 1), (dec.generate_ar, n_ar + 1)):
        with pytest.raises(ValueError, match=f"need {M + 1} positions, more than the model's {M}"):
            run(P, max_new_tokens=n, callback=calls.append)
    assert not calls


def test_a_step_reserves_its_own_tokens():
    """A dynamic tree with fewer candidates than its budget, and chains under some of its nodes, reserves
    the tokens a step feeds (9 nodes + 2 chains of 1), not budget x (1 + K): prompt + max_new_tokens + 11
    positions fit max_seq_len exactly."""
    M, P = 64, [[1, 2, 3], [4, 5]]
    model = tiny_model(max_seq_len=M)
    dec = HiddenTransferDecoder(model, random_transfer(model, K=1), tree="dynamic", budget=16, n_chains=2,
                                lookup=0.0)
    assert dec.tree.size == 9 and dec._step_tokens() == 9 + 2 * 1
    n = M - 3 - 11
    assert_same_greedy(model, P, dec.generate(P, max_new_tokens=n).sequences, plain(model, P, n))
    with pytest.raises(ValueError, match=f"need {M + 1} positions"):
        dec.generate(P, max_new_tokens=n + 1)


def test_ragged_rows_equal_batch_of_one():
    """Each row of a ragged batch (lengths 1 to 8, prefill padding, rows at different cache lengths) gets
    what the same prompt alone gets, with drafts accepted."""
    model = tiny_model()
    n = 30
    ref = plain(model, PROMPTS, n + 4)
    reference = [p + r for p, r in zip(PROMPTS, ref)]
    batch = OracleDecoder(model, random_transfer(model), reference=reference).generate(PROMPTS, max_new_tokens=n)
    assert_same_greedy(model, PROMPTS, batch.sequences, [r[:n] for r in ref])
    for b, prompt in enumerate(PROMPTS):
        alone = OracleDecoder(model, random_transfer(model), reference=[reference[b]])
        one = alone.generate([prompt], max_new_tokens=n)
        assert_same_greedy(model, [prompt], one.sequences, [batch.sequences[b]])
        assert_same_greedy(model, [prompt], alone.generate_ar([prompt], max_new_tokens=n).sequences,
                           [batch.sequences[b]])


# --- sampling: hidden transfer vs plain, two samples ---------------------------------------------

def two_sample_chi2(x: torch.Tensor, y: torch.Tensor, min_count: int = 10) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom for "x and y (equal sizes) come from one distribution":
    sum over categories of (a - b)^2 / (a + b); categories with fewer than min_count samples in all are
    pooled into one (dropped if the pool is still below min_count)."""
    assert x.numel() == y.numel()
    n = int(max(x.max(), y.max())) + 1
    a, b = torch.bincount(x, minlength=n).double(), torch.bincount(y, minlength=n).double()
    big = a + b >= min_count
    a = torch.cat([a[big], a[~big].sum()[None]])
    b = torch.cat([b[big], b[~big].sum()[None]])
    keep = a + b >= min_count
    a, b = a[keep], b[keep]
    return float(((a - b) ** 2 / (a + b)).sum()), int(keep.sum()) - 1


def chi2_critical(df: int, p: float) -> float:
    """Upper p quantile of chi-square with df degrees of freedom (Wilson-Hilferty approximation)."""
    z = float(torch.special.ndtri(torch.tensor(1 - p, dtype=torch.float64)))
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_chi2_helpers():
    # Tables: 10.83 (df 1), 18.47 (df 4), 29.59 (df 10); the approximation errs high (conservative) by < 0.4.
    for df, exact in ((1, 10.83), (4, 18.47), (10, 29.59)):
        assert 0 <= chi2_critical(df, 1e-3) - exact < 0.4
    same = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    assert two_sample_chi2(same, same) == (0.0, 2)
    chi2, df = two_sample_chi2(torch.tensor([0] * 60 + [1] * 40), torch.tensor([0] * 40 + [1] * 60))
    assert df == 1 and abs(chi2 - 8.0) < 1e-9


class FixedDraftDecoder(ScriptedDrafts):
    """The same random drafts every step and row (a log-probability table drawn once): drafted tokens do
    not average out over steps, so a wrong acceptance rule shifts the sampled distribution visibly."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.table = torch.randn(self.transfer.K, self.model.config.vocab_size).log_softmax(-1)

    def script(self, root_pos):
        return self.table.expand(len(root_pos), -1, -1)


@pytest.mark.parametrize("tree", [None, "dynamic"])
@pytest.mark.parametrize("decoder", [RandomDraftDecoder, FixedDraftDecoder])
def test_sampled_tokens_match_plain_sampling(decoder, tree):
    """New tokens 2 to 4 of hidden-transfer sampling (drafts often accepted) and of plain sampling, 800 rows
    each of one generate call with independent generators: two-sample chi-square tests at p = 0.001 (for
    the three positions together) do not reject. Measured power: with FixedDraftDecoder, accepting a draft
    with twice its probability in verify_tree_sampling gives chi2 of 150 to 200, not zeroing a rejected
    draft's probability 55 to 90, against a critical value of about 24. Fresh random drafts
    (RandomDraftDecoder) average such biases out (a few percent on the marginals): they check the decoding
    path more than the acceptance rule."""
    model = tiny_model(vocab=6, dim=32, n_layers=2, out_std=1.0)  # spread: no token above ~0.9 after the warp
    dec = decoder(model, random_transfer(model, layer=1), tree=tree)
    N, warp, positions = 800, dict(temperature=0.8, top_k=0, top_p=0.95), (2, 3, 4)
    seeds = torch.randint(0, 2**31, (2,)).tolist()
    ht = dec.generate([[1, 2, 3]] * N, max_new_tokens=4, generator=torch.Generator().manual_seed(seeds[0]), **warp)
    ar = dec.generate_ar([[1, 2, 3]] * N, max_new_tokens=4, generator=torch.Generator().manual_seed(seeds[1]), **warp)
    steps = [s for row in ht.accept_lengths for s in row[1:]]  # the decoding passes (row[0]: the prefill)
    assert sum(steps) / len(steps) > 1.05  # drafts were accepted (1.2 to 1.7 measured)
    for pos in positions:
        x = torch.tensor([s[pos - 1] for s in ht.sequences])
        y = torch.tensor([s[pos - 1] for s in ar.sequences])
        chi2, df = two_sample_chi2(x, y)
        assert df >= 1 and chi2 < chi2_critical(df, 1e-3 / len(positions)), (
            f"token {pos}: chi2 {chi2:.1f} (df {df}); hidden transfer {torch.bincount(x, minlength=6).tolist()} "
            f"vs plain {torch.bincount(y, minlength=6).tolist()}")
