"""Benchmark the per-step ops of decoding: verify_tree_greedy then compact_kv over every layer's cache.

One call verifies a token tree for every row and moves the accepted nodes' keys/values of all layers to
their committed slots, as the decoder does after each step; the output checked is the key cache.

    python benchmarks/bench_step_ops.py [--quick] [--json PATH] [--device D] [--dtype T]
"""
from __future__ import annotations

import itertools
import sys

import torch

import ht_kernels as ht
from ht_kernels.train.cli import run_main
from _harness import parse_args, run

QUICK_HELP = "small CPU-friendly set: 4 layers, B in {1, 2}, T in {16, 64}, 2 KV heads of 64"


def cases(quick: bool) -> list[dict]:
    grid = itertools.product([4], [1, 2], [16, 64], [2], [64]) if quick else \
        itertools.product([30], [1, 8, 32], [16, 64], [8], [128])
    return [dict(layers=L, B=B, T=T, Hkv=H, D=D) for L, B, T, H, D in grid]


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], QUICK_HELP, argv=argv)
    dev, dtype = args.device, args.dtype

    def setup(case: dict) -> dict:
        L, B, T, H, D = (case[k] for k in ("layers", "B", "T", "Hkv", "D"))
        S = 1024 + T
        torch.manual_seed(0)
        parents = torch.tensor([-1] + [int(torch.randint(max(0, i - 3), i, ())) for i in range(1, T)], device=dev)
        return dict(k=torch.randn(L, B, S, H, D, device=dev, dtype=dtype),
                    v=torch.randn(L, B, S, H, D, device=dev, dtype=dtype),
                    lens=torch.randint(0, 1024, (B,), dtype=torch.int32, device=dev),
                    draft=torch.randint(0, 2, (B, T), device=dev), parents=parents,
                    target=torch.randint(0, 2, (B, T), device=dev))

    def backend(name: str):
        def make(x: dict):
            k, v = x["k"].clone(), x["v"].clone()  # each provider starts from the same caches

            def step():
                accepted, accept_len = ht.verify_tree_greedy(x["draft"], x["parents"], x["target"], backend=name)
                ht.compact_kv(k, v, x["lens"], accepted, accept_len, backend=name)
                return k
            return step
        return make

    run(args, cases(args.quick), setup, {"torch": backend("torch"), "cuda": backend("cuda")},
        reference="torch", baseline="torch", metrics={})


if __name__ == "__main__":
    sys.exit(run_main(main))
