"""Batched plain generation on long prompts, the cost of building training data: prefill time per pass size,
and answer tokens/s of `train.data.synthesize` (prepacked weights, as the dataset command runs).

    python benchmarks/bench_generation.py [--rows 32] [--new-tokens 128] [--budgets 1000000,4096,2048,1024]
        [--dtype bfloat16] [--threads 2] [--json PATH]

The prompts are summarisation tasks over the first --rows python-doc passages (`apt-get install
python3.11-doc`); every budget prefills the same batch (`HiddenTransferDecoder.prefill_tokens`), the
first (a single pass) is the baseline of the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from ht_kernels.cpu import prepack_supported
from ht_kernels.decode.decoder import HiddenTransferDecoder
from ht_kernels.drafts.prompts import encode_prompt
from ht_kernels.loading import load_model
from ht_kernels.train.corpus import passages
from ht_kernels.train.data import synthesize
from ht_kernels.train.cli import int_in, run_main, threads_arg
from _harness import check_outputs, header


def budgets_arg(value: str) -> list[int]:
    """--budgets: comma-separated token counts, each >= 1."""
    parse = int_in(1)
    return [parse(v) for v in value.split(",")]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", type=int_in(1), default=32)
    p.add_argument("--new-tokens", type=int_in(1), default=128)
    p.add_argument("--budgets", type=budgets_arg, default="1000000,4096,2048,1024",
                   help="prefill pass sizes in tokens, comma-separated, each >= 1")
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
    model.prepack_linears(model.dtype == torch.bfloat16 and prepack_supported(model.device, model.dtype))
    prompts = sorted((encode_prompt(model.tokenizer, "Summarize the following text in a few sentences.\n\n" + q.text)
                      for q in passages("python-doc")[:args.rows]), key=len)
    dec = HiddenTransferDecoder(model, transfer=None, prepack=model.prepacked)
    rows, base = [], None
    with torch.inference_mode():
        for budget in args.budgets:
            dec.prefill_tokens = budget
            cache = model.new_cache(len(prompts), max(map(len, prompts)) + 8)
            t = time.perf_counter()
            dec._prefill(prompts, cache, draft=False)
            s = time.perf_counter() - t
            base = base or s
            rows.append({"budget": budget, "prefill_s": round(s, 2), "x": round(base / s, 2)})
            print(f"prefill, passes of <= {budget:>7} tokens: {s:6.2f} s  {base / s:4.2f}x")
    t = time.perf_counter()
    out = synthesize(model, prompts, args.new_tokens, batch_size=len(prompts), eos_token_id=())
    s = time.perf_counter() - t
    new = sum(len(e.tokens) - e.start - 1 for e in out)
    print(f"synthesize: {len(prompts)} prompts (mean {sum(map(len, prompts)) / len(prompts):.0f} tokens), "
          f"{new} new tokens in {s:.1f} s = {new / s:.0f} tokens/s")
    result = {**head, "threads": torch.get_num_threads(), "rows": len(prompts), "prefill": rows, "new_tokens": new, "seconds": round(s, 1),
              "tokens_per_s": round(new / s, 1)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(run_main(main))
