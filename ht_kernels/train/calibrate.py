"""Calibrated draft scores for the dynamic trees (`decode.trees.TreePolicy`), fitted on held-back data.

    python -m ht_kernels.train.calibrate --maps transfer.safetensors --dataset datasets/smollm2-135m
        --out calibrated.safetensors [--examples 86] [--width 8] [--threads 2]

A dynamic tree keeps the nodes whose paths score best, a path scoring the sum of its edges' draft
log-probabilities. Drafts of different depths are not equally confident for their probability (a
depth-1 draft of p = 0.8 is right more often than 0.8), so their sum misjudges which of a deep and a
wide node is worth more. Per depth d, this fits P(the draft is the model's next token | the tokens before
it are among the candidates of theirs) = sigmoid(a_d logp + b_d) (Platt scaling) by maximum likelihood over the top `width` candidates of every
draft of the examples (the held-out part of a dataset, which the maps never trained on), and stores
(a_d, b_d) in the maps (`TransferWeights.calibration`). Drafts are made as decoding makes them: refined
knowing the next root when the maps carry a root refiner.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from .cli import add_frozen_args, check_out_file, int_in, load_frozen, run_main


def calibration_samples(logp: torch.Tensor, nxt: torch.Tensor, width: int = 8):
    """logp: [n, K, V] drafts of anchors 0..n-1 (anchor j's depth-i draft predicts nxt[j + i]); nxt: [n]
    the token after each anchor -> (x [m, K, width] the top candidates' log-probabilities, hit [m, K,
    width] whether each is the token, valid [m, K]: the target is inside the sequence and the tokens
    before it are among their depths' candidates, so that a tree can hold the path to this draft's node)."""
    n, K, _ = logp.shape
    x, idx = logp.float().topk(width, dim=-1)
    pos = torch.arange(n, device=nxt.device)[:, None] + torch.arange(1, K + 1, device=nxt.device)  # [n, K]
    inside = pos < n
    hit = (idx == nxt[pos.clamp_max(n - 1)][..., None]) & inside[..., None]
    parent_held = torch.cat([torch.ones_like(inside[:, :1]), hit.any(-1)[:, :-1].cumprod(-1).bool()], 1)
    return x, hit, inside & parent_held


def fit_calibration(x: torch.Tensor, hit: torch.Tensor, valid: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """x, hit: [m, K, W]; valid: [m, K] -> [K, 2] (a > 0, b) maximising the likelihood of hit under
    sigmoid(a x + b) per depth (L-BFGS on log a and b; x clamped at -30 so that a vanishing draft
    does not dominate)."""
    K = x.shape[1]
    out = torch.zeros(K, 2)
    for d in range(K):
        keep = valid[:, d]
        xd, yd = x[keep, d].clamp_min(-30.0).reshape(-1), hit[keep, d].reshape(-1).float()
        if yd.numel() == 0:
            raise ValueError(f"fit_calibration: no valid drafts of depth {d + 1} (x {list(x.shape)})")
        log_a, b = torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([log_a, b], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(log_a.exp() * xd + b, yd)
            loss.backward()
            return loss
        opt.step(closure)
        out[d] = torch.stack([log_a.exp(), b]).detach()
    return out


def reliability(x: torch.Tensor, hit: torch.Tensor, valid: torch.Tensor, calibration: torch.Tensor | None,
                bins: int = 5) -> list[list[tuple[float, float, int]]]:
    """Per depth and bin of predicted probability (exp(x), or the calibrated sigmoid): (mean predicted,
    observed hit rate, candidates)."""
    rows = []
    for d in range(x.shape[1]):
        keep = valid[:, d]
        xd, yd = x[keep, d].reshape(-1), hit[keep, d].reshape(-1).float()
        p = xd.exp() if calibration is None else torch.sigmoid(calibration[d, 0] * xd.clamp_min(-30) + calibration[d, 1])
        edges = torch.linspace(0, 1, bins + 1)
        b = torch.bucketize(p, edges[1:-1])
        rows.append([(p[b == i].mean().item(), yd[b == i].mean().item(), int((b == i).sum()))
                     for i in range(bins) if (b == i).any()])
    return rows


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m ht_kernels.train.calibrate", description=__doc__.splitlines()[0])
    add_frozen_args(p, "the maps with their calibration (safetensors)")
    p.add_argument("--examples", type=int_in(1), default=86, help="held-out conversations the fit uses")
    p.add_argument("--width", type=int_in(1), default=8, help="candidates per draft (the trees' width)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    from dataclasses import replace

    from ..drafts.drafters import drafter_from_weights
    from ..drafts.forced import draft_logprobs
    from .dataset import load

    check_out_file("--out", args.out)
    model, weights = load_frozen(args)
    if args.width > model.config.vocab_size:
        raise ValueError(f"--width {args.width} is more than the model's {model.config.vocab_size} tokens")
    examples = load(args.dataset, model.tokenizer, "held-out")[:args.examples]
    if not examples:
        raise ValueError(f"--dataset {args.dataset} has no held-out conversations to fit on")
    t0 = time.time()
    drafter = drafter_from_weights(replace(weights, calibration=None)).to(model.device)
    parts = [calibration_samples(logp, nxt.to(logp.device), args.width)
             for logp, nxt in draft_logprobs(model, drafter, examples)]
    x, hit, valid = (torch.cat([p[i].cpu() for p in parts]) for i in range(3))
    calibration = fit_calibration(x, hit, valid)
    stats = {"examples": len(examples), "drafts": int(valid.sum()), "seconds": round(time.time() - t0),
             "calibration": calibration.tolist(), "before": reliability(x, hit, valid, None),
             "after": reliability(x, hit, valid, calibration)}
    print(json.dumps(stats))
    meta = {**weights.meta, "calibration_recipe": " ".join(["python -m ht_kernels.train.calibrate", *argv])}
    replace(weights, meta=meta, calibration=calibration).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
