"""Decoding SmolLM2-135M-Instruct in fp32 on Spec-Bench prompts: hidden transfer (untrained maps, and oracle
drafts that are often accepted) equals plain decoding, which equals transformers' greedy `generate`; rows of
a ragged batch equal their batch-of-one results. Differences are allowed only on near-ties.

The models are loaded once per test session (about 35 s for ours and transformers'); the module runs in
about 80 s on one CPU thread. Without ../shared/data/specbench_dev.jsonl (relative to the repository) the
prompts come from the project's own benchmarks/prompts.jsonl.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import test_decode
import torch
from test_decode import OracleDecoder, assert_same_greedy
from test_model import SMOL_ATOL, needs_smollm2

import ht_kernels as ht
from ht_kernels.decode.decoder import HiddenTransferDecoder

pytestmark = needs_smollm2

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "specbench_dev.jsonl"  # evaluation only
OWN_PROMPTS = Path(__file__).resolve().parents[1] / "benchmarks" / "prompts.jsonl"
N_PROMPTS, MAX_PROMPT = 8, 128  # one prompt per category (the first with a templated length <= MAX_PROMPT)
N_NEW = 64  # new tokens per prompt (eos ends a row earlier)
N_ALONE = 32  # new tokens of the batch-of-one runs (untrained maps: one token per pass of 64 tokens)


@pytest.fixture(autouse=True)
def _smollm2_tie(monkeypatch):
    """Near-ties for assert_same_greedy: logits of ~40 computed in another order (ours vs transformers,
    batch of 8 vs 1, a tree step vs one token) differ by up to ~1e-4, so a top-2 gap below SMOL_ATOL may
    flip; a wrong token from a real bug shows a gap of O(1)."""
    monkeypatch.setattr(test_decode, "TIE", SMOL_ATOL)


@pytest.fixture(scope="module")
def specbench() -> list[dict]:
    """Spec-Bench's dev prompts when shared/ sits next to the repository, else the project's own set."""
    path = DATA if DATA.is_file() else OWN_PROMPTS
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"category": r["category"], "turns": r.get("turns") or [r["prompt"]]} for r in rows]


@pytest.fixture(scope="module")
def prompts(specbench, smol) -> list[list[int]]:
    """The chat template around each first turn; ragged lengths (about 50 to 120 tokens)."""
    seen, out = set(), []
    for row in specbench:
        if row["category"] in seen:
            continue
        messages = [{"role": "user", "content": row["turns"][0]}]
        ids = smol.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        if len(ids) <= MAX_PROMPT:
            seen.add(row["category"])
            out.append(list(ids))
        if len(out) == N_PROMPTS:
            return out
    pytest.fail(f"{DATA} has fewer than {N_PROMPTS} categories with a prompt of <= {MAX_PROMPT} tokens")


@pytest.fixture(scope="module")
def eos(smol) -> int:
    return smol.tokenizer.eos_token_id


@pytest.fixture(scope="module")
def plain(prompts, smol, eos):
    """Plain greedy decoding of the ragged batch: the reference of every other run."""
    start = time.perf_counter()
    out = HiddenTransferDecoder(smol, None).generate_ar(prompts, max_new_tokens=N_NEW, eos_token_id=eos)
    print(f"\nplain decoding, {len(prompts)} x {N_NEW} tokens: {time.perf_counter() - start:.1f} s; rows ending in "
          f"eos: {sum(s[-1] == eos for s in out.sequences)}")
    assert all(len(s) == N_NEW or s[-1] == eos for s in out.sequences)
    return out


def upto_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def check_steps(out) -> None:
    for steps, seq in zip(out.accept_lengths, out.sequences):
        assert min(steps) >= 1 and sum(steps) == len(seq), (steps, len(seq))


@torch.no_grad()
def test_plain_equals_transformers_generate(prompts, smol, smol_hf, plain, eos):
    """transformers' greedy generate over the same batch, left-padded, with the same eos."""
    P = max(map(len, prompts))
    x = torch.tensor([[eos] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    out = smol_hf.generate(x, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False, eos_token_id=eos,
                           pad_token_id=eos)
    print(f"\ntransformers generate: {time.perf_counter() - start:.1f} s")
    expected = [upto_eos(row, eos) for row in out[:, P:].tolist()]
    print(f"rows equal token for token: {sum(a == b for a, b in zip(plain.sequences, expected))}/{len(prompts)}")
    assert_same_greedy(smol, prompts, plain.sequences, expected)
    assert plain.accept_lengths == [[1] * len(s) for s in plain.sequences]


def test_untrained_batch_of_one_equals_plain_batch(prompts, smol, plain, eos):
    """Hidden transfer with untrained maps (the default 16-node tree, a pseudo chain under every node) on
    the shortest and the longest prompt alone equals their rows of the plain ragged batch."""
    dec = HiddenTransferDecoder(smol, None)
    order = sorted(range(len(prompts)), key=lambda b: len(prompts[b]))
    for b in (order[0], order[-1]):
        start = time.perf_counter()
        out = dec.generate([prompts[b]], max_new_tokens=N_ALONE, eos_token_id=eos)
        print(f"\nuntrained maps, prompt of {len(prompts[b])} tokens alone: {time.perf_counter() - start:.1f} s, "
              f"accept lengths {out.accept_lengths[0]}")
        assert_same_greedy(smol, [prompts[b]], out.sequences, [plain.sequences[b][:N_ALONE]])
        check_steps(out)


def test_oracle_drafts_batch_equals_plain(prompts, smol, plain, eos):
    """Drafts right at rank 0 or 1 most of the time (OracleDecoder with the plain reference), a dynamic
    8-node tree with 3 pseudo chains: many drafts are accepted in the real model, rows retire at eos at
    different steps, and every row still equals plain decoding."""
    reference = [p + s for p, s in zip(prompts, plain.sequences)]
    dec = OracleDecoder(smol, None, tree="dynamic", budget=8, n_chains=3, reference=reference)
    start = time.perf_counter()
    out = dec.generate(prompts, max_new_tokens=N_NEW, eos_token_id=eos)
    steps = [s for row in out.accept_lengths for s in row[1:]]
    print(f"\noracle drafts, {len(prompts)} rows: {time.perf_counter() - start:.1f} s, "
          f"{max(map(len, out.accept_lengths))} passes, mean accepted {sum(steps) / len(steps):.2f} tokens per pass")
    assert_same_greedy(smol, prompts, out.sequences, plain.sequences)
    check_steps(out)
    assert sum(steps) / len(steps) > 1.8


def test_loaded_transformers_model_is_the_gguf_model(smol, smol_hf):
    """load_model(transformers object) shares the object's parameters, which equal the GGUF loader's
    exactly (logits of GGUF vs transformers: test_model; HF directory vs object: test_model's tiny models)."""
    shared = ht.load_model(smol_hf)
    ours, theirs = dict(smol.named_parameters()), dict(shared.named_parameters())
    assert ours.keys() == theirs.keys() and shared.config == replace(smol.config, name=shared.config.name)
    assert {p.data_ptr() for p in theirs.values()} == {p.data_ptr() for p in smol_hf.parameters()}
    different = [n for n in ours if not torch.equal(ours[n], theirs[n])]
    assert not different, different[:5]
