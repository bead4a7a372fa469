"""Measure draft heads on the dev prompts: per-depth accuracy and tau (mean accepted tokens per step).

Each prompt's greedy continuation (--max-new-tokens, eos ignored) is made once by plain decoding; then
every drafter runs one teacher-forced pass over it, which gives the drafts of every token (see
ht_kernels.decode.replay): top-1 / top-5 accuracy per depth against the continuation, and tau replayed
for each tree policy exactly as the decoder would commit tokens. --decode N also decodes the first N
prompts for real with each drafter and reports that tau beside the replayed one. --similarity adds the
cosine similarity of pseudo states to the true states, layer by layer after t (transfer drafters).
--lookup W measures every drafter a second time (NAME+lookup) with the context lookup's guesses mixed
into its drafts at weight W (ht_kernels.decode.lookup), as the decoder's `lookup=W` does; a comma-separated
list of weights adds one row per weight (NAME+lookupW). --lookup-nodes E carries the guess on below the
tree by E more nodes per step (the decoder's `lookup_nodes=E`); a list of counts adds a row per weight and
count (NAME+lookupW+Enodes).

    python benchmarks/bench_drafts.py --drafter ht=weights.safetensors --drafter medusa=medusa.safetensors
        [--prompts PATH] [--limit N] [--stride S] [--max-new-tokens 128] [--trees default,dynamic64] [--decode N]
        [--similarity] [--lookup W[,W...]] [--json PATH] [--plot PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import ht_kernels as ht
from ht_kernels.baselines.medusa import MedusaDecoder, MedusaWeights
from ht_kernels.decode.decoder import make_tree_policy
from ht_kernels.decode.lookup import with_lookup
from ht_kernels.decode.replay import replay_accept_lengths, root_guesses
from ht_kernels.decode.transfer import TransferWeights, resolve_transfer
from ht_kernels.drafts.drafters import drafter_from_weights
from ht_kernels.drafts.forced import draft_logprobs
from ht_kernels.drafts.prompts import encode_prompt, load_prompts
from ht_kernels.train.data import synthesize
from ht_kernels.train.evaluate import depth_accuracy, pseudo_similarity
from ht_kernels.train.cli import device_arg, int_in, path_arg, run_main, threads_arg
from _harness import check_outputs, header

DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "specbench_dev.jsonl"
def tree_spec(name: str) -> tuple[str | None, int]:
    """--trees entry -> (tree, budget) of the decoder: "default" (the static 16-node tree) or "dynamicN"."""
    return (None, 16) if name == "default" else ("dynamic", int(name[len("dynamic"):]))


def trees_arg(value: str) -> list[str]:
    """--trees: comma-separated tree names, each "default" or "dynamicN" (N >= 1)."""
    trees = value.split(",")
    bad = [t for t in trees if t != "default" and not re.fullmatch(r"dynamic[1-9][0-9]*", t)]
    if bad:
        raise argparse.ArgumentTypeError(f"must be default or dynamicN, comma-separated, got {','.join(bad)}")
    return trees


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drafter", action="append", required=True, metavar="NAME=PATH",
                   help="a transfer or Medusa weights file (repeatable); NAME labels it; a transfer file "
                        "with NAME ending in ':nochain' runs the chain ablation, ':norefine' leaves out its root "
                        "refiner, ':nocal' its calibrated draft scores")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", default=str(DEV), type=path_arg, help='JSONL with "turns" (first turn) or "prompt"')
    p.add_argument("--limit", type=int_in(0), default=0, help="first N prompts (0: all)")
    p.add_argument("--stride", type=int_in(1), default=1, help="every S-th prompt (5: 48 of the 240 dev prompts, "
                                                         "all 13 categories)")
    p.add_argument("--max-new-tokens", type=int_in(1), default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--device", default="cpu", type=device_arg)
    p.add_argument("--trees", type=trees_arg, default="default,dynamic64",
                   help="comma-separated: default (the static 16-node tree) or dynamicN (the best N nodes)")
    p.add_argument("--decode", type=int_in(0), default=0, help="also decode the first N prompts for real")
    p.add_argument("--similarity", type=int_in(0), default=0, help="cosine similarity on the first N prompts")
    p.add_argument("--lookup", default="", help="also measure each drafter with the context lookup's guesses "
                                                "mixed in at this weight (or these, comma-separated)")
    p.add_argument("--lookup-ngram", type=int_in(1), default=3)
    p.add_argument("--lookup-nodes", default="0", help="with --lookup: nodes carrying the guess on (or "
                                                       "comma-separated counts)")
    p.add_argument("--threads", type=threads_arg)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH")
    args = p.parse_args(argv)
    args.drafter = [spec.partition("=")[::2] for spec in args.drafter]
    bad = [f"{name}={file}" for name, file in args.drafter if not name or not file.strip()]
    if bad:
        p.error(f"argument --drafter: must be NAME=PATH, got {', '.join(bad)}")
    try:
        args.lookup = [float(w) for w in args.lookup.split(",") if w]
    except ValueError:
        p.error(f"--lookup must be weights in (0, 1), comma-separated, got {args.lookup!r}")
    if any(not 0 < w < 1 for w in args.lookup):
        p.error(f"--lookup must be weights in (0, 1), got {args.lookup}")
    try:
        args.lookup_nodes = [int(n) for n in args.lookup_nodes.split(",") if n]
    except ValueError:
        p.error(f"--lookup-nodes must be counts >= 0, comma-separated, got {args.lookup_nodes!r}")
    if not args.lookup_nodes or min(args.lookup_nodes) < 0 or (max(args.lookup_nodes) and not args.lookup):
        p.error(f"--lookup-nodes must be counts >= 0, and needs --lookup, got {args.lookup_nodes}")
    return args


def load_weights(path: str):
    """A transfer file has a 'layer' in its metadata; anything else is taken as Medusa heads."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise ValueError(f"--drafter {path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            is_transfer = "layer" in (f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"--drafter {path}: not a readable safetensors file ({e})") from None
    return TransferWeights.load(path) if is_transfer else MedusaWeights.load(path)


def check_weights(model, name: str, weights) -> None:
    """Refuse a drafter whose tensors do not fit the model, before the continuations are made."""
    c = model.config
    try:
        if isinstance(weights, TransferWeights):
            resolve_transfer(weights, "", c.dim, c.n_layers)
        else:
            weights.check(c.dim)
    except ValueError as e:
        raise ValueError(f"--drafter {name}: {e}") from None


def measure(model, name: str, weights, examples, categories: list[str], args) -> list[dict]:
    """Accuracy and tau over all prompts, and per category (top-1 per depth, tau of the last tree); with
    --lookup, a row per weight (and --lookup-nodes count) with the context lookup's guesses mixed in."""
    chain = not name.endswith(":nochain")
    if name.endswith(":norefine"):  # the ablation of the maps' root refiner
        weights = replace(weights, refine=None)
    if name.endswith(":nocal"):  # the ablation of the maps' calibrated draft scores
        weights = replace(weights, calibration=None)
    drafter = drafter_from_weights(weights, chain)
    K = weights.K
    calibration = getattr(weights, "calibration", None)
    policies = {t: make_tree_policy(tree_spec(t)[0], K, tree_spec(t)[1], calibration) for t in args.trees}
    settings = [(0.0, 0)] + [(w, n) for w in args.lookup for n in args.lookup_nodes]  # (weight, nodes)
    hits = {s: {c: torch.zeros(2, K) for c in categories} for s in settings}
    counts = {c: torch.zeros(K) for c in categories}
    lengths = {s: {t: [] for t in args.trees} for s in settings}
    for (logp, nxt), e, cat in zip(draft_logprobs(model, drafter, examples), examples, categories):
        guess = root_guesses(e, K + max(args.lookup_nodes), args.lookup_ngram) if args.lookup else None
        for w, n in settings:  # drafts of anchor j and the guesses of the step rooted at new token j
            h, c = depth_accuracy(logp if not w else with_lookup(logp, guess[:, :K], w), nxt)
            hits[w, n][cat] += h
            for t, pol in policies.items():
                lengths[w, n][t].append(replay_accept_lengths(pol, logp, nxt, args.max_new_tokens, None,
                                                              None if not w else guess[:, :K + n], w, n))
        counts[cat] += c
    total = sum(counts.values())
    last = args.trees[-1]
    rows = []
    for w, n in settings:
        total_hits = sum(hits[w, n].values())
        label = "" if not w else "+lookup" if len(settings) == 2 else f"+lookup{w:g}" + (f"+{n}nodes" if n else "")
        rows.append({"name": name + label, "kind": "transfer" if hasattr(weights, "layer") else "medusa",
                     "K": K, "layer": getattr(weights, "layer", None), "chain": chain, "lookup": w, "lookup_nodes": n,
                     "top1": (total_hits[0] / total).tolist(), "top5": (total_hits[1] / total).tolist(),
                     "tau": {t: _mean(lengths[w, n][t]) for t in args.trees},
                     "by_category": {c: {"prompts": categories.count(c), "top1": (hits[w, n][c][0] / counts[c]).tolist(),
                                         f"tau {last}": _mean([l for l, k in zip(lengths[w, n][last], categories) if k == c])}
                                     for c in counts}})
    for row in rows if args.decode and chain else ():  # the decoder's pseudo tokens always see their chain
        row["tau_decoded"], w, n = {}, row["lookup"], row["lookup_nodes"]
        for t in args.trees:
            tree, budget = tree_spec(t)
            kw = dict(tree=tree, budget=budget, lookup=w, lookup_ngram=args.lookup_ngram, lookup_nodes=n)
            dec = (ht.HiddenTransferDecoder(model, weights, **kw) if row["kind"] == "transfer"
                   else MedusaDecoder(model, weights, **kw))
            got = [dec.generate([e.tokens[:e.start + 1]], max_new_tokens=args.max_new_tokens,
                                eos_token_id=()).accept_lengths[0][1:]
                   for e in examples[: args.decode]]
            row["tau_decoded"][t] = (_mean(got), _mean(lengths[w, n][t][: args.decode]))
    if args.similarity and rows[0]["kind"] == "transfer":
        rows[0]["similarity"] = pseudo_similarity(model, drafter, examples[: args.similarity]).tolist()
    return rows


def _mean(rows: list[list[int]]) -> float:
    flat = [a for r in rows for a in r]
    return sum(flat) / max(len(flat), 1)


def print_rows(rows: list[dict], trees: list[str]) -> None:
    K = max(r["K"] for r in rows)
    w = max(22, *(len(r["name"]) for r in rows))
    print(f"{'drafter':>{w}} {'t':>3} {'K':>2}  " + "  ".join(f"{'top1@' + str(i + 1):>7}" for i in range(K)) + "  "
          + "  ".join(f"{'top5@' + str(i + 1):>7}" for i in range(K)) + "  " + "  ".join(f"{'tau ' + t:>14}" for t in trees))
    for r in rows:
        acc = lambda v: "  ".join(f"{v[i]:7.3f}" if i < len(v) else f"{'-':>7}" for i in range(K))  # noqa: E731
        print(f"{r['name']:>{w}} {r['layer'] or '-':>3} {r['K']:>2}  {acc(r['top1'])}  {acc(r['top5'])}  "
              + "  ".join(f"{r['tau'][t]:14.3f}" for t in trees))
    cats = list(rows[0]["by_category"])
    if len(cats) > 1:
        last = next(k for k in rows[0]["by_category"][cats[0]] if k.startswith("tau"))
        print(f"\nper category: top-1 at depth 1 / {last}")
        print(f"{'category':>16} {'prompts':>7}  " + "  ".join(f"{r['name']:>{w}}" for r in rows))
        for c in cats:
            print(f"{c:>16} {rows[0]['by_category'][c]['prompts']:>7}  " + "  ".join(
                f"{r['by_category'][c]['top1'][0]:>{w - 7}.3f} / {r['by_category'][c][last]:.2f}" for r in rows))
    for r in rows:
        for t, (real, replay) in r.get("tau_decoded", {}).items():
            print(f"{r['name']}: tree {t}: decoded tau {real:.3f}, replayed tau {replay:.3f} (same prompts)")
        if "similarity" in r:
            print(f"{r['name']}: cosine(pseudo i, true state of n + i) after layers {r['layer']}..: "
                  + "; ".join(f"L{r['layer'] + j}: " + "/".join(f"{x:.2f}" for x in s) for j, s in enumerate(r["similarity"])))


def plot(path: str, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = [r for r in rows if "similarity" in r]
    fig, axes = plt.subplots(1, 2 + bool(sim), figsize=(6 * (2 + bool(sim)), 4))
    for r in rows:
        depths = range(1, r["K"] + 1)
        axes[0].plot(depths, r["top1"], "o-", label=f"{r['name']} top-1")
        axes[0].plot(depths, r["top5"], "s--", label=f"{r['name']} top-5")
    axes[0].set(xlabel="draft depth", ylabel="accuracy", title="draft accuracy per depth", ylim=(0, 1))
    axes[0].legend(fontsize=7)
    trees = list(rows[0]["tau"])
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        axes[1].bar([j + (i - (len(rows) - 1) / 2) * width for j in range(len(trees))], [r["tau"][t] for t in trees],
                    width, label=r["name"])
    axes[1].set(xticks=range(len(trees)), xticklabels=trees, ylabel="tau (tokens per step)", title="tau per tree")
    axes[1].legend(fontsize=7)
    for r in sim:
        s = torch.tensor(r["similarity"])
        for i in range(s.shape[1]):
            axes[2].plot(range(r["layer"], r["layer"] + s.shape[0]), s[:, i], label=f"{r['name']} pseudo {i + 1}")
        axes[2].set(xlabel="after layer", ylabel="cosine similarity", title="pseudo vs true hidden state")
        axes[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    t0 = time.perf_counter()
    args = parse_args(argv)
    check_outputs(json=args.json, plot=args.plot)
    path = Path(args.prompts)
    rows = load_prompts(path)[:: args.stride][: args.limit or None]
    texts, categories = [text for text, _ in rows], [category for _, category in rows]
    drafters = [(name, load_weights(file)) for name, file in args.drafter]  # a bad file fails before the work
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = ht.load_model(args.model, dtype=dtype, device=args.device)
    for name, weights in drafters:
        check_weights(model, name, weights)
    head = header(model.device, dtype)
    title = "  ".join(f"{k}: {v}" for k, v in head.items())
    print(title)
    print(f"model {args.model}; {len(texts)} prompts of {path.name}; greedy, {args.max_new_tokens} new tokens", flush=True)
    prompts = [encode_prompt(model.tokenizer, t) for t in texts]
    examples = synthesize(model, prompts, args.max_new_tokens, batch_size=32, eos_token_id=())  # fixed lengths
    print(f"continuations: {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    for name, weights in drafters:
        results += measure(model, name, weights, examples, categories, args)
        print(f"{name}: done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print_rows(results, args.trees)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": head, "args": vars(args), "rows": results}, indent=1))
    if args.plot:
        plot(args.plot, results, title)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    sys.exit(run_main(main))
