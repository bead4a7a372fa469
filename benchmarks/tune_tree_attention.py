"""Tune the Triton tree-attention kernel's tiles and KV splits on the GPU at hand.

Every candidate of `ht_kernels.triton.tree_attention.TUNE_CANDIDATES`, and kernel_config's own choice
("default"), runs each case with the split-KV heuristic ("auto") and with every count of --splits; each
output (written into a NaN-poisoned buffer) is checked against the torch backend before it is timed.
The ratio column is the default's time over the candidate's. Cases: one decoding step's tree attention
at the shapes of Llama-2-7B (32 KV heads) and Llama-3-8B (8 KV heads), batch 1, 2048 cached tokens and a
16-node tree with 48 pseudo tokens (T 64), and the kernel benchmark's target cases (B 8, L 16384, T 64
and the memory-bound T 16).

    python benchmarks/tune_tree_attention.py [--splits 1,2,4,8,16] [--json PATH] [--case B=1]

On a GPU it ends with the `TUNED` entries (ht_kernels/triton/tree_attention.py) of the fastest correct
tiles per case with the split heuristic, to paste into the table. Without a GPU it runs a small case
under TRITON_INTERPRET=1: a check of every candidate, not a tuning.
"""
from __future__ import annotations

import os

import sys

import torch

from ht_kernels.train.cli import int_in, run_main
from _harness import Skip, parse_args, run
from bench_tree_attention import gb_per_s, make_inputs

CASES = [dict(Hq=32, Hkv=32, B=1, L=2048, T=64, D=128), dict(Hq=32, Hkv=8, B=1, L=2048, T=64, D=128),
         dict(Hq=32, Hkv=8, B=8, L=16384, T=64, D=128), dict(Hq=32, Hkv=8, B=1, L=4096, T=16, D=128),
         dict(Hq=32, Hkv=8, B=8, L=16384, T=16, D=128)]
QUICK = [dict(Hq=4, Hkv=2, B=2, L=70, T=5, D=16)]


def name(config: dict, splits: int | None) -> str:
    tiles = "-".join(f"{k[6:] if k.startswith('BLOCK_') else k[4]}{v}" for k, v in config.items()) or "default"
    return f"{tiles}/{splits or 'auto'}"


def splits_arg(value: str) -> list[int]:
    """--splits: comma-separated KV split counts in [1, 64]."""
    count = int_in(1, 64)
    return [count(s) for s in value.split(",") if s]


def main(argv=None) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    from ht_kernels import tree_attention
    from ht_kernels.triton.tree_attention import TUNE_CANDIDATES, table_key, tree_attention_fwd

    args = parse_args(__doc__.splitlines()[0], "one small case, every candidate checked under the interpreter",
                      lambda p: p.add_argument("--splits", type=splits_arg, default="1,2,4,8,16",
                                               help="KV split counts tried besides the heuristic's"), argv=argv)
    dev, dtype = args.device, args.dtype
    splits = [None] + args.splits

    def setup(case: dict) -> dict:
        B, L, T, Hq, D = (case[k] for k in ("B", "L", "T", "Hq", "D"))
        if dev.type == "cuda" and 6 * B * (L + T) * Hq * D * 2 > torch.cuda.mem_get_info(dev)[0]:
            raise Skip("does not fit in the free device memory")
        return make_inputs(case, dev, dtype)

    def launch(config: dict, num_splits: int | None):
        def make(x: dict):
            out = torch.full_like(x["q"], float("nan"))
            lse = torch.empty(x["q"].shape[0], x["q"].shape[2], x["q"].shape[1], device=dev)
            args_ = (x["q"], x["k_cache"], x["v_cache"], x["cache_seqlens"], x["tree_mask"])
            return lambda: tree_attention_fwd(*args_, num_splits=num_splits, out=out, lse=lse, config=config)[0]
        return make

    def reference(x: dict):
        return lambda: tree_attention(x["q"], x["k_cache"], x["v_cache"], x["cache_seqlens"], x["tree_mask"],
                                      backend="torch")

    providers, tiles = {"torch": reference}, {}
    for config in ({}, *TUNE_CANDIDATES):
        tiles[name(config, None)] = config
        for n in splits:
            providers[name(config, n)] = launch(config, n)

    rows = run(args, QUICK if args.quick else CASES, setup, providers, reference="torch", baseline="default/auto",
               metrics={"GB/s": lambda case, us: gb_per_s(case, us, dtype.itemsize)})
    if dev.type == "cuda":
        print_table_entries(rows, tiles, table_key, 10 * torch.cuda.get_device_capability(dev)[0], dtype)


def print_table_entries(rows: list, tiles: dict, table_key, arch: int, dtype: torch.dtype) -> None:
    """One TUNED entry per table key: the tiles, timed with the split heuristic, whose time over the fastest
    correct tiles' is smallest on average over the key's cases (the rule's choice is said, not entered)."""
    print("\n# TUNED entries, the tiles nearest the fastest on every case of a key, split heuristic")
    shape = lambda r: tuple(r[k] for k in ("Hq", "Hkv", "B", "L", "T", "D"))  # noqa: E731
    timed = [r for r in rows if r["provider"] in tiles and r["status"] == "ok"]
    by_key: dict = {}
    for r in timed:
        key = table_key(arch, dtype, r["D"], r["T"] * r["Hq"] // r["Hkv"])
        by_key.setdefault(key, {}).setdefault(shape(r), {})[r["provider"]] = r["median_us"]
    for key, cases in by_key.items():
        common = set.intersection(*(set(c) for c in cases.values()))
        if not common:
            continue
        slowdown = {p: sum(c[p] / min(c.values()) for c in cases.values()) / len(cases) for p in common}
        best = min(sorted(common), key=slowdown.get)
        for (Hq, Hkv, B, L, T, D), c in cases.items():
            rule = c.get("default/auto", float("nan"))
            print(f"# Hq {Hq} Hkv {Hkv} B {B} L {L} T {T}: {best} {c[best]:.1f} us, the fastest "
                  f"{min(c, key=c.get)} {min(c.values()):.1f} us, the rule {rule:.1f} us")
        if not tiles[best]:
            print(f"# {key}: the rule is fastest")
        else:
            print(f"TUNED[{key}] = dict({', '.join(f'{k}={v}' for k, v in tiles[best].items())})")


if __name__ == "__main__":
    sys.exit(run_main(main))
