"""Decoding: hidden-transfer output equals plain decoding (greedy) or its distribution (sampling)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from ht_kernels.decode.decoder import HiddenTransferDecoder, prefill_chunks
from ht_kernels.decode.sampling import verify_tree_sampling, warp_probs
from ht_kernels.decode.transfer import TransferWeights
from ht_kernels.decode.trees import StepTree, TreePolicy
from ht_kernels.model import ModelConfig, Transformer

TIE = 1e-4  # greedy outputs may differ only where the top two logits are this close (fp32 rounding)


def tiny_model(vocab: int = 16, dim: int = 64, n_layers: int = 4, max_seq_len: int = 1024,
               out_std: float = 2.0) -> Transformer:
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=2, head_dim=dim // 4,
                      hidden_dim=2 * dim, max_seq_len=max_seq_len, name="tiny")
    model = Transformer.from_config(cfg)
    with torch.no_grad():  # unit-variance activations: attention matters and logits are spread
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
        model.tok_embeddings.weight.normal_(0, 1.0)
        model.output.weight.normal_(0, out_std * dim**-0.5)
    return model


def random_transfer(model: Transformer, K: int = 3, layer: int = 2) -> TransferWeights:
    D = model.config.dim
    return TransferWeights(torch.randn(K, D, D) / D**0.5, torch.randn(K, D) * 0.1, layer)


def logits_after(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """Plain full forward over tokens -> logits [V] after the last one."""
    n = len(tokens)
    cache = model.new_cache(1, n)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        return model(torch.tensor([tokens]), torch.arange(n)[None], cache, mask)[0, -1]


def assert_same_greedy(model, prompts, got, expected, tie: float = TIE) -> None:
    """Identical sequences, except that a difference is allowed where plain decoding faced a tie (its top two
    logits closer than `tie`)."""
    for prompt, a, b in zip(prompts, got, expected):
        if a == b:
            continue
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) if len(a) == len(b) else min(len(a), len(b))
        top2 = logits_after(model, prompt + b[:i]).topk(2).values
        assert top2[0] - top2[1] < tie, f"differs at new token {i}: {a[i:i + 5]} vs plain {b[i:i + 5]}"


class ScriptedDrafts(HiddenTransferDecoder):
    """Replaces the model's drafts, after the prefill and after every step, by script(root_pos): the
    draft log-probabilities [B, K, V] given each row's position of the next root; the context lookup is
    off unless asked for, so that the drafts are the script's alone."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("lookup", 0.0)
        super().__init__(*args, **kwargs)

    def script(self, root_pos: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def _prefill(self, prompts, cache, draft):
        logits, drafts, states = super()._prefill(prompts, cache, draft)
        return logits, None if drafts is None else self.script(cache.lengths.long().tolist()), states

    def _step(self, root, drafts, cache, warp, generator, guess=None):
        tree, accepted, accept_len, nxt, _ = super()._step(root, drafts, cache, warp, generator, guess)
        return tree, accepted, accept_len, nxt, self.script((cache.lengths.long() + accept_len).tolist())


class OracleDecoder(ScriptedDrafts):
    """Drafts from the known plain continuation: at each depth the right token sits at rank 0 (60%),
    rank 1 (20%) or nowhere (20%), so steps accept several drafts, rejections included."""

    def __init__(self, *args, reference: list[list[int]], **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference

    def script(self, root_pos):
        K, V = self.transfer.K, self.model.config.vocab_size
        logp = torch.randn(len(root_pos), K, V)
        for b, i in itertools.product(range(len(root_pos)), range(K)):
            seq, pos = self.reference[b], root_pos[b] + i + 1
            if pos < len(seq):
                x, u = seq[pos], float(torch.rand(()))
                if u < 0.6:
                    logp[b, i, x] = 10.0
                elif u < 0.8:
                    logp[b, i, x], logp[b, i, (x + 1) % V] = 9.0, 10.0
                else:
                    logp[b, i, x] = -10.0
        return logp.log_softmax(-1)


class RandomDraftDecoder(ScriptedDrafts):
    """Fresh random drafts every step: in a tiny vocabulary they often hold likely tokens."""

    def script(self, root_pos):
        return (3 * torch.randn(len(root_pos), self.transfer.K, self.model.config.vocab_size)).log_softmax(-1)


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [3]]


@pytest.mark.parametrize("tree", [None, "dynamic", [(0,), (1,), (0, 0), (0, 0, 0)]])
@pytest.mark.parametrize("n_chains", [None, 3])
def test_untrained_and_random_transfer_are_lossless(tree, n_chains):
    model = tiny_model()
    for transfer in (None, random_transfer(model)):
        dec = HiddenTransferDecoder(model, transfer, tree=tree, n_chains=n_chains)
        ar, ht = dec.generate_ar(PROMPTS, max_new_tokens=30), dec.generate(PROMPTS, max_new_tokens=30)
        assert_same_greedy(model, PROMPTS, ht.sequences, ar.sequences)
        assert all(len(s) == 30 for s in ht.sequences) and ar.accept_lengths == [[1] * 30] * 3


@pytest.mark.parametrize("tree", [None, "dynamic"])
@pytest.mark.parametrize("n_chains", [None, 4])
def test_accepted_drafts_are_lossless(tree, n_chains):
    model = tiny_model()
    plain = HiddenTransferDecoder(model, random_transfer(model)).generate_ar(PROMPTS, max_new_tokens=60)
    reference = [p + s for p, s in zip(PROMPTS, plain.sequences)]
    dec = OracleDecoder(model, random_transfer(model), tree=tree, n_chains=n_chains, reference=reference)
    out = dec.generate(PROMPTS, max_new_tokens=60)
    assert_same_greedy(model, PROMPTS, out.sequences, plain.sequences)
    for steps, seq in zip(out.accept_lengths, out.sequences):
        assert sum(steps) == len(seq) == 60 and min(steps) >= 1
        assert sum(steps[1:]) / len(steps[1:]) > 1.5  # drafts were accepted: the multi-token path ran


def test_eos_max_new_tokens_and_streaming():
    model = tiny_model()
    dec = HiddenTransferDecoder(model, random_transfer(model))
    plain = dec.generate_ar(PROMPTS, max_new_tokens=25)
    reference = [p + s for p, s in zip(PROMPTS, plain.sequences)]
    eos = plain.sequences[0][7]
    streamed = [[] for _ in PROMPTS]
    oracle = OracleDecoder(model, random_transfer(model), reference=reference)
    out = oracle.generate(PROMPTS, max_new_tokens=25, eos_token_id=eos,
                          callback=lambda new: [s.extend(t) for s, t in zip(streamed, new)])
    expected = [ref[: ref.index(eos) + 1] if eos in ref else ref for ref in plain.sequences]
    assert_same_greedy(model, PROMPTS, out.sequences, expected)
    assert streamed == out.sequences
    assert [sum(s) for s in out.accept_lengths] == [len(s) for s in out.sequences]


def exact_marginal(model, prompt, n: int, warp) -> torch.Tensor:
    """P(new token n) under plain sampling from the warped distribution, by enumerating all prefixes."""
    V = model.config.vocab_size
    probs = {(): 1.0}
    for _ in range(n - 1):
        probs = {pre + (x,): p * q for pre, p in probs.items()
                 for x, q in enumerate(warp(logits_after(model, prompt + list(pre))).tolist())}
    marginal = torch.zeros(V, dtype=torch.float64)
    for pre, p in probs.items():
        marginal += p * warp(logits_after(model, prompt + list(pre))).double()
    return marginal


@pytest.mark.parametrize("tree", [None, "dynamic"])
def test_sampling_keeps_the_model_distribution(tree):
    """The 3rd and 4th new tokens (drafted and verified) follow the exact marginal distribution of plain
    sampling: a chi-square test over 3000 samples at significance 1e-4."""
    model = tiny_model(vocab=6, dim=32, n_layers=2)
    temperature, top_k, top_p = 0.9, 5, 0.95

    def warp(logits):
        return warp_probs(logits, temperature, top_k, top_p)

    dec = RandomDraftDecoder(model, random_transfer(model, layer=1), tree=tree)
    prompt, N = [1, 2, 3], 3000
    out = dec.generate([prompt] * N, max_new_tokens=4, temperature=temperature, top_k=top_k, top_p=top_p,
                       generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    steps = [s for row in out.accept_lengths for s in row[1:]]
    assert sum(steps) / len(steps) > 1.2  # drafts were accepted
    for n in (3, 4):
        expected = exact_marginal(model, prompt, n, warp) * N
        observed = torch.bincount(torch.tensor([s[n - 1] for s in out.sequences]), minlength=6).double()
        keep = expected >= 5
        chi2 = float(((observed - expected)[keep] ** 2 / expected[keep]).sum())
        df = int(keep.sum()) - 1
        assert chi2 < _chi2_critical(df), f"token {n}: chi2 {chi2:.1f} (df {df}), {observed} vs {expected}"
        assert observed[~keep].sum() <= 5 * max(1, int((~keep).sum())) + 10


def test_tree_sampling_rule_is_exact():
    """verify_tree_sampling on one fixed tree, repeated over many rows: the first emitted token follows
    the root's distribution, and the token after an accepted child follows that child's distribution."""
    V, N = 5, 20000
    parents = torch.tensor([-1, 0, 0, 0, 1, 1, 2])
    tokens = torch.tensor([0, 1, 3, 1, 2, 4, 0])  # node 3 repeats node 1's token: it can never be accepted
    probs = torch.distributions.Dirichlet(torch.ones(V)).sample((7,))
    tree = StepTree(tokens.expand(N, 7), parents.expand(N, 7), torch.zeros(N, 7, dtype=torch.long),
                    torch.zeros(N, 7))
    accepted, accept_len, bonus = verify_tree_sampling(probs.expand(N, 7, V), tree,
                                                       torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    first = torch.where(accept_len > 1, tokens[accepted[:, 1].clamp_min(0)], bonus)
    _assert_follows(first, probs[0], "first token")
    for child in (1, 2):
        rows = (accepted[:, 1] == child)
        second = torch.where(accept_len[rows] > 2, tokens[accepted[rows, 2].clamp_min(0)], bonus[rows])
        _assert_follows(second, probs[child], f"token after node {child}")
    assert not (accepted == 3).any()


def _assert_follows(samples: torch.Tensor, p: torch.Tensor, what: str) -> None:
    expected = p.double() * samples.numel()
    observed = torch.bincount(samples, minlength=p.numel()).double()
    keep = expected >= 5
    chi2 = float(((observed - expected)[keep] ** 2 / expected[keep]).sum())
    assert chi2 < _chi2_critical(int(keep.sum()) - 1), f"{what}: {observed.tolist()} vs {expected.tolist()}"
    assert observed[~keep].sum() <= 20, f"{what}: {observed.tolist()} vs {expected.tolist()}"


def _chi2_critical(df: int) -> float:
    """Upper 1e-4 quantile of chi-square (Wilson-Hilferty approximation, z = 3.719)."""
    z = 3.719
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_drafts_that_overflow_stay_lossless(dtype):
    """Maps near the dtype's largest value make pseudo states inf or NaN: real nodes hide them, and their
    tokens stay plain decoding's (a masked NaN value used to reach them as 0 * NaN): bit for bit in bf16
    (exact), up to plain decoding's near-ties in fp16 and fp32, whose tree steps round differently."""
    model = tiny_model().to(dtype)
    D, big = model.config.dim, torch.finfo(dtype).max / 2
    transfer = TransferWeights(torch.randn(3, D, D).clamp(-1, 1) * big, torch.zeros(3, D), 2)
    exact = dtype == torch.bfloat16
    for tree in (None, "dynamic"):
        dec = HiddenTransferDecoder(model, transfer, tree=tree, lookup=0.0, exact=exact)
        ar, ht = dec.generate_ar(PROMPTS, max_new_tokens=8), dec.generate(PROMPTS, max_new_tokens=8)
        if exact:
            assert ht.sequences == ar.sequences
        else:
            # fp16 logits between 4 and 8 lie 2^-8 apart: a near-tie there is a few such steps.
            assert_same_greedy(model, PROMPTS, ht.sequences, ar.sequences, tie=TIE if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_maps_are_refused(value):
    model = tiny_model().to(torch.float16)
    D = model.config.dim
    bad = TransferWeights(torch.zeros(3, D, D), torch.zeros(3, D), 2)
    bad.weight[1, 2, 3] = value
    with pytest.raises(ValueError, match="weight .* finite"):
        HiddenTransferDecoder(model, bad)
    with pytest.raises(ValueError, match="bias .* finite"):  # finite in fp32, inf in fp16
        HiddenTransferDecoder(model, TransferWeights(torch.zeros(3, D, D), torch.full((3, D), 1e6), 2))


def test_transfer_weights_round_trip(tmp_path):
    model = tiny_model()
    w = random_transfer(model, K=4, layer=3)
    w.meta["model"] = "tiny"
    w.save(tmp_path / "t.safetensors")
    back = TransferWeights.load(tmp_path / "t.safetensors")
    assert torch.equal(back.weight, w.weight) and torch.equal(back.bias, w.bias)
    assert back.layer == 3 and back.K == 4 and back.meta["model"] == "tiny"
    dec = HiddenTransferDecoder(model, tmp_path / "t.safetensors")
    assert dec.transfer.K == 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_ids=[]), "input_ids"),
    (dict(input_ids=[[1], []]), "input_ids"),
    (dict(input_ids=[[1, 99]]), "input_ids"),
    (dict(input_ids=torch.zeros(2, 3)), "input_ids"),
    (dict(input_ids=[[1]], max_new_tokens=0), "max_new_tokens"),
    (dict(input_ids=[[1] * 900], max_new_tokens=200), "positions"),
    (dict(input_ids=[[1, True]]), "input_ids"),
    (dict(input_ids=[[1]], max_new_tokens=2.5), "max_new_tokens"),
    (dict(input_ids=[[1]], max_new_tokens=True), "max_new_tokens"),
    (dict(input_ids=[[1]], max_new_tokens="5"), "max_new_tokens"),
    (dict(input_ids=[[1]], temperature=-1.0), "temperature"),
    (dict(input_ids=[[1]], temperature=math.nan), "temperature"),
    (dict(input_ids=[[1]], temperature=math.inf), "temperature"),
    (dict(input_ids=[[1]], temperature="0.5"), "temperature"),
    (dict(input_ids=[[1]], temperature=1.0, top_p=0.0), "top_p"),
    (dict(input_ids=[[1]], top_p=1.5), "top_p"),
    (dict(input_ids=[[1]], temperature=1.0, top_p=math.nan), "top_p"),
    (dict(input_ids=[[1]], temperature=1.0, top_k=-1), "top_k"),
    (dict(input_ids=[[1]], temperature=1.0, top_k=2.5), "top_k"),
    (dict(input_ids=[[1]], temperature=1.0, generator=42), "generator"),
    (dict(input_ids=[[1]], eos_token_id="13"), "eos_token_id"),
    (dict(input_ids=[[1]], eos_token_id=13.0), "eos_token_id"),
    (dict(input_ids=[[1]], eos_token_id=[[1]]), "eos_token_id"),
    (dict(input_ids=[[1]], eos_token_id=True), "eos_token_id"),
    (dict(input_ids=[[1]], callback=5), "callback"),
])
def test_bad_generate_arguments(kwargs, match):
    dec = HiddenTransferDecoder(tiny_model(), None)
    with pytest.raises(ValueError, match=match):
        dec.generate(**kwargs)


def test_bad_transfer_and_tree():
    model = tiny_model()
    with pytest.raises(ValueError, match="transfer"):
        HiddenTransferDecoder(model, TransferWeights(torch.zeros(3, 8, 8), torch.zeros(3, 8), 2))
    with pytest.raises(ValueError, match="layer"):
        HiddenTransferDecoder(model, TransferWeights.untrained(64, 4, layer=4))
    with pytest.raises(ValueError, match="transfer"):
        HiddenTransferDecoder(model, "no/such/file.safetensors")
    with pytest.raises(ValueError, match="K=2"):
        HiddenTransferDecoder(model, None, tree=TreePolicy(2, [(0,)]))
    with pytest.raises(ValueError, match="prefixes"):
        TreePolicy(3, [(0, 1)])
    with pytest.raises(ValueError, match="tree must be"):
        HiddenTransferDecoder(model, None, tree="Dynamic")
    for kwargs, match in ((dict(K=0), "K must be"), (dict(K=3, budget=2.5), "budget must be"),
                          (dict(K=3, width=True), "width must be"), (dict(K=3, paths=[0, 1]), "paths"),
                          (dict(K=3, paths=[(0.5,)]), "paths")):
        with pytest.raises(ValueError, match=match):
            TreePolicy(**kwargs)
    with pytest.raises(ValueError, match="K=3"):
        TreePolicy(3).choose(torch.zeros(2, dtype=torch.long), torch.zeros(2, 2, 16))
    D = model.config.dim
    for weights, match in ((TransferWeights(torch.zeros(3, D, D).numpy(), torch.zeros(3, D), 2), "weight"),
                           (TransferWeights(torch.zeros(3, D, D), torch.zeros(3, D), 2.0), "layer"),
                           (TransferWeights(torch.zeros(3, D, D), torch.zeros(3, D), True), "layer")):
        with pytest.raises(ValueError, match=match):
            HiddenTransferDecoder(model, weights)


def test_bad_transfer_files(tmp_path):
    from safetensors.torch import save_file

    D = 64
    (tmp_path / "empty.safetensors").write_bytes(b"")
    save_file({"weight": torch.zeros(3, D, D)}, str(tmp_path / "nobias.safetensors"), metadata={"layer": "2"})
    save_file({"weight": torch.zeros(3, D, D), "bias": torch.zeros(3, D)}, str(tmp_path / "layer.safetensors"),
              metadata={"layer": "two"})
    for name, match in (("empty", "not a readable safetensors file"), ("nobias", "weight and bias"),
                        ("layer", "integers \\['layer'\\]")):
        with pytest.raises(ValueError, match=match):
            TransferWeights.load(tmp_path / f"{name}.safetensors")


def test_eos_ids_in_any_integer_form():
    model = tiny_model()
    dec = HiddenTransferDecoder(model, random_transfer(model))
    plain = dec.generate_ar(PROMPTS, max_new_tokens=12).sequences
    eos = plain[1][3]
    expected = dec.generate(PROMPTS, max_new_tokens=12, eos_token_id=[eos]).sequences
    assert expected[1] == plain[1][:plain[1].index(eos) + 1]
    for form in (eos, torch.tensor(eos), torch.tensor([eos]), (eos,), {eos}):
        assert dec.generate(PROMPTS, max_new_tokens=12, eos_token_id=form).sequences == expected


def test_warp_keeps_the_top_token_at_any_temperature_and_top_p():
    logits = torch.tensor([[3.0, 1.0, 3.0 - 1e-3, -2.0]])
    for temperature in (1e-30, 1e-45):
        assert torch.equal(warp_probs(logits, temperature), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(warp_probs(logits, 1.0, top_p=1e-9), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(warp_probs(logits, 1e30), torch.full((1, 4), 0.25))


def test_prefill_chunks_cover_every_row_within_the_budget():
    assert prefill_chunks([3, 4, 2, 9, 1], 8) == [(0, 2, 4), (2, 3, 2), (3, 4, 8), (4, 5, 1)]
    for lengths, budget in (([5] * 7, 16), ([1, 30, 2, 2, 2], 6), ([40], 7), ([2, 3, 1, 6, 6, 6], 64)):
        groups = prefill_chunks(lengths, budget)
        assert [g[0] for g in groups] == [0] + [g[1] for g in groups[:-1]] and groups[-1][1] == len(lengths)
        assert all((r1 - r0) * chunk <= max(budget, chunk) and chunk <= max(lengths[r0:r1])
                   for r0, r1, chunk in groups)


@pytest.mark.parametrize("budget", [1, 5, 13])
def test_prefill_in_row_groups_and_position_chunks_equals_one_pass(budget):
    """Passes of a few tokens (groups of rows, positions in chunks over the cache) give the logits,
    drafts and cache of one pass over the whole right-padded batch."""
    model = tiny_model()
    dec = HiddenTransferDecoder(model, random_transfer(model))
    prompts = PROMPTS + [[(7 * i) % 12 for i in range(19)]]

    def prefill(tokens):
        dec.prefill_tokens = tokens
        cache = model.new_cache(len(prompts), 64)
        with torch.no_grad():
            return (*dec._prefill(prompts, cache, draft=True)[:2], cache)

    logits, drafts, cache = prefill(10**6)
    c_logits, c_drafts, c_cache = prefill(budget)
    torch.testing.assert_close(c_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_drafts, drafts, rtol=1e-5, atol=1e-5)
    assert torch.equal(c_cache.lengths, cache.lengths)
    for b, n in enumerate(cache.lengths.tolist()):
        torch.testing.assert_close(c_cache.k[:, b, :n], cache.k[:, b, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c_cache.v[:, b, :n], cache.v[:, b, :n], rtol=1e-5, atol=1e-5)


def test_prefill_drafts_of_a_ragged_batch_equal_each_row_alone():
    """The prefill drafts the first step from the last prompt token's pseudo chain; the pads of shorter
    rows must not reach it."""
    model = tiny_model()
    dec = HiddenTransferDecoder(model, random_transfer(model))

    def prefill(prompts):
        with torch.no_grad():
            return dec._prefill(prompts, model.new_cache(len(prompts), 64), draft=True)[:2]

    logits, drafts = prefill(PROMPTS)
    assert drafts.shape == (len(PROMPTS), 3, model.config.vocab_size)
    for b, prompt in enumerate(PROMPTS):
        alone_logits, alone_drafts = prefill([prompt])
        torch.testing.assert_close(logits[b], alone_logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(drafts[b], alone_drafts[0], rtol=1e-5, atol=1e-5)
