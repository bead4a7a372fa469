"""What the command lines of the trained drafts' add-ons (`refine`, `calibrate`) share: the frozen model's
arguments, its loading, and the maps' file."""
from __future__ import annotations

import argparse

import torch


def add_frozen_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """--maps, --dataset, --out (out_help), --model, --dtype, --device, --threads."""
    p.add_argument("--maps", required=True, help="trained transfer maps (safetensors)")
    p.add_argument("--dataset", required=True, help="a dataset of python -m ht_kernels.train.dataset")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)


def load_frozen(args: argparse.Namespace):
    """-> (the frozen model, the maps of --maps) after setting --threads."""
    from ..decode.transfer import TransferWeights
    from ..loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    return model, TransferWeights.load(args.maps)
