"""tree="auto": the measured choice, its cache per machine / model / weights, and lossless decoding with it."""
from __future__ import annotations

import pytest
import torch
from test_decode import random_transfer, tiny_model

from ht_kernels.decode import autotree
from ht_kernels.decode.autotree import tune_tree
from ht_kernels.decode.decoder import HiddenTransferDecoder
from ht_kernels.decode.transfer import TransferWeights
from ht_kernels.decode.trees import TreePolicy
from ht_kernels.decode.replay import replay_accept_lengths, root_guesses
from ht_kernels.drafts.drafters import drafter_from_weights
from ht_kernels.drafts.examples import Example
from ht_kernels.drafts.forced import draft_logprobs

PROMPTS = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 1, 2]]
GRID = {"budgets": (2, 4, 8), "chains": (1, 2, 8), "gen_tokens": 24, "context": 16, "reps": 1}


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("HT_KERNELS_CACHE", str(tmp_path))
    return tmp_path


def setup(seed=0, lookup=0.0, nodes=0):
    torch.manual_seed(seed)
    model = tiny_model(vocab=12, out_std=4.0)
    return model, HiddenTransferDecoder(model, random_transfer(model), tree="dynamic", lookup=lookup, lookup_nodes=nodes)


@pytest.mark.parametrize("lookup, nodes", [(0.0, 0), (0.4, 0), (0.4, 2)])
def test_choice_is_the_best_measured_candidate(cache_root, lookup, nodes):
    model, dec = setup(lookup=lookup, nodes=nodes)
    choice = tune_tree(dec, PROMPTS, **GRID, **({"min_gain": None} if lookup else {}))  # every candidate timed
    cands = [(r["budget"], r["n_chains"], r["depth"]) for r in choice.table]  # depths K - 1 and K
    assert cands == [(b, c, d) for b, c in [(2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 8)]
                     for d in (2, 3)]
    finalists = [r for r in choice.table if r["finalist"]]
    best = max(finalists, key=lambda r: r["tau"] / r["step_ms"])
    assert (choice.budget, choice.n_chains, choice.depth) == (best["budget"], best["n_chains"], best["depth"])
    assert len(finalists) == 6
    assert all(r["step_ms"] > 0 and r["tau"] >= 1 for r in choice.table) and choice.ar_ms > 0
    # tau is the replay of the decoder's own greedy answers (an independent recomputation here), drafting
    # with the first `depth` maps and, with the context lookup, its guesses mixed in
    want = dec.generate_ar(PROMPTS, max_new_tokens=24).sequences
    examples = [Example(p + s, len(p) - 1) for p, s in zip(PROMPTS, want)]
    for depth in (2, 3):
        lengths = []
        for (logp, nxt), e in zip(draft_logprobs(model, drafter_from_weights(dec.maps.first(depth)), examples), examples):
            guess = root_guesses(e, depth + nodes) if lookup else None
            lengths += replay_accept_lengths(TreePolicy(depth, None, budget=8), logp, nxt, 24, 2, guess, lookup, nodes)
        row = next(r for r in choice.table if (r["budget"], r["n_chains"], r["depth"]) == (8, 2, depth))
        assert row["tau"] == pytest.approx(sum(lengths) / len(lengths), abs=1e-4)
    # tuning leaves the decoder as it was
    assert dec.tree.budget == 16 and dec.n_chains is None and dec.transfer.K == 3 and dec.weight.shape[0] == 3


def test_larger_trees_are_timed_only_when_their_tau_pays():
    """Per chain setting and depth, a budget is kept while its replayed tau beats the last kept one's by
    min_gain; chains under every node count as one setting whatever the budget."""
    taus = {(2, 1, 3): 1.5, (4, 1, 3): 1.6, (8, 1, 3): 1.61, (16, 1, 3): 1.7,
            (2, 2, 3): 1.5, (4, 4, 3): 1.8, (8, 8, 3): 1.9, (16, 16, 3): 1.9,
            (4, 2, 3): 1.7, (8, 2, 3): 1.7, (16, 2, 3): 1.72}
    kept = autotree.justified(list(taus), taus, 0.01)
    assert kept == [(2, 1, 3), (2, 2, 3), (4, 1, 3), (4, 2, 3), (4, 4, 3), (8, 8, 3), (16, 1, 3), (16, 2, 3)]
    assert autotree.justified(list(taus), taus, 0.25) == [(2, 1, 3), (2, 2, 3), (4, 2, 3), (8, 8, 3)]


def test_choice_is_cached_per_weights(cache_root, monkeypatch):
    _, dec = setup()
    first = tune_tree(dec, PROMPTS, **GRID)
    assert len(list((cache_root / "trees").glob("*.json"))) == 1

    def fail(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(autotree, "_step_latencies", fail)
    assert tune_tree(dec, PROMPTS, **GRID) == first
    _, other = setup(seed=1)  # other transfer weights: a new measurement
    with pytest.raises(AssertionError, match="measured again"):
        tune_tree(other, PROMPTS, **GRID)
    with pytest.raises(AssertionError, match="measured again"):
        tune_tree(dec, PROMPTS, **GRID, cache=False)
    from test_train import with_refiner

    from dataclasses import replace

    refined = HiddenTransferDecoder(dec.model, with_refiner(replace(dec.maps)), tree="dynamic")
    with pytest.raises(AssertionError, match="measured again"):  # the same maps with a refiner: new drafts
        tune_tree(refined, PROMPTS, **GRID)
    for nodes in (0, 2):  # the same maps with the context lookup, and with it carried on below the tree
        looked = HiddenTransferDecoder(dec.model, dec.maps, tree="dynamic", lookup=0.3, lookup_nodes=nodes)
        with pytest.raises(AssertionError, match="measured again"):
            tune_tree(looked, PROMPTS, **GRID)


def test_decoder_auto_is_lossless(cache_root, monkeypatch):
    model, _ = setup()
    monkeypatch.setattr(autotree, "builtin_calibration", lambda m: PROMPTS)
    monkeypatch.setattr(autotree, "BUDGETS", (3, 6))
    monkeypatch.setattr(autotree, "CHAINS", (1, 6))
    dec = HiddenTransferDecoder(model, random_transfer(model), tree="auto", lookup=0.3)
    c = dec.tree_choice
    assert (dec.tree.budget, dec.n_chains, dec.head_once) == (c.budget, c.n_chains, c.head_once)
    assert dec.tree.K == dec.transfer.K == dec.weight.shape[0] == c.depth and dec.maps.K == 3
    assert not dec.tree.static and all(isinstance(r["head_once"], bool) for r in c.table)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6]]
    assert dec.generate(prompts, max_new_tokens=30).sequences == dec.generate_ar(prompts, max_new_tokens=30).sequences


def test_bad_arguments(cache_root):
    model, dec = setup()
    with pytest.raises(ValueError, match="tokenizer"):
        HiddenTransferDecoder(model, random_transfer(model), tree="auto")
    with pytest.raises(ValueError, match="n_chains"):
        HiddenTransferDecoder(model, random_transfer(model), tree="auto", n_chains=2)
    with pytest.raises(ValueError, match="depth"):
        HiddenTransferDecoder(model, random_transfer(model), tree="auto", depth=2)
    for depth in (0, 4, 2.0):
        with pytest.raises(ValueError, match="depth"):
            HiddenTransferDecoder(model, random_transfer(model), depth=depth)
    with pytest.raises(ValueError, match="depths"):
        tune_tree(dec, PROMPTS, depths=(4,))
    with pytest.raises(ValueError, match="budgets"):
        tune_tree(dec, PROMPTS, budgets=(1,))
    with pytest.raises(ValueError, match="context"):
        tune_tree(dec, PROMPTS, context=1020)
    short = tiny_model(vocab=12, max_seq_len=60)  # the default context shrinks to fit; no room at all fails
    tune_tree(HiddenTransferDecoder(short, random_transfer(short)), PROMPTS, budgets=(2, 4), chains=(1,),
              gen_tokens=8, reps=1, cache=False)
    with pytest.raises(ValueError, match="context"):
        tune_tree(HiddenTransferDecoder(short, random_transfer(short)), PROMPTS, budgets=(16,), cache=False)


@pytest.mark.parametrize("n_chains", [None, 2])
def test_head_once_gives_the_same_steps(n_chains):
    """One LM-head call over every row of a step, or two calls: the same tokens and accept lengths (fp32)."""
    model, _ = setup()
    weights = random_transfer(model)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6]]
    runs = []
    for once in (False, True):
        dec = HiddenTransferDecoder(model, weights, tree="dynamic", budget=6, n_chains=n_chains)
        dec.head_once = once
        runs.append(dec.generate(prompts, max_new_tokens=30))
    assert runs[0] == runs[1]
    assert runs[0].sequences == dec.generate_ar(prompts, max_new_tokens=30).sequences
    assert max(a for row in runs[0].accept_lengths for a in row) > 1


@pytest.mark.parametrize("tree", ["dynamic", None])
def test_depth_drafts_with_the_first_maps(tree):
    """depth=d drafts as the first d maps on their own do, puts d pseudo tokens in each chain, and commits
    plain decoding's tokens (fp32)."""
    model, _ = setup()
    weights = random_transfer(model)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6]]
    dec = HiddenTransferDecoder(model, weights, tree=tree, budget=6, depth=2)
    alone = HiddenTransferDecoder(model, TransferWeights(weights.weight[:2], weights.bias[:2], weights.layer),
                                  tree=tree, budget=6)
    assert dec.transfer.K == dec.tree.K == 2 and dec.maps.K == 3 and dec._step_tokens() == (dec.tree.budget + dec.lookup_nodes) * 3
    out = dec.generate(prompts, max_new_tokens=30)
    assert out == alone.generate(prompts, max_new_tokens=30)
    assert out.sequences == dec.generate_ar(prompts, max_new_tokens=30).sequences
    assert max(a for row in out.accept_lengths for a in row) > 1


def test_warmup_rounds_are_not_timed():
    """_median_ms times only the rounds after `warmup`: a step that is slow for its first calls (a CUDA
    graph's eager warm-up and recording) is timed by its fast calls, every candidate the same number of
    times."""
    import time

    calls = {"slow start": 0, "steady": 0}

    def step(key, slow_calls):
        def fn():
            calls[key] += 1
            time.sleep(0.05 if calls[key] <= slow_calls else 0.001)
        return fn

    ms = autotree._median_ms({"slow start": step("slow start", 3), "steady": step("steady", 0)},
                             torch.device("cpu"), reps=3, warmup=3)
    assert calls == {"slow start": 6, "steady": 6}
    assert ms["slow start"] < 20 and ms["steady"] < 20
    assert autotree._median_ms({"slow start": step("slow start", 9)}, torch.device("cpu"), reps=3)["slow start"] > 40
