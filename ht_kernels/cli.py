"""`python -m ht_kernels generate --prompt "..."`: stream a generation, then tokens/s and the mean accepted length.

Errors the user can fix (a missing model package, a bad path or argument) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

from .decode.lookup import NODES as LOOKUP_NODES, WEIGHT as LOOKUP_WEIGHT
from .drafts.prompts import encode_prompt
from .train.cli import float_in, int_in, threads_arg

DTYPES = ("auto", "float32", "bfloat16")


def resolve_transfer_arg(value: str):
    """--transfer: "default", "none" (untrained maps) or a weights file."""
    return None if value == "none" else value


def resolve_tree_arg(value: str):
    """--tree: "auto", "default" (the static tree: None) or "dynamic"."""
    return None if value == "default" else value


def mean_accepted(accept_lengths: list[int]) -> float:
    """Mean tokens per decoding step; the first entry (the prefill's token) is not a decoding step."""
    steps = accept_lengths[1:] or accept_lengths
    return sum(steps) / len(steps)


class TextStream:
    """Prints the text of a growing token sequence as it arrives. The whole sequence is decoded each time and
    only the new suffix is printed, so tokens that merge or split multi-byte characters print right; a tail
    ending in an incomplete character (U+FFFD) waits for the next tokens."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, new_tokens: list[list[int]]) -> None:
        self.ids += new_tokens[0]
        self._write(final=False)

    def close(self) -> None:
        self._write(final=True)
        self.out.write("\n")
        self.out.flush()

    def _write(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = max(self.printed, len(text))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ht_kernels", description="Lossless hidden-transfer decoding.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="stream a generation for one prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a .gguf file or an HF directory")
    g.add_argument("--transfer", default="default", help="default (shipped weights), a weights file, or none")
    g.add_argument("--max-new-tokens", type=int_in(1), default=128)
    g.add_argument("--temperature", type=float_in(0.0), default=0.0, help="0: greedy (default)")
    g.add_argument("--top-p", type=float_in(0.0, 1.0, open_lo=True), default=1.0)
    g.add_argument("--top-k", type=int_in(0), default=0, help="0: no top-k")
    g.add_argument("--seed", type=int_in(0, 2 ** 63 - 1), help="seed of the sampler (temperature > 0)")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto (default): bfloat16 with --exact where the CPU has bf16 kernels, else float32")
    g.add_argument("--threads", type=threads_arg, help="torch intra-op threads (default: torch's)")
    g.add_argument("--no-chat", action="store_true", help="use the prompt as is, without the chat template")
    g.add_argument("--ar", action="store_true", help="plain one-token-per-step decoding instead")
    g.add_argument("--tree", choices=["auto", "default", "dynamic"], default="auto",
                   help="auto (default): the tree with the most tokens/s on this machine, measured once (about a "
                        "minute) and cached; default: the static 16-node tree; dynamic: the best --budget nodes")
    g.add_argument("--budget", type=int_in(1), default=16, help="nodes of a dynamic tree")
    g.add_argument("--exact", action="store_true",
                   help="bfloat16: the tokens of plain decoding bit for bit, not only up to near-ties (slower)")
    g.add_argument("--lookup", type=float_in(0.0, 1.0, open_hi=True), default=LOOKUP_WEIGHT,
                   help=f"weight of the context lookup's guesses among the drafts (default {LOOKUP_WEIGHT}; 0: off)")
    g.add_argument("--lookup-nodes", type=int_in(0), help=f"tree nodes carrying the lookup's guess on (default "
                                                    f"{LOOKUP_NODES} with the lookup)")
    return p.parse_args(argv)


def generate(args: argparse.Namespace) -> None:
    import torch

    import ht_kernels as ht

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from .cpu import best_dtype

    dtype, exact, why = getattr(torch, args.dtype, None), args.exact, None
    if args.dtype == "auto":
        dtype, auto_exact, why = best_dtype("cpu")
        exact = exact or auto_exact
    model = ht.load_model(args.model, dtype=dtype)
    if why is not None:
        print(f"dtype auto: {why}", file=sys.stderr, flush=True)
    tok = model.tokenizer
    ids = encode_prompt(tok, args.prompt, chat=not args.no_chat)
    # --ar never uses the maps or the tree: untrained ones spare it the shipped weights and their warning.
    tree = None if args.ar else resolve_tree_arg(args.tree)
    if tree == "auto":
        print("tree auto: choosing the tree for this machine (measured once, then cached)", file=sys.stderr, flush=True)
    dec = ht.HiddenTransferDecoder(model, transfer=None if args.ar else resolve_transfer_arg(args.transfer),
                                   tree=tree, budget=args.budget, exact=exact,
                                   lookup=0.0 if args.ar else args.lookup, lookup_nodes=None if args.ar else args.lookup_nodes)
    gen = None if args.seed is None else torch.Generator(model.device).manual_seed(args.seed)
    stream = TextStream(tok)
    run = dec.generate_ar if args.ar else dec.generate
    start = time.perf_counter()
    out = run([ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              top_k=args.top_k, generator=gen, callback=stream)
    seconds = time.perf_counter() - start
    stream.close()
    n = len(out.sequences[0])
    print(f"{n} tokens in {seconds:.1f} s: {n / seconds:.1f} tokens/s, "
          f"mean accepted length {mean_accepted(out.accept_lengths[0]):.2f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    try:
        generate(args)
    except (ValueError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
    return 0
