"""Calibrated draft scores: the fit recovers a known logistic law, the samples label each candidate with
the token its depth predicts, a calibration reweighs the depths of a dynamic tree (keeping the ranks
within a depth and the tree prefix-closed), travels with the maps, and decoding stays lossless."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from test_decode import PROMPTS, assert_same_greedy, random_transfer, tiny_model
from test_train import _examples

from ht_kernels.decode.decoder import HiddenTransferDecoder
from ht_kernels.decode.transfer import TransferWeights
from ht_kernels.decode.trees import TreePolicy
from ht_kernels.train.calibrate import calibration_samples, fit_calibration


def test_fit_recovers_a_known_logistic_law():
    g = torch.Generator().manual_seed(0)
    truth = torch.tensor([[1.7, 1.9], [1.2, 0.9], [0.6, -0.5]])
    x = -8 * torch.rand(20000, 3, 4, generator=g)
    hit = torch.rand(x.shape, generator=g) < torch.sigmoid(truth[:, 0, None] * x + truth[:, 1, None])
    valid = torch.rand(20000, 3, generator=g) < 0.9
    got = fit_calibration(x, hit, valid)
    torch.testing.assert_close(got, truth, atol=0.08, rtol=0.05)


def test_samples_label_the_token_each_depth_predicts():
    V, K, n = 10, 2, 5
    nxt = torch.tensor([3, 4, 5, 6, 7])
    logp = (-20.0 - 0.1 * torch.arange(V).float()).expand(n, K, V).clone()  # no ties among the rest
    for j in range(n):
        logp[j, 0, (j + 7) % V] = -0.1          # depth 1 predicts nxt[j + 1] = j + 4: right only at j = 2
        logp[j, 1, (j + 5) % V] = -0.2          # depth 2 predicts nxt[j + 2] = j + 5: always right
    logp[2, 0, 6] = -1.0                        # anchor 2's depth-1 rank 1 is right too
    x, hit, valid = calibration_samples(logp, nxt, width=2)
    assert x.shape == hit.shape == (n, K, 2) and valid.shape == (n, K)
    # depth 1: target nxt[j + 1] inside for j < 4; depth 2: nxt[j + 2] for j < 3, and only where the
    # depth-1 target was among the candidates (a tree could hold the path)
    d1_hit = [bool(hit[j, 0].any()) for j in range(n)]
    assert d1_hit == [False, False, True, False, False] and hit[2, 0].tolist() == [False, True]
    assert valid[:, 0].tolist() == [True, True, True, True, False]
    assert valid[:, 1].tolist() == [False, False, True, False, False]
    assert hit[2, 1].tolist() == [True, False]


def test_calibration_reweighs_the_depths_of_a_dynamic_tree():
    V = 12
    logp = torch.full((1, 2, V), -30.0)
    logp[0, 0, 3], logp[0, 0, 4], logp[0, 1, 7] = math.log(0.9), math.log(0.08), math.log(0.3)
    root = torch.tensor([1])
    raw = TreePolicy(2, None, budget=3).choose(root, logp)          # (0,) and its child (0, 0): -0.1 - 1.2
    assert raw.tokens.tolist() == [[1, 3, 7]] and raw.parents.tolist() == [[-1, 0, 1]]
    cal = torch.tensor([[1.0, 0.0], [1.0, -5.0]])                    # depth-2 drafts are worth far less
    tree = TreePolicy(2, None, budget=3, calibration=cal).choose(root, logp)
    assert tree.tokens.tolist() == [[1, 3, 4]] and tree.parents.tolist() == [[-1, 0, 0]]
    assert torch.allclose(tree.scores[0, 1:], torch.nn.functional.logsigmoid(logp[0, 0, [3, 4]]))
    # any calibration keeps a big tree prefix-closed and the ranks within a depth
    g = torch.Generator().manual_seed(1)
    drafts = (3 * torch.randn(4, 3, 50, generator=g)).log_softmax(-1)
    for cal in (torch.tensor([[0.5, 3.0], [2.0, -1.0], [1.0, 0.0]]), torch.tensor([[3.0, -4.0], [0.3, 2.0], [1.0, 9.0]])):
        t = TreePolicy(3, None, budget=24, calibration=cal).choose(torch.zeros(4, dtype=torch.long), drafts)
        for b in range(4):
            p = t.parents[b].tolist()
            assert all(0 <= p[i] < i and t.depths[b, i] == t.depths[b, p[i]] + 1 for i in range(1, len(p)))
            assert all(t.scores[b, i] < t.scores[b, p[i]] for i in range(1, len(p)))


@pytest.mark.parametrize("cal,match", [(torch.ones(2, 2), "calibration"), (torch.ones(3, 3), "calibration"),
                                       (torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]), "a > 0"),
                                       (torch.tensor([[1.0, 0.0], [1.0, float("nan")], [1.0, 0.0]]), "finite")])
def test_bad_calibration_is_rejected(cal, match):
    with pytest.raises(ValueError, match=match):
        TreePolicy(3, None, calibration=cal)
    model = tiny_model()
    with pytest.raises(ValueError, match="calibration"):
        HiddenTransferDecoder(model, replace(random_transfer(model), calibration=cal))


def test_calibration_travels_with_the_maps_and_decoding_stays_lossless(tmp_path):
    model = tiny_model()
    cal = torch.tensor([[1.5, 2.0], [1.0, 0.5], [0.8, -0.3]])
    w = replace(random_transfer(model), calibration=cal)
    w.save(tmp_path / "c.safetensors")
    back = TransferWeights.load(tmp_path / "c.safetensors")
    assert torch.equal(back.calibration, cal) and torch.equal(back.first(2).calibration, cal[:2])
    for tree in ("dynamic", None):
        dec = HiddenTransferDecoder(model, back, tree=tree)
        assert torch.equal(dec.tree.calibration, cal)
        plain, out = dec.generate_ar(PROMPTS, max_new_tokens=30), dec.generate(PROMPTS, max_new_tokens=30)
        assert_same_greedy(model, PROMPTS, out.sequences, plain.sequences)


def test_cli_fits_on_the_held_out_part_and_writes_the_calibration(tmp_path, monkeypatch, capsys):
    import ht_kernels.loading
    import ht_kernels.train.dataset
    from ht_kernels.train.calibrate import main

    model = tiny_model(vocab=32)
    random_transfer(model, K=2).save(tmp_path / "maps.safetensors")
    data = _examples(model, n=6)
    parts = []
    monkeypatch.setattr(ht_kernels.loading, "load_model", lambda name, dtype, device: model)
    monkeypatch.setattr(ht_kernels.train.dataset, "load",
                        lambda path, tok, part: parts.append(part) or (data if part == "held-out" else []))
    assert main(["--maps", str(tmp_path / "maps.safetensors"), "--dataset", "d", "--out", str(tmp_path / "c.safetensors"),
                 "--width", "4"]) == 0
    stats = json.loads(capsys.readouterr().out.rsplit("wrote", 1)[0])
    assert parts == ["held-out"] and stats["examples"] == 6 and len(stats["calibration"]) == 2
    w = TransferWeights.load(tmp_path / "c.safetensors")
    assert w.calibration.shape == (2, 2) and bool((w.calibration[:, 0] > 0).all()) and "calibration_recipe" in w.meta
    assert torch.equal(HiddenTransferDecoder(model, w, tree="dynamic").tree.calibration, w.calibration)
