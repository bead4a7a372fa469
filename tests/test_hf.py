"""ht_kernels.hf: "ht_tree" as a transformers attention backend. Logits equal SDPA's with the same masks on
a causal prefill and on a tree-verification step (4D boolean mask over a cache), for tiny random Llama,
Qwen2 and Mistral models and SmolLM2; masks it cannot express fail loudly."""
from __future__ import annotations

import pytest
import torch
from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import ht_kernels as ht
import ht_kernels.hf  # noqa: F401  (registers "ht_tree")
from helpers import TOL, rel_rms, triton_installed, triton_interpreting

SIZES = dict(vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=256)
MODELS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
          "mistral": (MistralConfig, MistralForCausalLM)}
PARENTS = [-1, 0, 0, 1, 1, 2, 3, 0]  # a small token tree, topologically ordered


def prefill_and_tree_step(model, impl: str, prompt: torch.Tensor, tree_tokens: torch.Tensor):
    """Logits of a prompt prefill (causal) and of a tree step over its cache, with attention `impl`."""
    model.set_attn_implementation(impl)
    B, n = prompt.shape
    tree = ht.Tree.from_parents(PARENTS)
    T = len(PARENTS)
    mask = torch.cat([torch.ones(B, 1, T, n, dtype=torch.bool), tree.ancestor_mask.expand(B, 1, T, T)], dim=-1)
    positions = (n + tree.depths).expand(B, T)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(prompt, cache=cache, use_cache=True).logits
        step = model(tree_tokens, cache=cache, attention_mask=mask, position_ids=positions).logits
    return first, step


def check_against_sdpa(model, vocab: int, dtype: torch.dtype, n: int = 21) -> None:
    prompt = torch.randint(0, vocab, (2, n))
    tree_tokens = torch.randint(0, vocab, (2, len(PARENTS)))
    want = prefill_and_tree_step(model, "sdpa", prompt, tree_tokens)
    got = prefill_and_tree_step(model, "ht_tree", prompt, tree_tokens)
    for what, g, w in zip(("prefill", "tree step"), got, want):
        err = rel_rms(g, w)
        assert err <= TOL[dtype], f"{what}: relative RMS {err:.2e} against sdpa > {TOL[dtype]:.0e} ({dtype})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", MODELS)
def test_tiny_models_match_sdpa(kind, dtype):
    config_cls, model_cls = MODELS[kind]
    model = model_cls(config_cls(**SIZES)).to(dtype).eval()
    check_against_sdpa(model, SIZES["vocab_size"], dtype)


def test_smollm2_matches_sdpa(smol_hf):
    try:
        check_against_sdpa(smol_hf, smol_hf.config.vocab_size, torch.float32, n=40)
    finally:
        smol_hf.set_attn_implementation("sdpa")


def test_mask_function_is_sdpa_mask():
    assert AttentionMaskInterface._global_mapping["ht_tree"] is sdpa_mask


def test_a_registered_backend_is_the_one_that_runs():
    """register(name, backend) runs that backend: Triton (under the interpreter) matches sdpa, and CUDA on
    CPU tensors raises instead of running another backend."""
    ht_kernels.hf.register("ht_tree_cuda", backend="cuda")
    model = LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    model.set_attn_implementation("ht_tree_cuda")
    with torch.no_grad(), pytest.raises(ht.BackendUnavailableError, match="backend='cuda'"):
        model(torch.randint(0, SIZES["vocab_size"], (1, 5)))
    if triton_installed() and triton_interpreting():  # CPU tensors need the interpreter
        ht_kernels.hf.register("ht_tree", backend="triton")
        try:
            check_against_sdpa(model, SIZES["vocab_size"], torch.float32)
        finally:
            ht_kernels.hf.register("ht_tree")
    with pytest.raises(ValueError, match="backend must be one of"):
        ht_kernels.hf.register("ht_tree_x", backend="tpu")


def test_left_padding_prefills_and_then_fails_loudly():
    """A left-padded prefill is a pattern over the new tokens alone, which the tree mask expresses; the next
    step would hide prefix keys (the pads) from the new token, which cannot be expressed: it must raise."""
    model = LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    ids = torch.randint(0, SIZES["vocab_size"], (2, 9))
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, :3] = 0
    logits = {}
    for impl in ("sdpa", "ht_tree"):
        model.set_attn_implementation(impl)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            logits[impl] = model(ids, attention_mask=padding, cache=cache, use_cache=True).logits
    real = padding.bool()
    assert rel_rms(logits["ht_tree"][real], logits["sdpa"][real]) <= TOL[torch.float32]
    step = torch.cat([padding, torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad(), pytest.raises(RuntimeError, match="prefix key"):
        model(ids[:, :1], attention_mask=step, cache=cache, use_cache=True)


def test_decoder_and_trainer_take_a_transformers_model(tmp_path):
    """The model object itself (weights shared): decoding equals transformers' greedy generate, and the
    transfer trainer runs on it."""
    from ht_kernels.drafts.examples import Example
    from ht_kernels.train.trainer import TrainConfig, train

    model = LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    prompt = torch.randint(0, SIZES["vocab_size"], (1, 7))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, 7:].tolist()
    dec = ht.HiddenTransferDecoder(model, transfer=None)
    assert dec.generate(prompt, max_new_tokens=12, eos_token_id=()).sequences[0] == want  # neither stops at eos
    examples = [Example(torch.randint(0, SIZES["vocab_size"], (30,)).tolist(), 5) for _ in range(4)]
    drafter = train(model, examples, TrainConfig(K=2, steps=2, batch_size=2, save_every=2), tmp_path, progress=False)
    assert drafter.weight.shape == (2, SIZES["hidden_size"], SIZES["hidden_size"])
