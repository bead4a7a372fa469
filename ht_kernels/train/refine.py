"""Training the root refiner (`drafts.refine`) of trained draft heads, which stay frozen.

    python -m ht_kernels.train.refine --maps transfer.safetensors --dataset datasets/smollm2-135m
        --out refined.safetensors [--examples 2000] [--rank 128] [--top 32] [--steps 2000] [--threads 2]
        [--features feats.pt]

`refiner_features` runs the frozen model and the drafter once over the examples and keeps, per anchor,
what the refiner sees and learns: the drafts' LM-head inputs, the next root (the token after the
anchor), each depth's top candidates and the teacher's probability of each candidate (the frozen
model's top-k distribution at the drafted position). `fit_refiner` then trains on these features
alone, so epochs cost a small fraction of a pass through the model; `--features` keeps them in a file,
so refiners of other ranks or step counts are fitted without the model pass. The loss is the cross-entropy of
the refined distribution over the candidates against the teacher's, renormalised over them (drafts
whose candidates hold none of the teacher's top-k mass are left out).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from ..drafts.examples import Example, collate
from ..drafts.forced import anchor_positions, drafter_pass
from ..drafts.refine import RootRefiner
from .cli import add_frozen_args, check_out_file, float_in, int_in, load_frozen, path_arg, run_main
from .objective import anchor_mask


@torch.no_grad()
def refiner_features(model, drafter, examples: list[Example], top: int = 32, teacher_top_k: int = 32,
                     batch_size: int = 4, chunk: int = 1024) -> dict[str, torch.Tensor]:
    """-> states [n, K, D] (model dtype), root [n], cand [n, K, top], target [n, K, top] (fp32, rows sum
    to 1 or 0), teacher_best [n, K] (the teacher's argmax) for the n trained anchors of the examples."""
    W = model.output.weight
    out = {k: [] for k in ("states", "root", "cand", "target", "teacher_best")}
    for s in range(0, len(examples), batch_size):
        tokens, lengths, starts = collate(examples[s:s + batch_size], model.device)
        anchors = anchor_positions(lengths, starts, tokens.shape[1])                     # [B, A]
        frozen = drafter_pass(model, drafter, tokens, teacher_top_k, starts + 1, anchors.shape[1])
        B, A = anchors.shape
        K = drafter.weight.shape[0]
        keep = anchor_mask(lengths, starts, anchors, 1)[..., 0]                         # [B, A]: root inside
        states = drafter(model, frozen, anchors)[keep]                                  # [n, K, D]
        N = tokens.shape[1]
        rows = torch.arange(B, device=tokens.device)[:, None]
        root = tokens[rows, (anchors + 1).clamp_max(N - 1)][keep]                        # [n]
        pos = (anchors[..., None] + torch.arange(1, K + 1, device=tokens.device)).clamp_max(N - 1)
        inside = (anchors[..., None] + torch.arange(1, K + 1, device=tokens.device) < lengths[:, None, None])[keep]
        p, idx = (x[keep] for x in frozen.teacher(rows[..., None], pos))
        flat = states.reshape(-1, states.shape[-1])
        cand = torch.cat([(flat[c:c + chunk] @ W.T).topk(top, dim=-1).indices for c in range(0, len(flat), chunk)])
        cand = cand.view(*states.shape[:2], top)                                        # [n, K, top]
        target = ((cand[..., :, None] == idx[..., None, :]) * p[..., None, :]).sum(-1) * inside[..., None]
        out["states"].append(states)
        out["root"].append(root)
        out["cand"].append(cand)
        out["target"].append(target / target.sum(-1, keepdim=True).clamp_min(1e-12))
        out["teacher_best"].append(torch.where(inside, idx[..., 0], -1))
    return {k: torch.cat(v) for k, v in out.items()}


def refiner_stats(refiner: RootRefiner | None, model, f: dict[str, torch.Tensor], chunk: int = 4096) -> dict:
    """Per depth: top-1 of the teacher's argmax among the drafts before (refiner None) or after
    refinement, and the share of drafts whose candidates hold it (the most refinement can reach)."""
    K = f["cand"].shape[1]
    hit, reach, n = torch.zeros(K), torch.zeros(K), torch.zeros(K)
    with torch.no_grad():
        for c in range(0, len(f["root"]), chunk):
            cand, best = f["cand"][c:c + chunk], f["teacher_best"][c:c + chunk]
            if refiner is None:
                pick = cand[..., 0]
            else:
                z = refiner.logits(f["states"][c:c + chunk], model.tok_embeddings.weight[f["root"][c:c + chunk]],
                                   model.output.weight, cand)
                pick = cand.gather(-1, z.argmax(-1, keepdim=True))[..., 0]
            valid = best >= 0
            hit += ((pick == best) & valid).sum(0)
            reach += ((cand == best[..., None]).any(-1) & valid).sum(0)
            n += valid.sum(0)
    n = n.clamp_min(1)
    return {"top1": (hit / n).tolist(), "reach": (reach / n).tolist(), "drafts": n.long().tolist()}


def fit_refiner(model, f: dict[str, torch.Tensor], rank: int = 128, steps: int = 2000, batch_size: int = 512,
                lr: float = 2e-3, weight_decay: float = 0.0, seed: int = 0, progress=None) -> RootRefiner:
    """A RootRefiner trained on features f (`refiner_features`) with AdamW and cosine decay."""
    K, top = f["cand"].shape[1:]
    D = f["states"].shape[-1]
    torch.manual_seed(seed)
    refiner = RootRefiner(K, D, rank, top)
    opt = torch.optim.AdamW(refiner.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = len(f["root"])
    embed, head = model.tok_embeddings.weight, model.output.weight
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, steps))))
        i = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        z = refiner.logits(f["states"][i].float(), embed[f["root"][i]].float(), head, f["cand"][i])
        target = f["target"][i]
        loss = -(target * z.log_softmax(-1)).sum() / target.sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step, loss.item())
    return refiner


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m ht_kernels.train.refine", description=__doc__.splitlines()[0])
    add_frozen_args(p, "the maps with the refiner (safetensors)")
    p.add_argument("--examples", type=int_in(1), default=2000, help="training conversations whose features are made")
    p.add_argument("--held-out", type=int_in(1), default=48)
    p.add_argument("--rank", type=int_in(1), default=128)
    p.add_argument("--top", type=int_in(1), default=32, help="candidates re-ranked per depth")
    p.add_argument("--steps", type=int_in(1), default=2000)
    p.add_argument("--batch-size", type=int_in(1), default=512, help="anchors per step")
    p.add_argument("--lr", type=float_in(0.0, 1.0), default=2e-3)
    p.add_argument("--weight-decay", type=float_in(0.0), default=0.0)
    p.add_argument("--features", type=path_arg,
                   help="a file that keeps the features: read when it is there (made with the same arguments), else written")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    from dataclasses import replace

    from ..drafts.drafters import drafter_from_weights
    from .dataset import load

    check_out_file("--out", args.out)
    model, weights = load_frozen(args)
    V, D = model.config.vocab_size, model.config.dim
    if args.top > V or args.rank > 2 * D:
        raise ValueError(f"--top must be at most the model's {V} tokens and --rank at most 2 * dim = {2 * D}, got "
                         f"--top {args.top} and --rank {args.rank}")
    drafter = drafter_from_weights(replace(weights, refine=None)).to(model.device)
    t0 = time.time()
    # the features depend on these alone: a --features file made from others is refused
    recipe = {"maps": hashlib.sha256(Path(args.maps).read_bytes()).hexdigest(), "dataset": str(Path(args.dataset)),
              "examples": args.examples, "held_out": args.held_out, "top": args.top, "model": args.model,
              "dtype": args.dtype}
    if args.features and os.path.exists(args.features):
        try:
            kept = torch.load(args.features)
            theirs, train_f, held_f = json.loads(kept["recipe"]), kept["train"], kept["held_out"]
        except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as e:
            raise ValueError(f"--features {args.features} is not a features file of this command: "
                             f"{type(e).__name__}: {e}") from None
        if theirs != recipe:
            diff = "; ".join(f"--{k.replace('_', '-')} {theirs.get(k)} then, {v} now" for k, v in recipe.items()
                             if theirs.get(k) != v)
            raise ValueError(f"--features {args.features} was made with other arguments: {diff}")
    else:
        train_f = refiner_features(model, drafter, load(args.dataset, model.tokenizer, "train")[:args.examples],
                                   args.top)
        held = load(args.dataset, model.tokenizer, "held-out")[:args.held_out]
        if not held:
            raise ValueError(f"--dataset {args.dataset} has no held-out conversations to measure on")
        held_f = refiner_features(model, drafter, held, args.top)
        if args.features:
            torch.save({"recipe": json.dumps(recipe), "train": train_f, "held_out": held_f}, args.features)
    t_feat = time.time() - t0
    refiner = fit_refiner(model, train_f, args.rank, args.steps, args.batch_size, args.lr, args.weight_decay)
    stats = {"before": refiner_stats(None, model, held_f), "after": refiner_stats(refiner, model, held_f),
             "train_after": refiner_stats(refiner, model, train_f), "anchors": len(train_f["root"]),
             "feature_seconds": round(t_feat), "fit_seconds": round(time.time() - t0 - t_feat)}
    print(json.dumps(stats, indent=1))
    meta = {**weights.meta, "refine_recipe": " ".join(["python -m ht_kernels.train.refine", *argv]),
            "refine_held_out_top1": json.dumps([round(x, 4) for x in stats["after"]["top1"]])}
    refine = (refiner.down.detach().cpu().half(), refiner.up.detach().cpu().half(), args.top)
    if not all(torch.isfinite(t).all() for t in refine[:2]):
        raise ValueError(f"the refiner's weights are not finite in fp16: the fit diverged, lower --lr ({args.lr})")
    replace(weights, meta=meta, refine=refine).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
