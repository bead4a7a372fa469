"""Benchmark decoding: hidden transfer (ht) against plain decoding (ar) and transformers `generate` (hf).

Batch 1, one prompt at a time, each in the model's chat template; per prompt every method runs once, in
turn, so a change in the machine's load hits all methods alike. --rounds N repeats the whole run N times
(the methods' order rotating) and also reports each round's speedups. Generations have a fixed length
(eos ignored) unless --stop-at-eos. Before timing, each method runs one short warmup generation.
tokens/s = new tokens / seconds (prefill included), summed over prompts; tau = mean tokens committed per
decoding step (the prefill's first token left out). `hf` is a transformers LlamaForCausalLM that shares
the loaded model's weight tensors (no copy), with eos disabled unless --stop-at-eos.

    python benchmarks/bench_decode.py [--limit N] [--max-new-tokens N] [--dtype auto|float32|bfloat16]
        [--temperature F] [--methods ht,ar,hf] [--tree auto|default|dynamic] [--budget N] [--n-chains N]
        [--prompts PATH] [--threads N] [--device cuda] [--backend B] [--no-cuda-graphs]
        [--prepack auto|on|off] [--exact] [--lookup W] [--lookup-nodes E] [--rounds N] [--json PATH] [--plot PATH]

On CUDA, ht and ar replay each greedy step as a CUDA graph (--no-cuda-graphs: eager steps), and the
table adds each method's peak memory above what was allocated before the runs (the weights, the maps:
torch.cuda.max_memory_allocated).

--dtype auto (the default) runs the package at its best on the machine and says why: on a CPU with oneDNN's
bf16 kernels bf16 with --exact (hidden transfer gives plain decoding's tokens bit for bit), on other CPUs
fp32, on a GPU bf16 (`ht_kernels.cpu.best_dtype`).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm  # a dependency of transformers

import ht_kernels as ht
from ht_kernels.cli import resolve_transfer_arg, resolve_tree_arg
from ht_kernels.cpu import best_dtype
from ht_kernels.decode.autotree import TreeChoice, format_table
from ht_kernels.drafts.prompts import encode_prompt, load_prompts
from ht_kernels.loading import LAYER_NAMES, TOP_NAMES
from ht_kernels.train.cli import device_arg, float_in, int_in, path_arg, run_main, threads_arg
from _harness import check_outputs, header

PROMPTS = Path(__file__).resolve().parent / "prompts.jsonl"
METHODS = ("ht", "ar", "hf")
WARMUP_TOKENS = 8
DEFAULT_LIMIT = 6


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a .gguf file or an HF directory")
    p.add_argument("--transfer", default="default", help="default (shipped weights), a weights file, or none")
    p.add_argument("--prompts", default=str(PROMPTS), type=path_arg,
                   help='JSONL with "turns" (first turn used) or "prompt"')
    p.add_argument("--limit", type=int_in(0), default=DEFAULT_LIMIT,
                   help=f"the first N prompts, 0 for all (default {DEFAULT_LIMIT}: the built-in set's first "
                        f"{DEFAULT_LIMIT} prompts are one per category; with the other defaults that run takes ~6 "
                        f"minutes in fp32 on a 2-core CPU with one thread)")
    p.add_argument("--max-new-tokens", type=int_in(1), default=128)
    p.add_argument("--stop-at-eos", action="store_true",
                   help="end each generation at the model's end-of-sequence tokens")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto (default): bfloat16 with --exact on a CPU with bf16 kernels, float32 on other CPUs, "
                        "bfloat16 on a GPU")
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu (default) or cuda")
    p.add_argument("--temperature", type=float_in(0.0), default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0), default=1.0, help="in (0, 1]; 1: no top-p")
    p.add_argument("--top-k", type=int_in(0), default=0, help="0: no top-k")
    p.add_argument("--seed", type=int_in(0, 2 ** 62), default=0, help="sampling seed (prompt i uses seed + i)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of ht,ar,hf")
    p.add_argument("--tree", choices=["auto", "default", "dynamic"], default="auto",
                   help="ht's tree: auto (default; measured on this machine once, then cached), the static "
                        "default, or dynamic with --budget nodes")
    p.add_argument("--budget", type=int_in(1), default=16, help="nodes of a dynamic tree")
    p.add_argument("--n-chains", type=int_in(1), help="pseudo chains under the n best nodes only (default: all)")
    p.add_argument("--tree-table", action="store_true", help="print tree auto's measured candidates")
    p.add_argument("--threads", type=threads_arg, help="torch intra-op threads (default: torch's)")
    p.add_argument("--backend", choices=["auto", "cuda", "triton", "torch"], default="auto",
                   help="backend of ht/ar's tree attention and step ops (default auto)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="ht/ar: eager steps on CUDA")
    p.add_argument("--prepack", choices=["auto", "on", "off"], default="auto",
                   help="ht/ar on CPU: linear weights packed ahead for oneDNN (auto: bf16 where supported)")
    p.add_argument("--exact", action="store_true",
                   help="ht/ar (CPU bf16): rows computed independently of the rows beside them, so ht gives ar's "
                        "tokens bit for bit")
    p.add_argument("--lookup", type=float_in(0.0, 1.0),
                   help="ht: the context lookup's weight in [0, 1) (0: off; default: the decoder's)")
    p.add_argument("--lookup-nodes", type=int_in(0), help="ht: nodes carrying the lookup's guess on (default: the "
                                                    "decoder's)")
    p.add_argument("--rounds", type=int_in(1), default=1,
                   help="run every prompt and method this many times, the methods' order rotating (default 1)")
    p.add_argument("--json", metavar="PATH", help="write the summary and per-(prompt, method) rows as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: accepted-length histogram, tokens/s per method")
    args = p.parse_args(argv)
    if args.top_p == 0:
        p.error("argument --top-p: must be in (0, 1], got 0.0")
    if args.lookup == 1:
        p.error("argument --lookup: must be in [0, 1), got 1.0")
    args.methods = [m for m in args.methods.split(",") if m]
    if not args.methods or set(args.methods) - set(METHODS):
        p.error(f"--methods must be a comma-separated subset of {','.join(METHODS)}, got {','.join(args.methods)}")
    return args


def hf_sharing_weights(model):
    """A transformers LlamaForCausalLM whose parameters are `model`'s tensors (no copy); no eos stop."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    if c.qkv_bias != c.o_bias:
        raise ValueError("hf: only Llama-style models (the same bias on q/k/v and o) have a LlamaForCausalLM twin")
    config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
        attention_bias=c.qkv_bias, rope_parameters={"rope_theta": c.rope_theta, "rope_type": "default",
                                                    **(c.rope_scaling or {})},
        bos_token_id=None, eos_token_id=None, pad_token_id=0, dtype=model.dtype)
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    state = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # ours -> HF names, as loading maps them
        layer = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", name)
        stem, kind = name.rsplit(".", 1)
        state[f"model.layers.{layer[1]}.{LAYER_NAMES[layer[2]][0]}.{layer[3]}" if layer
              else f"{TOP_NAMES[stem][0]}.{kind}"] = p
    hf.load_state_dict(state, strict=True, assign=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config).to(model.device)  # its buffers were made on meta
    return hf.eval()


def make_runners(model, args) -> tuple[dict, ht.HiddenTransferDecoder | None]:
    """{method: run(ids, max_new_tokens, seed) -> GenerateOutput} for the chosen methods, and the decoder
    that runs ht and ar (None when neither runs)."""
    runners, dec = {}, None
    eos = None if args.stop_at_eos else ()  # None: the model's own end-of-sequence tokens; (): none
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if {"ht", "ar"} & set(args.methods):
        model.attn_backend = args.backend
        dec = ht.HiddenTransferDecoder(model, transfer=resolve_transfer_arg(args.transfer),
                                       tree=resolve_tree_arg(args.tree), budget=args.budget, n_chains=args.n_chains,
                                       backend=args.backend, cuda_graphs=not args.no_cuda_graphs,
                                       prepack={"auto": None, "on": True, "off": False}[args.prepack],
                                       exact=args.exact,
                                       **({} if args.lookup is None else {"lookup": args.lookup}),
                                       **({} if args.lookup_nodes is None else {"lookup_nodes": args.lookup_nodes}))
        for name, fn in (("ht", dec.generate), ("ar", dec.generate_ar)):
            runners[name] = lambda ids, n, seed, fn=fn: fn(
                [ids], max_new_tokens=n, eos_token_id=eos, generator=torch.Generator(model.device).manual_seed(seed),
                **sampling)
    if "hf" in args.methods:
        hf = hf_sharing_weights(model)
        kw = dict(do_sample=True, **sampling) if args.temperature > 0 else dict(do_sample=False)
        hf_eos = list(model.eos_token_ids) if args.stop_at_eos and model.eos_token_ids else None

        @torch.inference_mode()
        def run_hf(ids, n, seed):
            torch.manual_seed(seed)
            x = torch.tensor([ids], device=model.device)
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, eos_token_id=hf_eos, **kw)
            new = out[0, x.shape[1]:].tolist()
            end = next((i for i, t in enumerate(new) if t in (hf_eos or ())), None)
            new = new if end is None else new[: end + 1]
            return ht.GenerateOutput([new], [[1] * len(new)])

        runners["hf"] = run_hf
    return {m: runners[m] for m in args.methods}, dec


def summarize(rows: list[dict], methods: list[str], greedy: bool) -> dict:
    summary = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        steps = [a for r in mine for a in r["accept_lengths"][1:]]
        new, seconds = sum(r["new_tokens"] for r in mine), sum(r["seconds"] for r in mine)
        peaks = [r["peak_mib"] for r in mine if r["peak_mib"] is not None]
        summary[m] = {"tokens_per_s": new / seconds, "tau": sum(steps) / len(steps) if steps else 1.0,
                      "new_tokens": new, "seconds": seconds, "peak_mib": max(peaks) if peaks else None,
                      "graphs": sorted({r["graph"] for r in mine if r["graph"] is not None}) or None}
    tps = {m: s["tokens_per_s"] for m, s in summary.items()}
    summary["speedup_vs_ar"] = tps["ht"] / tps["ar"] if "ht" in tps and "ar" in tps else None
    summary["speedup_vs_hf"] = tps["ht"] / tps["hf"] if "ht" in tps and "hf" in tps else None
    summary["identical_fraction"] = identical(rows, "ht", "ar") if greedy else None
    rounds = sorted({r["round"] for r in rows})
    if len(rounds) > 1:  # each round's speedups: how far the machine's drift moves them
        per = [summarize([r for r in rows if r["round"] == k], methods, greedy) for k in rounds]
        summary["rounds"] = [{"speedup_vs_ar": s["speedup_vs_ar"], "speedup_vs_hf": s["speedup_vs_hf"]} for s in per]
    return summary


def identical(rows: list[dict], a: str, b: str) -> float | None:
    """Fraction of prompts whose outputs of methods a and b are equal (first round); None unless both ran."""
    out = {(r["prompt"], r["method"]): r["tokens"] for r in rows if r["round"] == 0}
    prompts = sorted({p for p, m in out if m == a} & {p for p, m in out if m == b})
    return sum(out[p, a] == out[p, b] for p in prompts) / len(prompts) if prompts else None


def print_table(summary: dict, methods: list[str]) -> None:
    tps = {m: summary[m]["tokens_per_s"] for m in methods}
    cuda = any(summary[m]["peak_mib"] is not None for m in methods)
    print(f"{'method':>6}  {'tokens/s':>9}  {'tau':>5}  {'new tokens':>10}  {'seconds':>8}  {'x AR':>6}  {'x HF':>6}"
          + (f"  {'peak MiB':>8}  CUDA graph" if cuda else ""))
    for m in methods:
        s = summary[m]
        ratio = lambda base: f"{tps[m] / tps[base]:.2f}x" if base in tps else "-"  # noqa: E731
        print(f"{m:>6}  {s['tokens_per_s']:9.2f}  {s['tau']:5.2f}  {s['new_tokens']:10d}  {s['seconds']:8.1f}  "
              f"{ratio('ar'):>6}  {ratio('hf'):>6}"
              + (f"  {s['peak_mib']:8.1f}  {', '.join(s['graphs'] or ['-'])}" if cuda else ""))
    for key, name in (("speedup_vs_ar", "x AR"), ("speedup_vs_hf", "x HF")):
        per = [r[key] for r in summary.get("rounds", []) if r[key] is not None]
        if per:
            print(f"ht {name} per round: {' '.join(f'{x:.2f}' for x in per)} (median {statistics.median(per):.2f})")


def plot(path: str, rows: list[dict], summary: dict, methods: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lengths = {m: [a for r in rows if r["method"] == m for a in r["accept_lengths"][1:]] for m in methods}
    top = max((max(v) for v in lengths.values() if v), default=1)
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        counts = [lengths[m].count(k) / max(len(lengths[m]), 1) for k in range(1, top + 1)]
        left.bar([k + (i - (len(methods) - 1) / 2) * width for k in range(1, top + 1)], counts, width, label=m)
    left.set(xlabel="tokens accepted per step", ylabel="fraction of steps", title="accepted length",
             xticks=range(1, top + 1))
    left.legend()
    right.bar(methods, [summary[m]["tokens_per_s"] for m in methods], color=[f"C{i}" for i in range(len(methods))])
    right.set(ylabel="tokens/s", title="throughput")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    t0 = time.perf_counter()
    args = parse_args(argv)
    check_outputs(json=args.json, plot=args.plot)
    texts = [text for text, _ in load_prompts(args.prompts)][:args.limit or None]
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, why = getattr(torch, args.dtype, None), None
    if args.dtype == "auto":
        dtype, exact, why = best_dtype(args.device)
        args.exact = args.exact or exact
    model = ht.load_model(args.model, dtype=dtype, device=args.device)
    prompts = [encode_prompt(model.tokenizer, p) for p in texts]
    runners, dec = make_runners(model, args)
    tree = None if dec is None else {"tree": args.tree, "budget": dec.tree.budget, "n_chains": dec.n_chains,
                                     "depth": dec.transfer.K, "lookup": dec.lookup, "lookup_nodes": dec.lookup_nodes,
                                     "auto": asdict(dec.tree_choice) if dec.tree_choice else None}
    cuda = model.device.type == "cuda"
    weights_bytes = torch.cuda.memory_allocated(model.device) if cuda else 0
    head = {**header(model.device, dtype), "threads": torch.get_num_threads(),
            "transformers": importlib.metadata.version("transformers"), "prepacked": model.prepacked,
            "row_exact": model.row_exact}
    title = "  ".join(f"{k}: {v}" for k, v in head.items())
    print(title)
    print(f"model: {args.model}, {len(prompts)} prompts, {args.max_new_tokens} new tokens"
          f"{' or up to eos' if args.stop_at_eos else ' each (eos ignored)'}, temperature {args.temperature}"
          + (", hf: transformers LlamaForCausalLM sharing the model's weights" if "hf" in runners else ""),
          flush=True)
    if why is not None:
        print(f"dtype auto: {why}", flush=True)
    if tree is not None:
        every = tree["n_chains"] is None or tree["n_chains"] >= tree["budget"]
        chains = "every node" if every else f"the best {tree['n_chains']}"
        print(f"ht tree: {args.tree}, {tree['budget']} nodes, pseudo chains of {tree['depth']} under {chains}; "
              f"context lookup " + (f"at weight {tree['lookup']}, {tree['lookup_nodes']} more nodes"
                                    if tree["lookup"] else "off"), flush=True)
    if tree is not None and tree["auto"] is not None:
        choice = TreeChoice(**tree["auto"])
        print(f"tree auto (calibration): tau {choice.tau:.2f}, step {choice.step_ms:.1f} ms, plain step "
              f"{choice.ar_ms:.1f} ms" + ("" if args.tree_table else "; --tree-table lists every candidate"))
        if args.tree_table:
            print(format_table(choice))
    for run in runners.values():  # warmup
        run(prompts[0], WARMUP_TOKENS, args.seed)
    rows, bar = [], tqdm(total=args.rounds * len(prompts) * len(runners), unit="gen", file=sys.stderr)
    names = list(runners)
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for i, ids in enumerate(prompts):
            for m in order:
                run = runners[m]
                if cuda:
                    torch.cuda.synchronize(model.device)
                    torch.cuda.reset_peak_memory_stats(model.device)
                start = time.perf_counter()
                out = run(ids, args.max_new_tokens, args.seed + i)
                seconds = time.perf_counter() - start  # the run ends with a host read of its last tokens
                peak = (torch.cuda.max_memory_allocated(model.device) - weights_bytes) / 2**20 if cuda else None
                rows.append({"round": rnd, "prompt": i, "method": m, "new_tokens": len(out.sequences[0]),
                             "seconds": seconds, "accept_lengths": out.accept_lengths[0], "tokens": out.sequences[0],
                             "peak_mib": peak, "graph": dec.graph_status if m in ("ht", "ar") else None})
                bar.set_postfix_str(f"prompt {i} {m}", refresh=False)
                bar.update()
    bar.close()
    greedy = args.temperature == 0
    summary = summarize(rows, args.methods, greedy)
    print_table(summary, args.methods)
    same = summary["identical_fraction"]
    print("identical to ar (ht): " + ("n/a (sampling)" if not greedy else "n/a" if same is None else f"{same:.2f}")
          + (" (bf16 near-ties; --exact gives ar's tokens bit for bit)" if same is not None and same < 1
             and dtype == torch.bfloat16 and model.device.type == "cpu" and not model.row_exact else ""))
    hf_same = identical(rows, "hf", "ar") if greedy else None
    if hf_same is not None:
        print(f"identical to ar (hf): {hf_same:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "tree": tree, "rows": rows}))
    if args.plot:
        plot(args.plot, rows, summary, args.methods, title)
    print(f"total {time.perf_counter() - t0:.0f} s (loading, warmup and all generations)")


if __name__ == "__main__":
    sys.exit(run_main(main))
