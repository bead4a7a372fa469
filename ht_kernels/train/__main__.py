"""python -m ht_kernels.train: train hidden-transfer maps (or the Medusa baseline) on a frozen model.

    python -m ht_kernels.train --out runs/smollm2 [--model smollm2-135m] [--method transfer|medusa]
        [--K 3] [--layer T] [--steps 400] [--prompts 800] [--reading 0] [--gen-tokens 256] [--data my.jsonl]
        [--dataset DIR [--dataset DIR2 ...] [--held-out 48] [--eval-every 100]] [--resume]

Data: datasets built by `python -m ht_kernels.train.dataset` (--dataset, repeatable: their training parts;
the first --held-out conversations of each one's held-out part are measured every --eval-every steps into
OUT/curve.jsonl),
or else the model's own greedy answers to --prompts built-in prompts (and to the prompts of --data, whose
{"text"} / {"tokens"} rows are used as they are), then to --reading prompts that ask it to summarise or
answer questions about its own answers (long inputs), made once and kept in OUT/data.jsonl. Writes
OUT/checkpoint.safetensors during training and OUT/transfer.safetensors (or OUT/medusa.safetensors)
at the end. `torchrun --nproc_per_node N -m ht_kernels.train ...` trains data-parallel (gloo on CPU).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from ..drafts.examples import Example
from ..drafts.prompts import builtin_prompts, encode_prompt
from .cli import device_arg, float_in, int_in, path_arg, run_main, threads_arg
from .data import load_jsonl, reading_prompts, synthesize, windows
from .trainer import MAX_BATCH, MAX_K, TrainConfig, _dist, train


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ht_kernels.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=path_arg, help="run directory (data, checkpoint, trained weights)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a .gguf file or an HF directory")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu or cuda (one process per device)")
    p.add_argument("--method", choices=["transfer", "medusa"], default="transfer")
    p.add_argument("--K", type=int_in(1, MAX_K), default=3, help="draft depths")
    p.add_argument("--layer", type=int_in(1), help="transfer layer t (default: n_layers // 2)")
    p.add_argument("--no-chain", action="store_true", help="ablation: pseudo i does not attend pseudo 1..i-1")
    p.add_argument("--init", choices=["lstsq", "identity"], default="lstsq")
    p.add_argument("--init-from", type=path_arg, help="start from these trained weights (a transfer or medusa .safetensors of "
                   "the same method, layer and shapes) instead of --init")
    p.add_argument("--mlp-rank", type=int_in(0), default=0, help="a residual low-rank SiLU block after the maps (0: none)")
    p.add_argument("--extra-layer", type=int_in(0), help="maps of the hidden state after this many layers too (< --layer)")
    p.add_argument("--recall-k", type=int_in(0), default=0, help="add a top-k recall term to the loss (0: none)")
    p.add_argument("--recall-weight", type=float_in(0.0), default=0.5)
    p.add_argument("--steps", type=int_in(1), default=400)
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=4, help="sequences per step (all processes together)")
    p.add_argument("--lr", type=float_in(0.0, 1.0), default=1e-3)
    p.add_argument("--seed", type=int_in(0, 2 ** 63 - 1), default=0)
    p.add_argument("--save-every", type=int_in(1), default=50)
    p.add_argument("--prompts", type=int_in(0), default=800, help="built-in prompts to answer (0: none)")
    p.add_argument("--reading", type=int_in(0), default=0,
                   help="then ask the model to summarise / answer questions about N of its own answers")
    p.add_argument("--gen-tokens", type=int_in(1), default=256, help="new tokens per generated answer")
    p.add_argument("--gen-batch", type=int_in(1), default=64, help="prompts answered at once")
    p.add_argument("--max-len", type=int_in(2), help="longer sequences are split into windows (default: 512, or the "
                   "model's context if shorter)")
    p.add_argument("--data", type=path_arg, help='JSONL of {"prompt"} / {"turns"} rows to answer, {"text"} / {"tokens"} rows as is')
    p.add_argument("--dataset", action="append", type=path_arg, help="a dataset directory of python -m ht_kernels.train.dataset "
                   "(instead of --prompts / --reading / --data; repeat it to train on several)")
    p.add_argument("--held-out", type=int_in(0), default=48, help="held-out conversations of each --dataset measured")
    p.add_argument("--eval-every", type=int_in(1), default=100, help="steps between held-out measurements")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument("--threads", type=threads_arg, help="torch intra-op threads per process")
    return p.parse_args(argv)


def build_data(model, args, max_len: int, rank: int, world: int, dist) -> list[Example]:
    """The training sequences (windows of at most max_len tokens): read from OUT/data.jsonl when it was made
    with the same recipe (the contents of --data included), else made."""
    out = Path(args.out)
    recipe = {"model": args.model, "dtype": args.dtype, "prompts": args.prompts, "reading": args.reading,
              "gen_tokens": args.gen_tokens, "data": args.data, "max_len": max_len, "seed": args.seed,
              "data_sha256": hashlib.sha256(Path(args.data).read_bytes()).hexdigest() if args.data else None}
    path, recipe_path = out / "data.jsonl", out / "data_recipe.json"
    if path.exists() and recipe_path.exists() and json.loads(recipe_path.read_text()) == recipe:
        return [Example(r["tokens"], r["start"]) for r in map(json.loads, path.read_text().splitlines())]
    prompts, texts, seqs = load_jsonl(args.data, model.config.vocab_size) if args.data else ([], [], [])
    try:
        prompts = builtin_prompts(args.prompts, args.seed) + prompts
    except ValueError as e:
        raise ValueError(f"--prompts {args.prompts}: {e}") from None
    if (prompts or texts) and model.tokenizer is None:
        raise ValueError(f"--model {args.model} has no tokenizer: give --data with {{'tokens': [...]}} rows")
    examples = [Example(s, 0) for s in seqs]
    if texts:
        examples += [Example(model.tokenizer(t).input_ids, 0) for t in texts]
    if args.reading and not prompts:
        raise ValueError(f"--reading {args.reading} asks about the model's answers: give --prompts or prompt rows in --data")
    if prompts:
        answers = answer(model, prompts, args.gen_tokens, args, rank, world, dist)
        examples += answers
        if args.reading:  # second round: summarise / answer questions about the model's own texts
            tok = model.tokenizer
            own = [tok.decode(e.tokens[e.start + 1:], skip_special_tokens=True) for e in answers]
            try:
                reading = reading_prompts(own, args.reading, args.seed)
            except ValueError as e:
                raise ValueError(f"--reading {args.reading}: {e}") from None
            examples += answer(model, reading, args.gen_tokens // 2, args, rank, world, dist)
    examples = [w for e in examples for w in windows(e, max_len)]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"tokens": e.tokens, "start": e.start}) + "\n" for e in examples))
        recipe_path.write_text(json.dumps(recipe))
    return examples


def answer(model, prompts: list[str], max_new_tokens: int, args, rank: int, world: int, dist) -> list[Example]:
    """The model's answers to prompts (chat template), split over the processes and gathered on all."""
    from tqdm import tqdm

    encoded = [encode_prompt(model.tokenizer, p) for p in prompts]
    mine = list(range(rank, len(encoded), world))
    bar = tqdm(total=len(mine), desc="answer prompts", disable=rank != 0, dynamic_ncols=True)
    answers = synthesize(model, [encoded[i] for i in mine], max_new_tokens, args.gen_batch,
                         eos_token_id=model.tokenizer.eos_token_id, progress=bar.update)
    bar.close()
    if dist is not None:
        parts = [None] * world
        dist.all_gather_object(parts, answers)
        answers = [parts[i % world][i // world] for i in range(len(encoded))]
    return answers


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from ..loading import load_model

    t0 = time.time()
    # The model loads before the process group starts: transformers' modeling code imports
    # torch.distributed.fsdp, and that import made after init_process_group keeps the gloo group alive
    # past destroy_process_group, whose threads then abort the process at exit.
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    context = model.config.max_seq_len
    if args.max_len is not None and args.max_len > context:
        raise ValueError(f"--max-len {args.max_len} is more than the model's context of {context} positions")
    cfg = TrainConfig(method=args.method, K=args.K, layer=args.layer, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, chain=not args.no_chain, init=args.init, seed=args.seed, save_every=args.save_every,
                      mlp_rank=args.mlp_rank, extra_layer=args.extra_layer, recall_k=args.recall_k,
                      recall_weight=args.recall_weight, init_from=args.init_from)
    cfg.check(model.config)  # before the data is made, which may take long
    meta = {"model": str(args.model), "method": args.method, "recipe": recipe(args)}
    if args.init_from:
        meta["init_from_recipe"] = lineage(args.init_from)
    rank, world, dist = _dist()
    held_out = None
    if args.dataset:
        from .dataset import load

        examples = [e for d in args.dataset for e in load(d, model.tokenizer, "train")]
        held_out = [e for d in args.dataset for e in load(d, model.tokenizer, "held-out")[:args.held_out]]
    else:
        examples = build_data(model, args, args.max_len or min(512, context), rank, world, dist)
    t_data = time.time() - t0
    meta.update(sequences=str(len(examples)), tokens=str(sum(len(e.tokens) for e in examples)))
    drafter = train(model, examples, cfg, args.out, resume=args.resume, meta=meta, held_out=held_out,
                    eval_every=args.eval_every)
    if rank == 0:
        meta.update(config=json.dumps(asdict(cfg), sort_keys=True), data_seconds=f"{t_data:.0f}",
                    train_seconds=f"{drafter.trained['train_seconds']:.0f}",
                    trained_tokens=str(drafter.trained["tokens"]), trained="yes")
        export(drafter, Path(args.out), meta)
    if dist is not None:
        dist.destroy_process_group()
    return 0


def recipe(args) -> str:
    """The command that reproduces these maps: the options that differ from their defaults, with the run
    directory named runs/<its name> (no path of this machine)."""
    default = vars(parse_args(["--out", args.out]))
    opts = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {x}")
            for k, v in vars(args).items() if k not in ("out", "resume") and v != default[k]
            for x in (v if isinstance(v, list) else [v])]
    return " ".join(["python -m ht_kernels.train --out", f"runs/{Path(args.out).name}", *opts])


def lineage(path: str) -> str:
    """The recipes that made the weights at path, newest first ("; before it: "), from their metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"--init-from {path}: not a readable safetensors file: {e}") from None
    steps = [md.get("recipe", "(no recipe)")] + ([md["init_from_recipe"]] if "init_from_recipe" in md else [])
    return "; before it: ".join(steps)


def export(drafter, out: Path, meta: dict) -> Path:
    """The trained maps as the decoder loads them (fp16): OUT/transfer.safetensors or OUT/medusa.safetensors."""
    big = {n: float(p.detach().abs().max()) for n, p in drafter.named_parameters() if not p.half().isfinite().all()}
    if big:
        raise ValueError(f"the trained weights exceed fp16's range (largest magnitudes {big}): training diverged, "
                         f"lower --lr (the checkpoint {out / 'checkpoint.safetensors'} keeps them in fp32)")
    if drafter.kind == "transfer":
        from ..decode.transfer import TransferWeights

        path = out / "transfer.safetensors"
        half = [None if p is None else p.detach().cpu().half()
                for p in (drafter.weight, drafter.bias, drafter.mlp_down, drafter.mlp_up, drafter.extra_weight)]
        TransferWeights(*half[:2], drafter.layer, meta, None if half[2] is None else tuple(half[2:4]),
                        None if half[4] is None else (drafter.extra_layer, half[4])).save(path)
    else:
        from ..baselines.medusa import MedusaWeights

        path = out / "medusa.safetensors"
        MedusaWeights(drafter.weight.detach().cpu().half(), drafter.bias.detach().cpu().half(), meta).save(path)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    raise SystemExit(main())
