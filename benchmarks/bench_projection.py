"""Project hidden-transfer decoding to large models: step latency of random models with Llama-2-7B and
Llama-3-8B shapes against the tree, combined with the tau measured on the real model.

For each shape and tree: the median latency of one plain step (one token) and of one hidden-transfer step
(the tree's real nodes, the context lookup's included, through all layers, a pseudo chain of K under every
node after layer t = 2/3 of the depth, the LM head, verification, next drafts, moving the accepted
keys/values: the decoder's whole forward pass with its defaults) at a `--context`-token prefix, batch 1; then
    projected speedup = tau(tree) x t(plain step) / t(hidden-transfer step),
with tau from the shipped SmolLM2 maps with the decoder's context lookup (benchmarks/RESULTS.md, `--tau`)
or a bench_drafts.py JSON (`--tau-json`: its first transfer row with the decoder's lookup settings). Steps are timed eagerly and, with `--graphs` on CUDA, as CUDA graph replays. Peak memory
of each step (cache included) is reported against the plain step's. Weights are random: only the shapes
matter for latency.

    python benchmarks/bench_projection.py [--shapes llama2-7b,llama3-8b] [--context 2048] [--graphs]
        [--device cuda] [--dtype bfloat16] [--trees default,dynamic16,dynamic32,dynamic64]
        [--tau default=2.34,dynamic16=2.46,dynamic64=2.65] [--tau-json drafts.json] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import ht_kernels as ht
from ht_kernels.decode.graphs import StepGraph
from ht_kernels.decode.lookup import NODES as LOOKUP_NODES, WEIGHT as LOOKUP_WEIGHT
from ht_kernels.decode.sampling import greedy
from ht_kernels.decode.transfer import TransferWeights
from ht_kernels.model import ModelConfig, Transformer
from ht_kernels.train.cli import device_arg, int_in, path_arg, run_main, threads_arg
from _harness import check_outputs, header
from bench_drafts import tree_spec, trees_arg

SHAPES = {
    "llama2-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                             hidden_dim=11008, max_seq_len=4096, name="llama2-7b-shape"),
    "llama3-8b": ModelConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                             hidden_dim=14336, rope_theta=500000.0, max_seq_len=8192, name="llama3-8b-shape"),
    "tiny": ModelConfig(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                        max_seq_len=4096, name="tiny"),
}
# tau of the shipped SmolLM2-135M maps on 48 Spec-Bench dev prompts, greedy, bf16 (benchmarks/RESULTS.md)
MEASURED_TAU = "default=2.350,dynamic16=2.457,dynamic64=2.688"  # with the lookup and its 2 nodes (2026-12-03)
SHIPPED_T = 20 / 30  # the shipped maps' transfer layer over SmolLM2's depth


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", type=shapes_arg, default="llama2-7b,llama3-8b",
                   help=f"comma-separated subset of {','.join(SHAPES)}")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--context", type=int_in(1), default=2048, help="prefix tokens in the cache")
    p.add_argument("--trees", type=trees_arg, default="default,dynamic16,dynamic32,dynamic64",
                   help="comma-separated: default (the static 16-node tree) or dynamicN")
    p.add_argument("--tau", type=tau_arg, default=MEASURED_TAU, help="tree=tau pairs (default: the shipped maps' tau)")
    p.add_argument("--tau-json", type=path_arg,
                   help="take tau from the first transfer row of a bench_drafts.py --json file")
    p.add_argument("--graphs", action="store_true", help="also time each step as a CUDA graph replay")
    p.add_argument("--reps", type=int_in(1), default=20, help="timed steps per measurement")
    p.add_argument("--threads", type=threads_arg, help="torch intra-op threads (CPU runs)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device, args.dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.graphs and args.device.type != "cuda":
        p.error(f"--graphs needs --device cuda, got {args.device}")
    return args


def shapes_arg(value: str) -> list[str]:
    """--shapes: comma-separated names of SHAPES."""
    shapes = value.split(",")
    if not shapes or set(shapes) - set(SHAPES):
        raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {','.join(SHAPES)}, got {value}")
    return shapes


def tau_arg(value: str) -> dict[str, float]:
    """--tau: comma-separated tree=tau pairs, tau >= 1."""
    try:
        tau = {k: float(v) for k, v in (kv.split("=") for kv in value.split(",") if kv)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be tree=tau pairs, comma-separated, got {value}") from None
    if any(not (math.isfinite(t) and t >= 1) for t in tau.values()):
        raise argparse.ArgumentTypeError(f"tau must be finite and >= 1 (tokens per step), got {value}")
    return tau


def taus(args) -> dict[str, float]:
    """--tau, or the tau of --tau-json's first transfer row measured with the decoder's lookup settings."""
    if not args.tau_json:
        return args.tau
    try:
        rows = json.loads(Path(args.tau_json).read_text())["rows"]
        return next(r["tau"] for r in rows if r.get("kind") == "transfer" and r.get("lookup") == LOOKUP_WEIGHT
                    and r.get("lookup_nodes") == LOOKUP_NODES)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, StopIteration):
        raise ValueError(f"--tau-json {args.tau_json}: not a bench_drafts.py --json file with a transfer row at "
                         f"lookup {LOOKUP_WEIGHT} and {LOOKUP_NODES} lookup nodes") from None


def timed(fn, reps: int, device: torch.device) -> float:
    """Median milliseconds of fn() over reps calls after 3 warmups."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(fn, args) -> float | None:
    """Median ms of fn replayed as a CUDA graph (timed's warm-ups record it); None if it cannot be recorded."""
    graph = StepGraph(fn, args.device)
    ms = timed(graph, args.reps, args.device)
    if graph.graph is None:
        print(f"CUDA graph not recorded: {graph.error}"[:300])
        return None
    return ms


def peak_mib(fn, device: torch.device, base: int) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def fits(context: int, step_tokens: int, what: str, cfg: ModelConfig) -> None:
    if context + step_tokens > cfg.max_seq_len:
        raise ValueError(f"--context {context}: a {what} step ({step_tokens} tokens) after it needs "
                         f"{context + step_tokens} positions, more than the shape's {cfg.max_seq_len}")


def measure(name: str, cfg: ModelConfig, args, tau: dict[str, float]) -> list[dict]:
    dev, C = args.device, args.context
    torch.manual_seed(0)
    model = Transformer.from_config(cfg, dtype=args.dtype, device=dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    rows = []
    with torch.inference_mode():
        plain_dec = ht.HiddenTransferDecoder(model, transfer=None)
        fits(C, 1, f"{name} plain", cfg)
        plain_cache = model.new_cache(1, C + 1)
        plain_cache.lengths.fill_(C)
        token = torch.zeros(1, dtype=torch.long, device=dev)
        plain, _ = plain_dec._forward_pass(False, token, None, plain_cache, greedy, None, None)
        t_plain = timed(plain, args.reps, dev)
        g_plain = graph_ms(plain, args) if args.graphs else None
        mem_plain = peak_mib(plain, dev, base)
        rows.append(dict(shape=name, tree="plain", tokens=1, ms=t_plain, graph_ms=g_plain, peak_mib=mem_plain))
        print(f"{name}: plain step {t_plain:.2f} ms" + (f" (graph {g_plain:.2f} ms)" if g_plain else ""), flush=True)
        plain_cache = None
        for tree_name in args.trees:
            tree, budget = tree_spec(tree_name)
            # The transfer layer at the shipped maps' fraction of the depth (t = 20 of 30 layers).
            maps = TransferWeights.untrained(cfg.dim, cfg.n_layers, layer=round(cfg.n_layers * SHIPPED_T))
            dec = ht.HiddenTransferDecoder(model, transfer=maps, tree=tree, budget=budget)
            K = dec.transfer.K
            fits(C, dec._step_tokens(), f"{name} {tree_name}", cfg)
            cache = model.new_cache(1, C + dec._step_tokens())
            cache.lengths.fill_(C)
            history = torch.zeros(1, cache.max_len, dtype=torch.long, device=dev)  # the lookup's tokens
            root = torch.zeros(1, dtype=torch.long, device=dev)
            drafts = torch.randn(1, K, cfg.vocab_size, device=dev).log_softmax(-1)

            step, _ = dec._forward_pass(True, root, drafts, cache, None, None, None, history)
            t_step = timed(step, args.reps, dev)
            g_step = graph_ms(step, args) if args.graphs else None
            mem = peak_mib(step, dev, base)
            T = dec.tree.budget + dec.lookup_nodes
            best = g_step if g_step and g_plain else t_step
            ref = g_plain if g_step and g_plain else t_plain
            row = dict(shape=name, tree=tree_name, tokens=T * (1 + K), ms=t_step, graph_ms=g_step, peak_mib=mem,
                       step_x_plain=best / ref, tau=tau.get(tree_name),
                       projected_speedup=tau[tree_name] * ref / best if tree_name in tau else None)
            rows.append(row)
            print(f"{name} {tree_name}: {T} nodes + {T * K} pseudo, step {t_step:.2f} ms"
                  + (f" (graph {g_step:.2f} ms)" if g_step else "") + f", {row['step_x_plain']:.2f}x plain"
                  + (f", projected {row['projected_speedup']:.2f}x at tau {row['tau']:.2f}" if row["tau"] else ""),
                  flush=True)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    check_outputs(json=args.json)
    head = header(args.device, args.dtype)
    print("  ".join(f"{k}: {v}" for k, v in head.items()) + f"  context: {args.context}")
    tau = taus(args)
    rows = [r for name in args.shapes for r in measure(name, SHAPES[name], args, tau)]
    print(f"\n{'shape':>10} {'tree':>10} {'tokens':>6} {'step ms':>8} {'graph ms':>8} {'x plain':>7} "
          f"{'tau':>5} {'proj. x':>7} {'peak MiB':>9}")
    fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    for r in rows:
        print(f"{r['shape']:>10} {r['tree']:>10} {r['tokens']:>6} {r['ms']:>8.2f} {fmt(r['graph_ms'], '8.2f'):>8} "
              f"{fmt(r.get('step_x_plain'), '7.2f'):>7} {fmt(r.get('tau'), '5.2f'):>5} "
              f"{fmt(r.get('projected_speedup'), '7.2f'):>7} {fmt(r['peak_mib'], '9.0f'):>9}")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": head, "context": args.context, "tau": tau, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    sys.exit(run_main(main))
