"""Row-exact CPU bf16 decoding (`Transformer.set_row_exact`): `RowExactCPUPlan` against the fp64 reference,
every tree row bit for bit the plain pass at its position, lone rows through the linear layers, and
hidden-transfer decoding giving plain decoding's tokens exactly."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from test_model import causal, needs_smollm2
from test_tree_attention import make_case, random_tree_mask, reference

import ht_kernels as ht
from helpers import assert_close
from ht_kernels.torch_backend.tree_attention import EXACT_BLOCK, RowExactCPUPlan, tree_depths
from ht_kernels.cpu import LONE_ROW_MAX_K, Linear, prepack_supported
from ht_kernels.model import KVCache, ModelConfig, Transformer

BF16 = torch.bfloat16


def exact(q, k_cache, v_cache, lens, mask, k=None, v=None):
    depth = RowExactCPUPlan.runs(q, mask)
    assert depth is not None
    return RowExactCPUPlan(lens, mask, depth)(q, k_cache, v_cache, k, v)


@pytest.mark.parametrize("G,T,D,lens", [
    (1, 7, 64, [0]), (3, 6, 64, [5]), (3, 12, 64, [300]), (3, 1, 64, [1000]), (4, 9, 128, [33, 97]),
    (2, 20, 80, [64, 0, 130]), (3, 1, 64, [0, 31, 32, 95]),
])
def test_matches_reference(G, T, D, lens):
    """Against fp64 on random trees; cache slots past each row's prefix (and tree) hold NaN."""
    case = make_case(len(lens), T, 2 * G, 2, D, BF16, lens, per_row=len(lens) > 1)
    q, k_cache, v_cache, seqlens, mask, k, v = case
    ref_out, ref_lse, ref_kc, ref_vc = reference(*case)
    out, lse = exact(q, k_cache, v_cache, seqlens, mask, k, v)
    assert out.dtype == BF16 and out.shape == q.shape and lse.dtype == torch.float32
    assert_close(out, ref_out, BF16, "out")
    assert_close(lse, ref_lse, BF16, "lse")
    assert torch.equal(k_cache.double().nan_to_num(7.0), ref_kc.nan_to_num(7.0))
    assert torch.equal(v_cache.double().nan_to_num(7.0), ref_vc.nan_to_num(7.0))


def paths(mask: torch.Tensor) -> list[list[int]]:
    """Each row's ancestors, root first (a tree mask in topological order)."""
    return [row.nonzero().flatten().tolist() for row in mask]


@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("L0", [0, 20, 62, 77, 318])  # 62, 318: depths cross a split
@pytest.mark.parametrize("room", [0, 80])
def test_each_row_is_the_plain_pass_at_its_position(G, L0, room):
    """A tree node's output and lse equal, bit for bit, those of the same query alone at its position p
    with its ancestors in the cache in order (plain decoding); room: cache slots past p, holding NaN."""
    torch.manual_seed(L0 + G)
    T, Hkv, D = 9, 2, 64
    mask = random_tree_mask(T)
    kc = torch.randn(1, L0 + T + 1, Hkv, D, dtype=BF16)
    vc = torch.randn_like(kc)
    q = torch.randn(1, T, G * Hkv, D, dtype=BF16)
    k, v = torch.randn(1, T, Hkv, D, dtype=BF16), torch.randn(1, T, Hkv, D, dtype=BF16)
    out, lse = exact(q, kc.clone(), vc.clone(), torch.tensor([L0]), mask, k, v)
    for r, path in enumerate(paths(mask)):
        p = L0 + len(path) - 1
        nan = torch.full((1, room, Hkv, D), float("nan"), dtype=BF16)
        kp, vp = torch.cat([kc[:, :L0], k[:, path], nan], 1), torch.cat([vc[:, :L0], v[:, path], nan], 1)
        one, one_lse = exact(q[:, r:r + 1], kp, vp, torch.tensor([p]), causal(1))
        assert torch.equal(one[0, 0], out[0, r]), (r, path)
        assert torch.equal(one_lse[0, :, 0], lse[0, :, r]), (r, path)


def test_tree_depths():
    tree = ht.Tree.from_parents([-1, 0, 0, 1, 1, 2, 5, 3])
    assert torch.equal(tree_depths(tree.ancestor_mask), tree.depths)
    assert torch.equal(tree_depths(causal(5)), torch.arange(5))
    both = torch.stack([tree.ancestor_mask, causal(8)])
    assert torch.equal(tree_depths(both), torch.stack([tree.depths, torch.arange(8)]))
    two_at_depth_1 = tree.ancestor_mask.clone()
    two_at_depth_1[3, 2] = True          # node 3 (depth 2) also sees node 2, another depth-1 node
    assert tree_depths(two_at_depth_1) is None
    blind_to_itself = causal(4)
    blind_to_itself[2, 2] = False
    assert tree_depths(blind_to_itself) is None


def test_runs_only_for_shallow_bf16_trees_on_cpu():
    q = torch.zeros(1, EXACT_BLOCK + 2, 6, 16, dtype=BF16)
    assert RowExactCPUPlan.runs(q[:, :EXACT_BLOCK + 1], causal(EXACT_BLOCK + 1)) is not None  # depth 32
    assert RowExactCPUPlan.runs(q, causal(EXACT_BLOCK + 2)) is None                           # depth 33
    assert RowExactCPUPlan.runs(q[:, :3].float(), causal(3)) is None
    assert RowExactCPUPlan.runs(q[:, :3], torch.ones(3, 3, dtype=torch.bool)) is None          # not a tree


# Row-exact bf16 rests on oneDNN's bf16 kernels; CPUs without them (AVX2 only) decode in fp32.
needs_bf16_kernels = pytest.mark.skipif(not prepack_supported(torch.device("cpu"), torch.bfloat16),
                                        reason="this CPU lacks oneDNN's bf16 kernels (avx512_bf16 or AMX)")


@needs_bf16_kernels
@pytest.mark.parametrize("prepack", [False, True])
@pytest.mark.parametrize("n_in", [LONE_ROW_MAX_K // 2, 1536])
def test_a_lone_row_gets_its_bits_among_others(prepack, n_in):
    """Row-exact linear layers: one row alone gives the bits it gets among others (bf16)."""
    torch.manual_seed(n_in)
    lin = Linear(n_in, 576, bias=False, dtype=BF16)
    lin.weight.data.normal_(0.0, 0.03)
    lin.prepack, lin.row_exact = prepack, True
    x = (torch.randn(40, 1, n_in) * 3).to(BF16)
    with torch.no_grad():
        among = lin(x)
        alone = torch.cat([lin(x[i:i + 1]) for i in range(40)])
    assert torch.equal(alone, among)


def exact_model(hidden_dim: int = 1152) -> Transformer:
    """A random bf16 model whose down projection has more inputs than LONE_ROW_MAX_K."""
    config = ModelConfig(vocab_size=101, dim=64, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=16,
                         hidden_dim=hidden_dim, max_seq_len=128, tie_embeddings=True, name="random")
    model = Transformer.from_config(config, dtype=BF16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    model.set_row_exact()
    return model


@needs_bf16_kernels
@pytest.mark.parametrize("prepack", [False, True])
@torch.no_grad()
def test_tree_pass_gives_the_logits_of_plain_passes(prepack):
    """Each node of a tree pass: the logits of plain one-token passes along its path, bit for bit."""
    torch.manual_seed(1)
    model = exact_model()
    model.prepack_linears(prepack)
    tree = ht.Tree.from_parents([-1, 0, 0, 1, 1, 2, 5, 3, 0])
    n = 61  # nodes at positions 61-64: the deepest one's keys split at 32, the others' at 0
    prompt, nodes = torch.randint(0, 101, (1, n)), torch.randint(0, 101, (1, tree.size))
    cache = model.new_cache(1, 80)
    model(prompt, torch.arange(n)[None], cache, causal(n))
    cache.lengths.fill_(n)
    snapshot = KVCache(cache.k.clone(), cache.v.clone(), cache.lengths.clone())
    logits = model(nodes, n + tree.depths[None], cache, tree.ancestor_mask)
    for j, path in enumerate(paths(tree.ancestor_mask)):
        c = KVCache(snapshot.k.clone(), snapshot.v.clone(), snapshot.lengths.clone())
        for node in path:
            step = model(nodes[:, node:node + 1], c.lengths[:, None].long(), c, causal(1))
            c.lengths += 1
        assert torch.equal(step[0, 0], logits[0, j]), (j, path)


def test_row_exact_needs_a_cpu_bf16_model():
    config = ModelConfig(vocab_size=101, dim=64, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=16,
                         hidden_dim=1152, max_seq_len=128, tie_embeddings=True, name="random")
    model = Transformer.from_config(config, dtype=torch.float32)
    with pytest.raises(ValueError, match="bf16"):
        model.set_row_exact()
    with pytest.raises(ValueError, match="bf16"):
        ht.HiddenTransferDecoder(model, None, exact=True)


@pytest.fixture(scope="module")
def smol_bf16():
    return ht.load_model("smollm2-135m", dtype=BF16)


@needs_bf16_kernels
@needs_smollm2
def test_smollm2_bf16_decoding_gives_plain_tokens_exactly(smol_bf16):
    """Shipped maps, a 6-node dynamic tree: hidden transfer's greedy tokens are plain decoding's, a ragged
    batch's too; one prompt under 33 tokens (its prefill is row-exact too), the others longer."""
    tok = smol_bf16.tokenizer
    texts = ["Write a short poem about the sea.", "What is 17 times 23? Explain step by step.",
             "Translate into French: the cat sleeps on the warm windowsill."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                       return_dict=False) for t in texts]
    prompts.append(tok.encode("The three primary colours are"))
    assert min(map(len, prompts)) < EXACT_BLOCK and max(map(len, prompts)) > EXACT_BLOCK
    dec = ht.HiddenTransferDecoder(smol_bf16, tree="dynamic", budget=6, n_chains=2, exact=True)
    for ids in prompts:
        ht_out, ar_out = dec.generate([ids], max_new_tokens=48), dec.generate_ar([ids], max_new_tokens=48)
        assert ht_out.sequences == ar_out.sequences
        assert len(ht_out.accept_lengths[0]) < 40  # drafts were accepted: the tree rows were used
    batch = dec.generate(prompts[:2], max_new_tokens=24).sequences
    assert batch == dec.generate_ar(prompts[:2], max_new_tokens=24).sequences


@needs_bf16_kernels
def test_plain_answers_leave_the_model_as_it_runs():
    """Training's answers (`train.data.synthesize`) keep the model's execution settings."""
    from ht_kernels.train.data import synthesize

    model = exact_model()
    model.prepack_linears(False)
    synthesize(model, [[1, 2, 3]], max_new_tokens=2)
    assert model.row_exact and not model.prepacked


def test_row_exact_needs_onednn_bf16_kernels(monkeypatch):
    """On a CPU without oneDNN's bf16 kernels (AVX2 only), exact mode is refused, not crashed into."""
    import ht_kernels.cpu as cpu

    config = ModelConfig(vocab_size=101, dim=64, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=16,
                         hidden_dim=128, max_seq_len=128, tie_embeddings=True, name="random")
    model = Transformer.from_config(config, dtype=BF16)
    monkeypatch.setattr(cpu, "prepack_supported", lambda device, dtype: False)
    with pytest.raises(ValueError, match="oneDNN's bf16 kernels"):
        model.set_row_exact()
