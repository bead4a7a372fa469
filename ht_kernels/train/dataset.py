"""python -m ht_kernels.train.dataset: the frozen model's own answers to the conversations of `tasks`, in
shards that several runs build together.

    python -m ht_kernels.train.dataset --out datasets/smollm2-135m [--model smollm2-135m] [--dtype bfloat16]
        [--device cpu] [--tasks docs] [--seed 0] [--max-prompt 1024] [--gen-tokens 256] [--shard-size 256] [--gen-batch 32] [--shards N]
        [--minutes M] [--threads 2]

The pool is `tasks.conversations(seed)` (--tasks docs: reading and code tasks over documentation),
`open_tasks.conversations(seed)` (--tasks open: narrative, places, concepts, word problems) or
`german_tasks.conversations(seed)` (--tasks german: German text to translate into English) less those
whose prompt has more than --max-prompt tokens; shard i
answers pool entries i*S .. (i+1)*S - 1 (greedy, `data.synthesize`) and is written whole as
OUT/shard-{i:05d}.npz, so a shard that is there is skipped and a stopped run resumes. A shard keeps only
the answers (uint16; uint32 for vocabularies over 65536 tokens) with each prompt's pool index and hash: `load` rebuilds the prompts from the installed
sources and drops (with a warning) any whose tokens changed. OUT/manifest.json holds the recipe (a run
with another recipe refuses the directory) and, per shard, its conversations, prompt and answer tokens,
seconds, answer tokens/s and the CPU's capability (or the GPU's name). --shards N: stop after shard
N - 1; --minutes M: start no shard after M minutes (but one). --export-pool PATH writes the pool's encoded prompts (~3 MB, xz) for a machine without the Debian sources
(a lent GPU), whose run reads it with --pool PATH and keeps a copy as OUT/pool.npz. A dataset with an
OUT/pool.npz takes its prompts from it, never from the sources, which change with package versions.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import time
import warnings
import zipfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from ..cpu import prepack_supported
from ..drafts.examples import Example
from . import german_tasks, open_tasks, tasks
from .cli import device_arg, float_in, int_in, path_arg, run_main, threads_arg
from .data import synthesize
from .tasks import encode

POOL = "pool.npz"      # the exported pool a --pool run keeps beside its shards, for `load`
HELD_OUT_EVERY = 100  # pool index multiples of it are held out from training (`load`'s part)
BAD_FILE = (OSError, ValueError, TypeError, KeyError, EOFError, zipfile.BadZipFile, lzma.LZMAError)  # of damaged files
RECIPE_KEYS = ("model", "dtype", "tasks", "seed", "max_prompt", "gen_tokens", "shard_size", "gen_batch")
POOLS = {"docs": tasks.conversations, "open": open_tasks.conversations, "german": german_tasks.conversations}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ht_kernels.train.dataset", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=path_arg, help="dataset directory (shards and manifest.json)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu or cuda")
    p.add_argument("--tasks", choices=sorted(POOLS), default="docs", help="the conversations: documentation "
                   "and code tasks, open-ended ones, or German text to translate")
    p.add_argument("--seed", type=int_in(0, 2 ** 63 - 1), default=0, help="order of the pool")
    p.add_argument("--max-prompt", type=int_in(1), default=1024, help="longer prompts are left out of the pool")
    p.add_argument("--gen-tokens", type=int_in(1), default=256, help="new tokens per answer at most")
    p.add_argument("--shard-size", type=int_in(1), default=256)
    p.add_argument("--gen-batch", type=int_in(1), default=32, help="prompts answered at once")
    p.add_argument("--shards", type=int_in(1), help="build shards 0 .. N-1 only (default: the whole pool)")
    p.add_argument("--minutes", type=float_in(0.0), help="start no new shard after this many minutes")
    p.add_argument("--threads", type=threads_arg)
    p.add_argument("--export-pool", metavar="PATH", type=path_arg, help="write the pool's encoded prompts to PATH (.npz) and stop")
    p.add_argument("--pool", metavar="PATH", type=path_arg, help="read the pool from a file of --export-pool (no sources needed)")
    return p.parse_args(argv)


def prompt_hash(tokens: list[int]) -> int:
    return int.from_bytes(hashlib.sha1(np.asarray(tokens, dtype=np.uint32).tobytes()).digest()[:8], "little")


def pool(tokenizer, seed: int, max_prompt: int, kind: str = "docs") -> tuple[list[int], list[list[int]]]:
    """(pool indices, encoded prompts) of the conversations of `seed` (of POOLS[kind]) with at most
    max_prompt tokens."""
    index, prompts = [], []
    for i, conv in enumerate(POOLS[kind](seed)):
        ids = encode(tokenizer, conv)
        if len(ids) <= max_prompt:
            index.append(i), prompts.append(ids)
    return index, prompts


def token_dtype(vocab_size: int) -> type:
    """The unsigned integer type that shards and pools store token ids of this vocabulary in."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def save_pool(path: str | Path, tokenizer, seed: int, max_prompt: int, kind: str = "docs",
              vocab_size: int = 1 << 16) -> None:
    """The pool's encoded prompts as one file (`--export-pool`), for a machine without the sources."""
    index, prompts = pool(tokenizer, seed, max_prompt, kind)
    tokens = np.asarray([x for p in prompts for x in p], dtype=token_dtype(vocab_size))  # xz: 2/3 of deflate's size
    np.savez_compressed(path, index=np.asarray(index, dtype=np.int64), seed=seed, max_prompt=max_prompt, tasks=kind,
                        offsets=np.cumsum([0] + [len(p) for p in prompts]).astype(np.int64),
                        dtype=tokens.dtype.name,
                        tokens_xz=np.frombuffer(lzma.compress(tokens.tobytes(), preset=9), dtype=np.uint8))


def read_pool(path: str | Path, seed: int, max_prompt: int, kind: str = "docs") -> tuple[list[int], list[list[int]]]:
    """`pool` from a file of `save_pool`, which must hold the pool of these tasks, seed and max_prompt."""
    try:
        with np.load(path) as z:
            theirs = (str(z["tasks"]) if "tasks" in z else "docs", int(z["seed"]), int(z["max_prompt"]))
            dtype = str(z["dtype"]) if "dtype" in z else "uint16"  # pools of before vocabularies over 2^16
            raw, index, offsets = lzma.decompress(z["tokens_xz"].tobytes()), z["index"].tolist(), z["offsets"].tolist()
        tokens = np.frombuffer(raw, dtype=np.dtype(dtype)).astype(np.int64).tolist()
    except BAD_FILE as e:
        raise ValueError(f"{path} is not a pool of --export-pool: {type(e).__name__}: {e}") from None
    if theirs != (kind, seed, max_prompt):
        raise ValueError(f"--pool {path} holds the pool of tasks {theirs[0]!r}, seed {theirs[1]} and max_prompt "
                         f"{theirs[2]}, not of tasks {kind!r}, seed {seed} and max_prompt {max_prompt}")
    if len(offsets) != len(index) + 1 or offsets[-1] != len(tokens):
        raise ValueError(f"{path} is not a pool of --export-pool: {len(index)} prompts, {len(offsets)} offsets "
                         f"ending at {offsets[-1:]}, {len(tokens)} tokens")
    return index, [tokens[a:b] for a, b in zip(offsets, offsets[1:])]


def read_manifest(path: Path) -> dict:
    """OUT/manifest.json: {"recipe": {...}, "shards": {...}, ...}; a manifest of before --tasks holds
    documentation tasks."""
    try:
        manifest = json.loads(path.read_text())
        recipe = manifest["recipe"]
        recipe.setdefault("tasks", "docs")
        if not isinstance(manifest["shards"], dict) or set(recipe) != set(RECIPE_KEYS) or recipe["tasks"] not in POOLS:
            raise KeyError(f"a recipe of {list(RECIPE_KEYS)} (tasks one of {sorted(POOLS)}) and shards")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a dataset manifest: {type(e).__name__}: {e}") from None
    return manifest


def build(args) -> dict:
    from ..loading import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = {k: getattr(args, k) for k in RECIPE_KEYS}
    manifest_path = out / "manifest.json"
    manifest = read_manifest(manifest_path) if manifest_path.exists() else {"recipe": recipe, "shards": {}}
    if manifest["recipe"] != recipe:
        raise ValueError(f"--out {out} holds a dataset of recipe {manifest['recipe']}, not {recipe}")
    t0 = time.time()
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    model.prepack_linears(model.dtype == torch.bfloat16 and prepack_supported(model.device, model.dtype))  # as decoders run
    if args.export_pool:
        save_pool(args.export_pool, model.tokenizer, args.seed, args.max_prompt, args.tasks, model.config.vocab_size)
        return manifest
    if args.pool and not (out / POOL).exists():
        read_pool(args.pool, args.seed, args.max_prompt, args.tasks)  # refused before it is kept
        shutil.copyfile(args.pool, out / POOL)
    if (out / POOL).exists():  # the dataset's own pool: its prompts stay those its shards answered
        index, prompts = read_pool(out / POOL, args.seed, args.max_prompt, args.tasks)
    else:
        index, prompts = pool(model.tokenizer, args.seed, args.max_prompt, args.tasks)
    n_shards = -(-len(prompts) // args.shard_size)
    manifest.update(pool=len(prompts), shard_size=args.shard_size, n_shards=n_shards)
    where = {"gpu": torch.cuda.get_device_name(model.device)} if model.device.type == "cuda" else \
        {"cpu": torch.backends.cpu.get_cpu_capability()}
    built, dtype = 0, token_dtype(model.config.vocab_size)
    for s in range(min(n_shards, args.shards or n_shards)):
        path = out / f"shard-{s:05d}.npz"
        if path.exists():
            continue
        if args.minutes is not None and built and time.time() - t0 > 60 * args.minutes:
            break
        built += 1
        lo, hi = s * args.shard_size, min(len(prompts), (s + 1) * args.shard_size)
        t = time.time()
        got = synthesize(model, prompts[lo:hi], args.gen_tokens, args.gen_batch,
                         eos_token_id=model.tokenizer.eos_token_id)
        answers = [e.tokens[len(p):] for e, p in zip(got, prompts[lo:hi])]
        seconds = time.time() - t
        n_answer = sum(map(len, answers))
        tmp = out / f"shard-{s:05d}.tmp.npz"
        np.savez_compressed(tmp, index=np.asarray(index[lo:hi], dtype=np.int64),
                            prompt_hash=np.asarray([prompt_hash(p) for p in prompts[lo:hi]], dtype=np.uint64),
                            offsets=np.cumsum([0] + [len(a) for a in answers]).astype(np.int64),
                            answers=np.asarray([x for a in answers for x in a], dtype=dtype))
        tmp.replace(path)
        manifest["shards"][str(s)] = {"conversations": hi - lo, "prompt_tokens": sum(map(len, prompts[lo:hi])),
                                      "answer_tokens": n_answer, "seconds": round(seconds, 1),
                                      "answer_tokens_per_s": round(n_answer / seconds, 1), **where,
                                      "threads": torch.get_num_threads(), "gen_batch": args.gen_batch}
        manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        print(f"shard {s}/{n_shards}: {hi - lo} answers, {n_answer} tokens in {seconds:.0f} s "
              f"({n_answer / seconds:.0f} tokens/s)", flush=True)
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def load(path: str | Path, tokenizer, part: str = "all") -> list[Example]:
    """The dataset at path as training examples (prompt + answer, from the prompt's last token), its
    prompts rebuilt from the installed sources (or read from OUT/pool.npz, the pool a --pool run was
    built from); prompts whose tokens changed are dropped with a warning.
    part: "all", "held-out" (the conversations whose pool index is a multiple of HELD_OUT_EVERY: the same
    ones however many shards exist) or "train" (the others)."""
    if part not in ("all", "train", "held-out"):
        raise ValueError(f"load: part must be 'all', 'train' or 'held-out', got {part!r}")
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise ValueError(f"load: {path} has no manifest.json (build it with python -m ht_kernels.train.dataset)")
    recipe = read_manifest(manifest_path)["recipe"]
    kind = recipe["tasks"]
    if (path / POOL).exists():  # built from an exported pool: its prompts, no sources needed
        prompt_of = dict(zip(*read_pool(path / POOL, recipe["seed"], recipe["max_prompt"], kind))).get
    else:
        convs = POOLS[kind](recipe["seed"])

        def prompt_of(i: int) -> list[int] | None:
            return encode(tokenizer, convs[i]) if i < len(convs) else None
    examples, stale = [], 0
    for f in sorted(path.glob("shard-[0-9]*[0-9].npz")):
        try:
            with np.load(f) as z:
                index, hashes = z["index"].tolist(), z["prompt_hash"].tolist()
                offsets, answers = z["offsets"].tolist(), z["answers"].astype(np.int64).tolist()
        except BAD_FILE as e:
            raise ValueError(f"load: {f} is not a shard of a dataset: {type(e).__name__}: {e}") from None
        if not len(index) == len(hashes) == len(offsets) - 1 or offsets[-1:] != [len(answers)]:
            raise ValueError(f"load: {f} is not a shard of a dataset: {len(index)} conversations, {len(hashes)} "
                             f"hashes, {len(offsets)} offsets ending at {offsets[-1:]}, {len(answers)} answer tokens")
        for j, (i, h) in enumerate(zip(index, hashes)):
            if part != "all" and (i % HELD_OUT_EVERY == 0) != (part == "held-out"):
                continue
            prompt = prompt_of(i) or []
            if prompt_hash(prompt) != h:
                stale += 1
                continue
            examples.append(Example(prompt + answers[offsets[j]:offsets[j + 1]], len(prompt) - 1))
    if stale:
        warnings.warn(f"load: {stale} prompts of {path} do not match the prompts its shards answered (the "
                      f"pool or the installed sources changed) and were dropped", stacklevel=2)
    if not examples and part != "held-out":  # a few shards may hold no held-out conversation
        raise ValueError(f"load: no usable {part} examples under {path}")
    return examples


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    m = build(args)
    if args.export_pool:
        print(f"wrote {args.export_pool}")
        return 0
    done = [m["shards"][k] for k in sorted(m["shards"], key=int)]
    print(f"{len(done)}/{m['n_shards']} shards: {sum(d['answer_tokens'] for d in done)} answer tokens, "
          f"{sum(d['prompt_tokens'] for d in done)} prompt tokens, {sum(d['seconds'] for d in done):.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
