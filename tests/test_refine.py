"""The root refiner: it starts as the identity on the drafts, re-ranks only the top candidates keeping their
mass, its features are the drafts of the decoder's anchors with the right roots and targets, and it learns
a dependence of the next tokens on the root that the drafts cannot see."""
from __future__ import annotations

import torch
from test_decode import random_transfer, tiny_model
from test_train import _examples

from ht_kernels.drafts.drafters import drafter_from_weights
from ht_kernels.drafts.examples import collate
from ht_kernels.drafts.forced import anchor_positions, frozen_pass
from ht_kernels.drafts.refine import RootRefiner
from ht_kernels.train.refine import fit_refiner, refiner_features, refiner_stats


def test_untrained_refiner_keeps_the_drafts_and_a_trained_one_only_moves_the_top_candidates():
    torch.manual_seed(0)
    V, D, K, top = 50, 16, 3, 5
    states, root = torch.randn(4, K, D), torch.randint(0, V, (4,))
    embed, head = torch.randn(V, D), torch.randn(V, D)
    logp = (states @ head.T).log_softmax(-1)                                     # the drafts of these states
    ref = RootRefiner(K, D, rank=8, top=top)
    torch.testing.assert_close(ref(logp, states, root, embed, head), logp)  # up = 0: unchanged (within fp32)
    with torch.no_grad():
        ref.up.normal_()
    out = ref(logp, states, root, embed, head)
    cand = logp.topk(top, -1).indices
    moved = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, cand, True)
    assert torch.equal(out[~moved], logp[~moved]) and not torch.allclose(out[moved], logp[moved])
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(4, K))              # still distributions
    z = ref.logits(states, embed[root], head, cand)                               # the fp64 formula
    s = states.double() + torch.einsum("bkr,krd->bkd", torch.nn.functional.silu(torch.einsum(
        "bki,kir->bkr", torch.cat([states, embed[root][:, None].expand(4, K, D)], -1).double(), ref.down.double())),
        ref.up.double())
    torch.testing.assert_close(z.double(), torch.einsum("bkd,bkmd->bkm", s, head[cand].double()), rtol=1e-5, atol=1e-4)


def test_features_are_the_drafts_of_every_anchor_with_its_next_token_as_root():
    model = tiny_model(vocab=32)
    drafter = drafter_from_weights(random_transfer(model, K=2))
    data = _examples(model, n=3)
    f = refiner_features(model, drafter, data, top=4, teacher_top_k=8)
    n = sum(len(e.tokens) - 1 - e.start for e in data)
    assert f["states"].shape == (n, 2, 64) and f["cand"].shape == f["target"].shape == (n, 2, 4)
    assert torch.equal(f["root"], torch.tensor([x for e in data for x in e.tokens[e.start + 1:]]))
    tokens, lengths, starts = collate(data, "cpu")
    with torch.no_grad():
        frozen = frozen_pass(model, tokens, drafter.layer, 8)
        want = drafter(model, frozen, anchor_positions(lengths, starts, tokens.shape[1]))
    torch.testing.assert_close(f["states"][:len(data[0].tokens) - 1 - data[0].start], want[0, :len(data[0].tokens) - 1 - data[0].start])
    sums = f["target"].sum(-1)
    assert ((sums - 1).abs() < 1e-5).logical_or(sums == 0).all()
    assert (f["teacher_best"][-1, 1] == -1) and (f["teacher_best"][:, 0] >= 0).all()  # past the row: no target


def test_refiner_learns_what_the_root_decides():
    """Synthetic features: the target is a token the root decides (3 r + 1 mod V), placed at random among
    the candidates, which the drafts' states do not carry; refinement lifts top-1 from the drafts' ~1/4
    to near 1."""
    torch.manual_seed(0)
    model = tiny_model(vocab=32)
    n, top, D = 4000, 4, 64
    root = torch.randint(0, 32, (n,))
    best = (3 * root + 1) % 32
    others = torch.stack([torch.randperm(31)[:top - 1] for _ in range(n)])
    others = others + (others >= best[:, None])                                   # any tokens but best
    cand = torch.cat([best[:, None], others], 1)
    cand = cand.gather(1, torch.rand(n, top).argsort(1))[:, None]                 # [n, 1, top], shuffled
    f = {"states": torch.randn(n, 1, D), "root": root, "cand": cand,
         "target": (cand == best[:, None, None]).float(), "teacher_best": best[:, None]}
    before = refiner_stats(None, model, f)["top1"][0]
    ref = fit_refiner(model, f, rank=32, steps=300, batch_size=256, lr=3e-3)
    after = refiner_stats(ref, model, f)
    assert 0.15 < before < 0.35 and after["top1"][0] > 0.9 and after["reach"] == [1.0]


def test_decoder_refines_the_drafts_of_every_step_with_its_root(monkeypatch):
    """The first step's tree is chosen from the prefill's drafts refined with the prefill's root, and
    every later one from refined drafts too; the output stays plain decoding's. (Without the context
    lookup, whose guesses would be mixed into the drafts the tree sees wherever the root recurs.)"""
    from test_train import with_refiner

    from ht_kernels.decode.decoder import HiddenTransferDecoder
    from ht_kernels.decode.trees import TreePolicy

    model = tiny_model(vocab=32)
    dec = HiddenTransferDecoder(model, with_refiner(random_transfer(model)), lookup=0.0)
    seen, choose = [], TreePolicy.choose
    monkeypatch.setattr(TreePolicy, "choose", lambda self, root, drafts: seen.append((root.clone(), drafts.clone()))
                        or choose(self, root, drafts))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    out = dec.generate(prompts, max_new_tokens=6, eos_token_id=())
    assert out.sequences == dec.generate_ar(prompts, max_new_tokens=6, eos_token_id=()).sequences
    with torch.no_grad():
        logits, drafts, states = dec._prefill(prompts, model.new_cache(2, 64), draft=True)
    root = logits.argmax(-1)
    assert torch.equal(seen[0][0], root) and len(seen) > 1
    torch.testing.assert_close(seen[0][1], dec._refine(drafts, states, root))
    assert not torch.allclose(seen[0][1], drafts)


def test_cli_writes_the_maps_with_a_refiner_that_the_decoder_loads(tmp_path, monkeypatch, capsys):
    import json

    import ht_kernels.loading
    import ht_kernels.train.dataset
    from ht_kernels.decode.decoder import HiddenTransferDecoder
    from ht_kernels.decode.transfer import TransferWeights
    from ht_kernels.train.refine import main

    model = tiny_model(vocab=32)
    random_transfer(model, K=2).save(tmp_path / "maps.safetensors")
    data = _examples(model, n=6)
    monkeypatch.setattr(ht_kernels.loading, "load_model", lambda name, dtype, device: model)
    monkeypatch.setattr(ht_kernels.train.dataset, "load", lambda path, tok, part: data[:4] if part == "train" else data[4:])
    assert main(["--maps", str(tmp_path / "maps.safetensors"), "--dataset", "d", "--out", str(tmp_path / "r.safetensors"),
                 "--rank", "4", "--top", "3", "--steps", "5", "--batch-size", "16"]) == 0
    stats = json.loads(capsys.readouterr().out.rsplit("wrote", 1)[0])
    assert stats["anchors"] == sum(len(e.tokens) - 1 - e.start for e in data[:4])
    assert len(stats["after"]["top1"]) == 2 and stats["before"]["reach"] == stats["after"]["reach"]
    w = TransferWeights.load(tmp_path / "r.safetensors")
    assert w.refine[0].shape == (2, 128, 4) and w.refine[2] == 3 and "refine_recipe" in w.meta
    assert HiddenTransferDecoder(model, w).refiner.top == 3
    # --features keeps the features: a second fit reads them instead of running the model
    argv = ["--maps", str(tmp_path / "maps.safetensors"), "--dataset", "d", "--out", str(tmp_path / "f.safetensors"),
            "--rank", "4", "--top", "3", "--steps", "5", "--batch-size", "16", "--features", str(tmp_path / "f.pt")]
    assert main(argv) == 0 and (tmp_path / "f.pt").exists()
    first = json.loads(capsys.readouterr().out.rsplit("wrote", 1)[0])
    monkeypatch.setattr(ht_kernels.train.dataset, "load", lambda path, tok, part: 1 / 0)
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out.rsplit("wrote", 1)[0])
    assert {k: again[k] for k in ("before", "after", "anchors")} == {k: first[k] for k in ("before", "after", "anchors")}
    assert main(argv[:9] + ["4"] + argv[10:]) == 2
    assert "--top 3 then, 4 now" in capsys.readouterr().err
