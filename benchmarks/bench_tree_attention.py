"""Benchmark ht_kernels.tree_attention against PyTorch's SDPA, FlexAttention and FlashInfer.

One decoding step's tree attention: T tree queries per row over an unmasked prefix of L cached
positions plus the T tree tokens under a random tree's ancestor mask. The tree's keys/values already
sit in the cache (no k/v arguments), so no provider writes into the cache inside the timed region.
Cases whose estimated footprint exceeds 90% of the device's memory are skipped, and say so.
On a GPU, "% roof" is the roofline time max(bytes / measured copy bandwidth, flops / the card's dense
bf16 peak) as a percentage of the measured time.

    python benchmarks/bench_tree_attention.py [--quick] [--json PATH] [--device D] [--dtype T]
"""
from __future__ import annotations

import itertools
import sys
import os

import torch
import torch.nn.functional as F

import ht_kernels as ht
from ht_kernels.train.cli import run_main
from _harness import Skip, copy_gb_per_s, dense_peak_tflops, parse_args, run

QUICK_HELP = ("small CPU-friendly set: B in {1, 2}, L in {256, 1024}, T in {16, 64}, Hq/Hkv 8/2, D 64 "
              "(fp32 on CPU unless --dtype); well under a minute on a 2-core CPU")


def cases(quick: bool) -> list[dict]:
    if quick:
        grid = itertools.product([(8, 2)], [1, 2], [256, 1024], [16, 64], [64])
    else:
        grid = itertools.product([(32, 8), (32, 32)], [1, 8, 32], [512, 4096, 16384], [16, 64, 128], [128])
    return [dict(Hq=Hq, Hkv=Hkv, B=B, L=L, T=T, D=D) for (Hq, Hkv), B, L, T, D in grid]


def random_tree_mask(T: int) -> torch.Tensor:
    """[T, T] bool ancestor mask of a random tree: parents[i] uniform in [0, i)."""
    parents = [-1] + [int(torch.randint(0, i, ())) for i in range(1, T)]
    return ht.Tree.from_parents(parents).ancestor_mask


def make_inputs(case: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """q, the cache (prefix of L positions, then the T tree tokens' keys/values), lengths, a random tree's
    mask, and L, seeded."""
    B, L, T, Hq, Hkv, D = (case[k] for k in ("B", "L", "T", "Hq", "Hkv", "D"))
    torch.manual_seed(0)
    return dict(q=torch.randn(B, T, Hq, D, device=device, dtype=dtype),
                k_cache=torch.randn(B, L + T, Hkv, D, device=device, dtype=dtype),
                v_cache=torch.randn(B, L + T, Hkv, D, device=device, dtype=dtype),
                cache_seqlens=torch.full((B,), L, dtype=torch.int32, device=device),
                tree_mask=random_tree_mask(T).to(device), L=L)


def gb_per_s(case: dict, us: float, itemsize: int) -> float:
    """K/V of the live L+T positions read once, q read once, out written once, per microsecond time."""
    kv = 2 * case["B"] * (case["L"] + case["T"]) * case["Hkv"] * case["D"]
    q_out = 2 * case["B"] * case["T"] * case["Hq"] * case["D"]
    return (kv + q_out) * itemsize / us / 1e3


def flops(case: dict) -> float:
    """Q K^T and P V over the L + T keys of every query head: 4 B T Hq D (L + T) (masked keys included,
    as a dense kernel computes them)."""
    return 4.0 * case["B"] * case["T"] * case["Hq"] * case["D"] * (case["L"] + case["T"])


def footprint(case: dict, itemsize: int) -> int:
    """Rough peak bytes of a case: the cache and the providers' copies, masks, the reference's temporaries."""
    B, S, T, Hq, Hkv, D = case["B"], case["L"] + case["T"], case["T"], case["Hq"], case["Hkv"], case["D"]
    kv = 2 * B * S * D * itemsize * (2 * Hkv + Hq)  # the cache, flex's [B, Hkv, S, D] and sdpa's [B, Hq, S, D]
    reference_row = 4 * S * Hq * (2 * D + 3 * T)  # fp32 K, V, scores, probabilities of one row
    return kv + reference_row + B * T * S * (1 + itemsize) + 8 * B * T * Hq * D * itemsize


def device_memory(device: torch.device) -> int:
    """Total bytes of the device's memory (for the CPU: the machine's RAM)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], QUICK_HELP, argv=argv)
    dev, dtype = args.device, args.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()

    def setup(case: dict) -> dict:
        need, have = footprint(case, itemsize), device_memory(dev)
        if need > 0.9 * have:
            raise Skip(f"needs ~{need / 2**30:.0f} GiB of {have / 2**30:.0f} GiB")
        return make_inputs(case, dev, dtype)

    def backend(name: str, cuda_only: bool = False):
        def make(x: dict):
            if cuda_only and dev.type != "cuda":
                raise Skip("CUDA only: under TRITON_INTERPRET=1 on CPU it is far too slow to time")
            return lambda: ht.tree_attention(x["q"], x["k_cache"], x["v_cache"], x["cache_seqlens"],
                                             x["tree_mask"], backend=name)
        return make

    def sdpa(x: dict):
        # [B, H, L+T, D] copies of the cache (it holds just the L+T live positions), made outside the
        # timed region. GQA: the K/V heads are repeated up to Hq here too, rather than enable_gqa=True:
        # on CUDA enable_gqa works only in the flash and math kernels, and flash takes no mask, so
        # enable_gqa would send this masked call to the slow math kernel.
        B, T, Hq, _ = x["q"].shape
        q = x["q"].transpose(1, 2).contiguous()
        k, v = (c.transpose(1, 2).repeat_interleave(Hq // c.shape[2], dim=1).contiguous()
                for c in (x["k_cache"], x["v_cache"]))
        prefix = torch.ones(B, 1, T, x["L"], dtype=torch.bool, device=dev)
        mask = torch.cat([prefix, x["tree_mask"].expand(B, 1, T, T)], dim=-1)  # [B, 1, T, L+T]
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)

    def flex(x: dict):
        if dev.type != "cuda":
            raise Skip("CUDA only here: compiled FlexAttention is timed on GPUs")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        torch._dynamo.config.recompile_limit = 1000  # one compile per shape; never fall back to eager
        L, T, tree = x["L"], x["q"].shape[1], x["tree_mask"]
        mask_mod = lambda b, h, i, j: (j < L) | tree[i, (j - L).clamp(min=0)]  # noqa: E731
        block_mask = create_block_mask(mask_mod, None, None, T, L + T, device=dev)
        q, k, v = (t.transpose(1, 2).contiguous() for t in (x["q"], x["k_cache"], x["v_cache"]))
        compiled = torch.compile(flex_attention)

        def call(options):
            return lambda: compiled(q, k, v, block_mask=block_mask, enable_gqa=True,
                                    kernel_options=options).transpose(1, 2)
        try:
            fn = call(None)
            fn()
            return fn
        except Exception:  # noqa: BLE001 - torch 2.11 on an H200: its decoding kernel, chosen for < 128
            # queries with GQA, had no config for these shapes (NoValidChoicesError); the main kernel then
            return call({"FORCE_USE_FLEX_ATTENTION": True})

    def flashinfer(x: dict):
        # FlashInfer's batch prefill ("append") attention over a paged cache with a custom mask [T, L + T]
        # per row: the cache is viewed as pages of 16 positions in place (row b owns pages b*P..b*P+P-1),
        # the mask is packed and the work planned outside the timed region.
        if dev.type != "cuda":
            raise Skip("CUDA only")
        try:
            import flashinfer as fi
        except ImportError as e:
            raise Skip(f"flashinfer-python is not installed ({e})") from e
        B, T, Hq, D = x["q"].shape
        L, Hkv = x["L"], x["k_cache"].shape[2]
        page = 16 if (L + T) % 16 == 0 else 1
        pages = (L + T) // page
        i32 = dict(dtype=torch.int32, device=dev)
        mask = torch.cat([torch.ones(T, L, dtype=torch.bool, device=dev), x["tree_mask"]], dim=-1)
        wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=dev), "NHD")
        wrapper.plan(torch.arange(B + 1, **i32) * T, torch.arange(B + 1, **i32) * pages, torch.arange(B * pages, **i32),
                     torch.full((B,), page, **i32), Hq, Hkv, D, page, custom_mask=mask.expand(B, T, L + T).reshape(-1),
                     q_data_type=dtype, kv_data_type=dtype)
        q = x["q"].reshape(B * T, Hq, D)
        kv = tuple(c.view(B * pages, page, Hkv, D) for c in (x["k_cache"], x["v_cache"]))
        return lambda: wrapper.run(q, kv).view(B, T, Hq, D)

    metrics = {"GB/s": lambda case, us: gb_per_s(case, us, itemsize)}
    if dev.type == "cuda":  # the targets: fractions of a plain device-to-device copy and of the roofline
        copy_gbs, peak = copy_gb_per_s(dev), dense_peak_tflops(dev)
        metrics["% copy"] = lambda case, us: 100 * gb_per_s(case, us, itemsize) / copy_gbs
        metrics["% roof"] = lambda case, us: 100 * max(gb_per_s(case, us, itemsize) * us / copy_gbs,
                                                        flops(case) / peak / 1e6) / us

    providers = {"torch": backend("torch"), "sdpa": sdpa, "flex": flex, "flashinfer": flashinfer,
                 "triton": backend("triton", cuda_only=True), "cuda": backend("cuda")}
    run(args, cases(args.quick), setup, providers, reference="torch", baseline="sdpa", metrics=metrics)


if __name__ == "__main__":
    sys.exit(run_main(main))
