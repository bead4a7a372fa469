"""The decoding step as a CUDA graph. Without a GPU: the greedy forward pass runs on fake tensors, where
reading a tensor's value on the host raises, and building a tensor from host data is refused, so a pass
that a graph could not replay fails here. On a GPU: graph replays decode exactly like eager steps."""
from __future__ import annotations

import os

import pytest
import torch
from test_decode import assert_same_greedy, random_transfer, tiny_model
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from ht_kernels.baselines.medusa import MedusaDecoder, MedusaWeights
from ht_kernels.decode.decoder import HiddenTransferDecoder
from ht_kernels.decode.graphs import StepGraph
from ht_kernels.decode.transfer import TransferWeights
from ht_kernels.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=96, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                  max_seq_len=256, name="tiny")


class NoHostData(TorchDispatchMode):
    """Refuses tensors built from host data (torch.tensor(...)), which a graph would bake in."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default):
            raise AssertionError("a tensor was built from host data inside the forward pass")
        return func(*args, **(kwargs or {}))


def fake_pass(monkeypatch, speculative: bool, tree, n_chains=None, head_once=False, medusa=False,
              lookup=0.0, nodes=0) -> torch.Tensor:
    """Builds a decoder on fake tensors and runs one greedy forward pass; returns its out buffer.

    The ops dispatch to their registered fake implementations, as under torch.compile (their CPU
    bodies check values on the host, which a GPU run does not)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with FakeTensorMode():
        model = Transformer.from_config(CFG, dtype=torch.bfloat16)
        K, D = 3, CFG.dim
        maps = TransferWeights(torch.empty(K, D, D), torch.empty(K, D), layer=2)
        if medusa:  # prepacked weights are a CPU path, not what a graph replays
            dec = MedusaDecoder(model, MedusaWeights(maps.weight, maps.bias), tree=tree, budget=8, prepack=False,
                                lookup=lookup, lookup_nodes=nodes)
        else:
            dec = HiddenTransferDecoder(model, transfer=maps, tree=tree, budget=8, n_chains=n_chains, prepack=False,
                                        lookup=lookup, lookup_nodes=nodes)
            dec.head_once = head_once
        B = 2
        cache = model.new_cache(B, 128)
        root = torch.zeros(B, dtype=torch.long)
        drafts = torch.empty(B, K, CFG.vocab_size)
        history = torch.zeros(B, 128, dtype=torch.long) if lookup else None
        forward_pass, out = dec._forward_pass(speculative, root, drafts, cache, lambda x: x.argmax(-1), None, None,
                                              history)
        with NoHostData():
            forward_pass()
        return out


@pytest.mark.parametrize("tree,n_chains,head_once,lookup,nodes", [
    (None, None, False, 0.0, 0), ("dynamic", 3, True, 0.0, 0), ("dynamic", None, False, 0.0, 0),
    ("dynamic", 3, False, 0.25, 0), ("dynamic", None, True, 0.25, 3)])
def test_greedy_pass_reads_nothing_on_the_host(monkeypatch, tree, n_chains, head_once, lookup, nodes):
    out = fake_pass(monkeypatch, True, tree, n_chains, head_once, lookup=lookup, nodes=nodes)
    assert out.shape[1] == 1 + (16 if tree is None else 8) + nodes


@pytest.mark.parametrize("lookup,nodes", [(0.0, 0), (0.25, 0), (0.25, 2)])
def test_medusa_pass_reads_nothing_on_the_host(monkeypatch, lookup, nodes):
    assert fake_pass(monkeypatch, True, "dynamic", medusa=True, lookup=lookup, nodes=nodes).shape == (2, 9 + nodes)


def test_plain_pass_reads_nothing_on_the_host(monkeypatch):
    assert fake_pass(monkeypatch, False, None).shape == (2, 2)


def test_the_fake_pass_catches_host_reads(monkeypatch):
    """The check can fail: a pass that reads the accepted lengths on the host, or builds a host tensor."""
    real_step = HiddenTransferDecoder._step

    def reads(self, *args):
        result = real_step(self, *args)
        int(result[2].max())
        return result

    monkeypatch.setattr(HiddenTransferDecoder, "_step", reads)
    with pytest.raises(DataDependentOutputException):
        fake_pass(monkeypatch, True, None)

    def copies(self, *args):
        result = real_step(self, *args)
        result[3].add_(torch.tensor([1]))
        return result

    monkeypatch.setattr(HiddenTransferDecoder, "_step", copies)
    with pytest.raises(AssertionError, match="host data"):
        fake_pass(monkeypatch, True, None)


def test_step_graph_needs_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        StepGraph(lambda: None, torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replays_decode_like_eager_steps(dtype):
    torch.manual_seed(0)
    model = tiny_model(vocab=64).to("cuda", dtype)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [3]]
    maps, runs = random_transfer(model), {}  # the same drafts for both runs
    for graphs in (False, True):
        dec = HiddenTransferDecoder(model, transfer=maps, tree="dynamic", budget=6, n_chains=2, cuda_graphs=graphs)
        runs[graphs] = (dec.generate(prompts, max_new_tokens=40), dec.generate_ar(prompts, max_new_tokens=40))
        assert dec.graph_status == ("replayed" if graphs else None)
    eager, graphed = runs[False], runs[True]
    for a, b in zip(eager, graphed):
        assert a.sequences == b.sequences and a.accept_lengths == b.accept_lengths


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sampling_and_overflowing_drafts_on_cuda():
    """Sampling takes a generator on the model's device (tree verification draws its uniforms there), and
    a seed repeats a generation; drafts that overflow to inf and NaN leave greedy decoding plain
    decoding's, on the CUDA kernels too (their masked values still meet a zero probability)."""
    torch.manual_seed(0)
    model = tiny_model(vocab=64).to("cuda")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]
    dec = HiddenTransferDecoder(model, transfer=random_transfer(model), tree="dynamic", budget=6)
    for run in (dec.generate, dec.generate_ar):
        seqs = [run(prompts, max_new_tokens=16, temperature=1.0, top_p=0.9,
                    generator=torch.Generator("cuda").manual_seed(7)).sequences for _ in range(2)]
        assert seqs[0] == seqs[1] and all(0 <= x < 64 for s in seqs[0] for x in s)
        with pytest.raises(ValueError, match="generator"):
            run(prompts, max_new_tokens=4, temperature=1.0, generator=torch.Generator().manual_seed(7))
    D, big = model.config.dim, torch.finfo(torch.float32).max / 2
    maps = TransferWeights(torch.randn(3, D, D).clamp(-1, 1) * big, torch.zeros(3, D), 2)
    for backend in ("auto", "triton"):
        model.attn_backend = backend
        dec = HiddenTransferDecoder(model, transfer=maps, backend=backend, lookup=0.0)
        ht, ar = dec.generate(prompts, max_new_tokens=12), dec.generate_ar(prompts, max_new_tokens=12)
        if ht.sequences != ar.sequences:
            assert_same_greedy(model.cpu(), prompts, ht.sequences, ar.sequences)
            model.cuda()
    model.attn_backend = "auto"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton runs on a GPU or under TRITON_INTERPRET=1")
def test_decoding_on_the_triton_kernels():
    """The loop on the Triton kernels (tree attention in every layer, hidden transfer into the step's
    strided buffer) computes what the torch backend does: the prefill's and a step's drafts and keys
    (fp32, within 1e-4), then whole generations: the inputs the decoder hands the kernels are valid."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(vocab=64, n_layers=3).to(dev)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]
    maps = random_transfer(model, layer=1)
    steps, runs = {}, {}
    for backend in ("torch", "triton"):
        model.attn_backend = backend
        dec = HiddenTransferDecoder(model, transfer=maps, tree="dynamic", budget=5, n_chains=2, backend=backend,
                                    cuda_graphs=False)
        with torch.inference_mode():
            cache = model.new_cache(len(prompts), 64)
            logits, drafts, _ = dec._prefill(prompts, cache, draft=True)
            _, accepted, accept_len, nxt, next_drafts = dec._step(logits.argmax(-1), drafts, cache, None, None)
        steps[backend] = (drafts, next_drafts, cache.k, cache.v, accepted, accept_len, nxt)
        runs[backend] = dec.generate(prompts, max_new_tokens=12)
    model.attn_backend = "torch"
    for got, want in zip(steps["triton"], steps["torch"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert_same_greedy(model.cpu(), prompts, runs["triton"].sequences, runs["torch"].sequences)
