"""Benchmark ht_kernels.hidden_transfer against a plain PyTorch matmul of the same math.

pseudo[n, i, :] = hidden[n] @ weight[i].T + bias[i] for N hidden states of width D and K maps.

    python benchmarks/bench_hidden_transfer.py [--quick] [--json PATH] [--device D] [--dtype T]
"""
from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F

import ht_kernels as ht
from ht_kernels.train.cli import run_main
from _harness import Skip, copy_gb_per_s, parse_args, run

QUICK_HELP = "small CPU-friendly set: N in {1, 16, 256}, K in {3, 5}, D 576 (fp32 on CPU unless --dtype)"


def cases(quick: bool) -> list[dict]:
    grid = itertools.product([576], [3, 5], [1, 16, 256]) if quick else \
        itertools.product([576, 4096], [3, 4, 5], [1, 16, 64, 128, 256, 1024])
    return [dict(D=D, K=K, N=N) for D, K, N in grid]


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], QUICK_HELP, argv=argv)
    dev, dtype = args.device, args.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()

    def setup(case: dict) -> dict:
        N, K, D = case["N"], case["K"], case["D"]
        torch.manual_seed(0)
        return dict(hidden=torch.randn(N, D, device=dev, dtype=dtype),
                    weight=torch.randn(K, D, D, device=dev, dtype=dtype) / D**0.5,
                    bias=torch.randn(K, D, device=dev, dtype=dtype))

    def backend(name: str, cuda_only: bool = False):
        def make(x: dict):
            if cuda_only and dev.type != "cuda":
                raise Skip("CUDA only: under TRITON_INTERPRET=1 on CPU it is far too slow to time")
            return lambda: ht.hidden_transfer(x["hidden"], x["weight"], x["bias"], backend=name)
        return make

    def matmul(x: dict):
        # The K maps stacked into one [K*D, D] weight: a single GEMM with the bias fused (addmm).
        K, D = x["bias"].shape
        weight, bias = x["weight"].view(K * D, D), x["bias"].view(K * D)
        return lambda: F.linear(x["hidden"], weight, bias).view(-1, K, D)

    def gb_per_s(case: dict, us: float) -> float:
        # Weight and bias read once, hidden read once, the [N, K, D] output written once.
        N, K, D = case["N"], case["K"], case["D"]
        return (K * D * D + K * D + N * D + N * K * D) * itemsize / us / 1e3

    def tflop_per_s(case: dict, us: float) -> float:
        return 2 * case["N"] * case["K"] * case["D"] ** 2 / us / 1e6

    metrics = {"GB/s": gb_per_s, "TFLOP/s": tflop_per_s}
    if dev.type == "cuda":  # the target: reading W at a fraction of what a device-to-device copy achieves
        copy_gbs = copy_gb_per_s(dev)
        metrics["% copy"] = lambda case, us: 100 * gb_per_s(case, us) / copy_gbs
    providers = {"torch": backend("torch"), "matmul": matmul, "auto": backend("auto"),
                 "triton": backend("triton", cuda_only=True), "cuda": backend("cuda")}
    run(args, cases(args.quick), setup, providers, reference="torch", baseline="matmul",
        metrics=metrics)


if __name__ == "__main__":
    sys.exit(run_main(main))
