"""The cost of a trained draft: one training step of the draft heads on a dataset batch, by phase.

    python benchmarks/bench_train_step.py [--dataset datasets/smollm2-135m] [--batch-size 8] [--layer 20]
        [--method transfer|medusa] [--reps 3] [--dtype bfloat16] [--threads 2] [--json PATH]

The batch is the first --batch-size conversations of the dataset's training part (its prompts are rebuilt
from the installed sources, docs/DATA.md). Each rep runs a whole step as `train.trainer.train` does: the
frozen pass (all layers over prompt + answer, the teacher's top-k at the trained targets), the drafter's
forward over every trained anchor, the distillation loss (LM head, chunked) and the backward pass; the
table gives the median seconds of each phase and the trained drafts (anchor x depth) per second.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from ht_kernels.drafts.examples import collate
from ht_kernels.drafts.forced import anchor_positions, drafter_pass
from ht_kernels.loading import load_model
from ht_kernels.train.dataset import load
from ht_kernels.train.objective import anchor_mask, distill_loss
from ht_kernels.train.trainer import TrainConfig, make_drafter, n_trained
from ht_kernels.train.cli import int_in, path_arg, run_main, threads_arg
from _harness import check_outputs, header

PHASES = ("frozen", "drafter", "loss", "backward")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", type=path_arg, default="datasets/smollm2-135m")
    p.add_argument("--batch-size", type=int_in(1), default=8)
    p.add_argument("--layer", type=int_in(1), default=20)
    p.add_argument("--method", choices=["transfer", "medusa"], default="transfer")
    p.add_argument("--reps", type=int_in(1), default=3)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--threads", type=threads_arg)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    check_outputs(json=args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=getattr(torch, args.dtype))
    head = header(model.device, model.dtype)
    print(head)
    cfg = TrainConfig(method=args.method, layer=args.layer, batch_size=args.batch_size)
    cfg.check(model.config)
    drafter = make_drafter(cfg, model).to(model.device)
    batch = load(args.dataset, model.tokenizer, "train")[:args.batch_size]
    depth_w = torch.tensor([cfg.depth_decay ** i for i in range(cfg.K)], device=model.device)
    drafts = n_trained(batch, cfg.K)
    times = {k: [] for k in PHASES}
    for rep in range(args.reps + 1):  # rep 0 warms up
        t = [time.perf_counter()]
        tokens, lengths, starts = collate(batch, model.device)
        anchors = anchor_positions(lengths, starts, tokens.shape[1])
        frozen = drafter_pass(model, drafter, tokens, cfg.teacher_top_k, starts + 1, anchors.shape[1])
        t.append(time.perf_counter())
        head_in = drafter(model, frozen, anchors)
        t.append(time.perf_counter())
        loss, _ = distill_loss(model, head_in, frozen, anchors, anchor_mask(lengths, starts, anchors, cfg.K), depth_w,
                               drafts)
        t.append(time.perf_counter())
        drafter.zero_grad()
        loss.backward()
        t.append(time.perf_counter())
        if rep:
            for k, a, b in zip(PHASES, t, t[1:]):
                times[k].append(b - a)
    med = {k: statistics.median(v) for k, v in times.items()}
    step = sum(med.values())
    print(f"{len(batch)} conversations, {int(tokens.numel())} padded tokens, {drafts} trained drafts; "
          f"{args.method}, layer {drafter.layer if args.method == 'transfer' else '-'}, "
          f"threads {torch.get_num_threads()}")
    for k in PHASES:
        print(f"{k:>9}: {med[k]:6.2f} s  {100 * med[k] / step:4.1f}%")
    print(f"     step: {step:6.2f} s  {drafts / step:.0f} trained drafts/s")
    result = {**head, "threads": torch.get_num_threads(), "method": args.method, "conversations": len(batch),
              "drafts": drafts, "seconds": {k: round(v, 3) for k, v in med.items()}, "step_s": round(step, 3),
              "drafts_per_s": round(drafts / step, 1)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(run_main(main))
