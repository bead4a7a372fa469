"""Peak memory of decoding at a long context: hidden transfer against plain decoding.

Each method runs in a fresh process: load the model, build the decoder (the transfer maps, the tree), then
decode --new-tokens greedy tokens after a --context-token prompt (batch 1, random token ids). Its peak is
measured from just before the generation: on CPU the process's peak resident memory (Linux VmHWM, reset
through /proc/self/clear_refs) minus its resident memory then; on CUDA torch.cuda.max_memory_allocated
minus the memory allocated then. It covers the KV cache, the prefill's and the steps' activations;
"before" is what was held then (the weights and maps; on CPU the whole process); "total" compares
before + peak.

    python benchmarks/bench_memory.py [--context 2048] [--new-tokens 32] [--dtype bfloat16]
        [--trees default,dynamic32] [--device cpu|cuda] [--threads N] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import ht_kernels as ht
from ht_kernels.train.cli import device_arg, int_in, run_main, threads_arg
from _harness import check_outputs, header

TREES = {"default": (None, 16), "dynamic16": ("dynamic", 16), "dynamic32": ("dynamic", 32)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int_in(1), default=2048, help="prompt tokens (default 2048)")
    p.add_argument("--new-tokens", type=int_in(1), default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu (default) or cuda")
    p.add_argument("--trees", default="default,dynamic32", help=f"ht's trees, a subset of {','.join(TREES)}")
    p.add_argument("--threads", type=threads_arg, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)  # "ar" or a tree name: measure one method, print JSON
    args = p.parse_args(argv)
    args.trees = [t for t in args.trees.split(",") if t]
    if not args.trees or set(args.trees) - set(TREES):
        p.error(f"--trees must be a comma-separated subset of {','.join(TREES)}, got {','.join(args.trees)}")
    return args


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def measure(args) -> dict:
    """One method in this process -> {"method", "base_mib", "peak_mib", "tau", "step_tokens"}."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ht.load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    tree, budget = TREES.get(args.child, (None, 16))
    dec = ht.HiddenTransferDecoder(model, tree=tree, budget=budget)
    prompt = torch.randint(model.config.vocab_size, (args.context,), generator=torch.Generator().manual_seed(0))
    run = dec.generate_ar if args.child == "ar" else dec.generate
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
        torch.cuda.reset_peak_memory_stats(model.device)
        base = torch.cuda.memory_allocated(model.device)
        out = run([prompt.tolist()], max_new_tokens=args.new_tokens)
        torch.cuda.synchronize(model.device)
        peak = torch.cuda.max_memory_allocated(model.device) - base
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = _status_kib("VmRSS") * 1024
        out = run([prompt.tolist()], max_new_tokens=args.new_tokens)
        peak = _status_kib("VmHWM") * 1024 - base
    steps = out.accept_lengths[0][1:]
    return {"method": "ar" if args.child == "ar" else f"ht {args.child}", "base_mib": base / 2**20,
            "peak_mib": peak / 2**20,
            "tau": sum(steps) / len(steps), "step_tokens": 1 if args.child == "ar" else dec._step_tokens()}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return
    check_outputs(json=args.json)
    head = header(torch.device(args.device), getattr(torch, args.dtype))
    print("  ".join(f"{k}: {v}" for k, v in head.items()))
    print(f"model: {args.model}, {args.context}-token prompt, {args.new_tokens} new tokens, batch 1, greedy; "
          f"peak memory above that before the generation, one fresh process per method", flush=True)
    rows = []
    for method in ["ar", *args.trees]:
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--child", method]
        # A fixed mmap threshold: glibc then returns every large block to the system when it is freed,
        # so resident memory follows the live tensors (its adaptive threshold keeps freed blocks).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1].removeprefix("error: ") if done.stderr.strip() else "failed"
            raise ValueError(f"{method}: {last} (exit status {done.returncode})")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ar = rows[0]
    print(f"{'method':>15}  {'step tokens':>11}  {'tau':>5}  {'before MiB':>10}  {'peak MiB':>9}  {'x plain':>7}  "
          f"{'total x plain':>13}")
    for r in rows:
        r["x_plain"] = r["peak_mib"] / ar["peak_mib"] if ar["peak_mib"] > 0 else None
        r["total_x_plain"] = (r["base_mib"] + r["peak_mib"]) / (ar["base_mib"] + ar["peak_mib"])
        ratio = f"{r['x_plain']:.2f}x" if r["x_plain"] is not None else "-"
        print(f"{r['method']:>15}  {r['step_tokens']:11d}  {r['tau']:5.2f}  {r['base_mib']:10.1f}  "
              f"{r['peak_mib']:9.1f}  {ratio:>7}  {r['total_x_plain']:12.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": head, "context": args.context, "rows": rows}))


if __name__ == "__main__":
    sys.exit(run_main(main))
