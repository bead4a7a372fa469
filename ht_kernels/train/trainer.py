"""Training loop of the draft heads: deterministic batches, AdamW, safetensors checkpoints, resume, and
data parallelism over `torchrun` processes (gloo on CPU).

Every process draws the same global batch of each step (a permutation per epoch from the seed), runs
its share of the rows, and the gradients are summed across processes; the loss is normalised by the
global number of trained drafts, so N processes compute what one process computes on the whole batch.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..drafts.drafters import MedusaDrafter, TransferDrafter, drafter_from_weights
from ..drafts.examples import Example, collate
from ..drafts.forced import anchor_positions, drafter_pass, frozen_pass
from .objective import anchor_mask, distill_loss

CHECKPOINT, CURVE = "checkpoint.safetensors", "curve.jsonl"
MAX_BATCH = 65536  # sequences per step; more would not fit in memory, and drawing them would take long
MAX_K = 8  # draft depths at most


@dataclass
class TrainConfig:
    """method: "transfer" | "medusa"; layer: transfer layer t (None: n_layers // 2); depth_decay: depth i
    weighs depth_decay ** (i - 1); init: "lstsq" | "identity" (transfer maps; Medusa starts at zero);
    chain: pseudo i attends pseudo 1..i-1 of its chain (False: the ablation); mlp_rank: the rank of a
    residual SiLU block after the transfer maps (0: none); extra_layer: maps of the hidden state after
    that many layers too (< layer; None: none); recall_k, recall_weight: the top-k recall term
    of the loss (`objective.distill_loss`; 0: none); init_from: a transfer.safetensors or
    medusa.safetensors file of the same method and shapes to start from (instead of `init`; a variant
    may start from plain maps)."""

    method: str = "transfer"
    K: int = 3
    layer: int | None = None
    steps: int = 400
    batch_size: int = 4
    lr: float = 1e-3
    warmup: int = 20
    depth_decay: float = 0.8
    teacher_top_k: int = 32
    chain: bool = True
    init: str = "lstsq"
    init_batches: int = 8
    seed: int = 0
    save_every: int = 50
    mlp_rank: int = 0
    extra_layer: int | None = None
    recall_k: int = 0
    recall_weight: float = 0.5
    init_from: str | None = None

    def check(self, config) -> None:
        """Refuse what the model (its `ModelConfig`) cannot train: ValueErrors naming the field."""
        for name in ("method", "init"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str, got {getattr(self, name)!r}")
        if self.method not in ("transfer", "medusa"):
            raise ValueError(f"method must be 'transfer' or 'medusa', got {self.method!r}")
        if self.init not in ("lstsq", "identity"):
            raise ValueError(f"init must be 'lstsq' or 'identity', got {self.init!r}")
        if not isinstance(self.chain, bool):
            raise ValueError(f"chain must be a bool, got {self.chain!r}")
        layer = config.n_layers // 2 if self.layer is None else self.layer  # the transfer layer
        ints = {"K": (1, MAX_K), "steps": (1, None), "batch_size": (1, MAX_BATCH), "warmup": (0, None),
                "teacher_top_k": (1, config.vocab_size), "init_batches": (1, None), "seed": (0, 2 ** 63 - 1),
                "save_every": (1, None), "mlp_rank": (0, config.dim), "recall_k": (0, config.vocab_size - 1),
                "layer": (1, config.n_layers - 1), "extra_layer": (0, layer - 1)}
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if v is None and name in ("layer", "extra_layer"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
                raise ValueError(f"{name} must be an int in [{lo}, {'inf' if hi is None else hi}] for this "
                                 f"{config.n_layers}-layer model of dim {config.dim} and {config.vocab_size} "
                                 f"tokens, got {v!r}")
        for name, ok, what in (("lr", lambda v: 0 <= v <= 1, "in [0, 1]"), ("depth_decay", lambda v: v > 0, "> 0"),
                               ("recall_weight", lambda v: v >= 0, ">= 0")):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{name} must be a finite number {what}, got {v!r}")
        if (self.mlp_rank or self.extra_layer is not None) and self.method != "transfer":
            raise ValueError(f"mlp_rank and extra_layer apply to method 'transfer', got method {self.method!r}")
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from.strip()):
            raise ValueError(f"init_from must be None or the path of a weights file, got {self.init_from!r}")


def _dist():
    """(rank, world size, process group or None) of a torchrun launch; one process otherwise."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), dist
    return 0, 1, None


def check_examples(examples: list[Example], K: int, config) -> None:
    """Refuse training data the model (its `ModelConfig`) cannot run: ValueErrors naming the example."""
    if not isinstance(examples, list) or not examples:
        raise ValueError(f"training data is empty: examples must be a non-empty list of Example, got "
                         f"{type(examples).__name__} of {len(examples) if hasattr(examples, '__len__') else '?'}")
    V, N = config.vocab_size, config.max_seq_len
    for i, e in enumerate(examples):
        if not isinstance(e, Example) or not isinstance(e.tokens, list):
            raise ValueError(f"example {i} must be an Example with a list of tokens, got {e!r:.100}")
        toks = e.tokens
        if not 1 <= len(toks) <= N:
            raise ValueError(f"example {i} has {len(toks)} tokens; a sequence needs 1 to {N} (the model's context)")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in toks) or not 0 <= min(toks) <= max(toks) < V:
            bad = next(t for t in toks if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < V)
            raise ValueError(f"example {i} holds token {bad!r}, not a token id in [0, {V})")
        if not isinstance(e.start, int) or isinstance(e.start, bool) or not 0 <= e.start < len(toks):
            raise ValueError(f"example {i}: start must be an int in [0, {len(toks)}) (its tokens), got {e.start!r}")
    if all(len(e.tokens) - e.start < K + 1 for e in examples):
        raise ValueError(f"every training sequence is too short: a sequence needs at least K + 1 = {K + 1} tokens "
                         f"from its first trained anchor on")


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of global batch `step`: consecutive slices of one seeded permutation per epoch."""
    out = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        take = min(batch_size - len(out), n - offset)
        out += perm[offset:offset + take]
        pos += take
    return out


def n_trained(examples: list[Example], K: int) -> int:
    """Drafts trained on these examples: anchors n >= start with n + i < len, i = 1..K (see anchor_mask)."""
    return sum(max(0, len(e.tokens) - i - e.start) for e in examples for i in range(1, K + 1))


def make_drafter(cfg: TrainConfig, model):
    c = model.config
    if cfg.method == "medusa":
        return MedusaDrafter(cfg.K, c.dim)
    return TransferDrafter(cfg.K, c.dim, c.n_layers // 2 if cfg.layer is None else cfg.layer, cfg.chain,
                           cfg.mlp_rank, cfg.extra_layer)


def _lr(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to 10% of lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def _lstsq_stats(model, drafter: TransferDrafter, examples, cfg, rank, world, dist):
    """Sums for TransferDrafter.init_lstsq over the first init_batches global batches (fp64)."""
    D = model.config.dim
    xtx = torch.zeros(D + 1, D + 1, dtype=torch.float64)
    xty = torch.zeros(cfg.K, D + 1, D, dtype=torch.float64)
    for step in range(cfg.init_batches):
        rows = batch_indices(len(examples), cfg.batch_size, step, cfg.seed)[rank::world]
        if not rows:
            continue
        tokens, lengths, starts = collate([examples[i] for i in rows], model.device)
        h = frozen_pass(model, tokens, drafter.layer, 1, teacher_from=tokens.shape[1]).hidden.double().cpu()  # [B, N, D]
        B, N, _ = h.shape
        a = torch.cat([h, torch.ones(B, N, 1, dtype=h.dtype)], -1)
        trained = anchor_mask(lengths.cpu(), starts.cpu(), torch.arange(N).expand(B, N), cfg.K)
        for i in range(1, cfg.K + 1):
            m = trained[:, : N - i, i - 1]                                             # anchor n, target n + i
            x, y = a[:, : N - i][m], h[:, i:][m]
            xty[i - 1] += x.T @ y
            if i == 1:
                xtx += x.T @ x
    if dist is not None:
        dist.all_reduce(xtx)
        dist.all_reduce(xty)
    return xtx, xty


@torch.no_grad()
def init_from_weights(drafter, path: str) -> None:
    """Start from trained weights (`TransferWeights` / `MedusaWeights` file) of the drafter's own method and
    shapes: a later run continues an earlier recipe's heads on other data. A transfer variant may start
    from maps without its additions (the residual block, the extra layer's maps): those keep their zero
    start, so the variant begins exactly as the maps it was given."""
    from ..baselines.medusa import MedusaWeights
    from ..decode.transfer import TransferWeights

    weights = (TransferWeights if drafter.kind == "transfer" else MedusaWeights).load(path)
    start = drafter_from_weights(weights, getattr(drafter, "chain", True))
    if getattr(start, "layer", None) != getattr(drafter, "layer", None):
        raise ValueError(f"init_from: {path} maps layer {start.layer}, this run trains layer {drafter.layer}")
    ours, theirs = dict(drafter.named_parameters()), dict(start.named_parameters())
    added = {"mlp_down", "mlp_up", "extra_weight"} if drafter.kind == "transfer" else set()
    if any(n not in ours or ours[n].shape != p.shape for n, p in theirs.items()) or set(ours) - set(theirs) - added:
        raise ValueError(f"init_from: {path} holds {({n: list(p.shape) for n, p in theirs.items()})}, this run "
                         f"trains {({n: list(p.shape) for n, p in ours.items()})}")
    for name, p in theirs.items():
        ours[name].copy_(p)


def _check_finite(drafter, when: str) -> None:
    bad = [name for name, p in drafter.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"the draft heads' {bad} are not finite at {when}")


def save_checkpoint(path: Path, drafter, opt, step: int, cfg: TrainConfig, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {name: p.detach().cpu().contiguous() for name, p in drafter.named_parameters()}
    for name, p in drafter.named_parameters():
        state = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"adam.{key}.{name}"] = state[key].cpu().contiguous()
    md = {"step": str(step), "config": json.dumps(asdict(cfg), sort_keys=True), **meta}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=md)
    tmp.replace(path)


def load_checkpoint(path: Path, drafter, opt, cfg: TrainConfig) -> tuple[int, dict]:
    """Restore parameters and optimizer moments; returns the step to continue from and the metadata."""
    from safetensors import SafetensorError, safe_open

    def saved_as(name: str) -> list[str]:  # a parameter's tensors: itself, then its AdamW moments after step 0
        return [name] + [f"adam.{k}.{name}" for k in ("exp_avg", "exp_avg_sq") if step > 0]

    try:
        with safe_open(str(path), framework="pt") as f:
            md, names = f.metadata() or {}, set(f.keys())
            saved = json.loads(md["config"])
            if not isinstance(saved, dict):
                raise KeyError("config")
            step = md["step"]
            if not step.isdigit() or not 0 <= int(step) <= cfg.steps:
                raise ValueError(f"--resume: {path} holds step {step!r}, not one of 0..{cfg.steps}")
            step = int(step)
            if saved != asdict(cfg):
                diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if saved.get(k) != v}
                raise ValueError(f"--resume: {path} was trained with another configuration (saved, now): {diff}")
            need = {n for name, _ in drafter.named_parameters() for n in saved_as(name)}
            if need - names:
                raise ValueError(f"--resume: {path} lacks the tensors {sorted(need - names)}")
            tensors = {n: f.get_tensor(n) for n in need}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"--resume: {path} is not a checkpoint of this trainer: {type(e).__name__}: {e}") from None
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            for n in saved_as(name):
                if tensors[n].shape != p.shape or not torch.isfinite(tensors[n]).all():
                    raise ValueError(f"--resume: {path} holds {n} of shape {list(tensors[n].shape)} "
                                     f"({'finite' if torch.isfinite(tensors[n]).all() else 'not finite'}), "
                                     f"this model needs finite {list(p.shape)}")
            p.copy_(tensors[name])
            if step > 0:
                opt.state[p] = {"step": torch.tensor(float(step)),
                                **{k: tensors[f"adam.{k}.{name}"].to(p.device) for k in ("exp_avg", "exp_avg_sq")}}
    return step, md


@torch.no_grad()
def evaluate(model, drafter, examples: list[Example], cfg: TrainConfig, rank: int = 0, world: int = 1,
             dist=None) -> dict:
    """The distillation loss's statistics on examples (each process its share): per depth the mean
    cross-entropy against the teacher's top-k, the top-1 / top-5 hit rates of the teacher's argmax, and
    the number of drafts measured."""
    depth_w = torch.ones(cfg.K, device=model.device)
    total = torch.zeros(4, cfg.K)
    mine = examples[rank::world]
    for s in range(0, len(mine), cfg.batch_size):
        tokens, lengths, starts = collate(mine[s:s + cfg.batch_size], model.device)
        anchors = anchor_positions(lengths, starts, tokens.shape[1])
        frozen = drafter_pass(model, drafter, tokens, cfg.teacher_top_k, starts + 1, anchors.shape[1])
        mask = anchor_mask(lengths, starts, anchors, cfg.K)
        total += distill_loss(model, drafter(model, frozen, anchors), frozen, anchors, mask, depth_w, 1.0)[1].cpu()
    if dist is not None:
        dist.all_reduce(total)
    ce, top1, top5, n = total
    n = n.clamp_min(1)
    return {"ce": (ce / n).tolist(), "top1": (top1 / n).tolist(), "top5": (top5 / n).tolist(),
            "drafts": total[3].long().tolist()}


def train(model, examples: list[Example], cfg: TrainConfig, out_dir: str | Path, resume: bool = False,
          meta: dict | None = None, progress: bool = True, held_out: list[Example] | None = None,
          eval_every: int = 100):
    """Train cfg.method's draft heads on the frozen model; returns the drafter (fp32 parameters; its
    `trained` dict: steps, training seconds and sequence tokens over all runs of the checkpoint).

    Writes out_dir/checkpoint.safetensors every save_every steps and at the end (parameters, AdamW
    moments, step, config and `meta` as metadata). resume=True continues from that checkpoint, which
    must hold the same config. held_out: examples never trained on, measured (`evaluate`) before the
    first step, every eval_every steps and at the end; each measurement is a line of out_dir/curve.jsonl
    with the step, the training seconds and tokens so far. Under torchrun every process must pass the
    same examples. model: an ht_kernels Transformer or a transformers Llama / Qwen2 / Mistral model (its
    weights are shared).
    """
    if not hasattr(model, "run_layers"):
        from ..loading import load_model

        model = load_model(model)
    cfg.check(model.config)
    if not isinstance(eval_every, int) or isinstance(eval_every, bool) or eval_every < 1:
        raise ValueError(f"eval_every must be an int >= 1, got {eval_every!r}")
    check_examples(examples, cfg.K, model.config)
    rank, world, dist = _dist()
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    drafter = make_drafter(cfg, model).to(model.device)
    opt = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start, saved = 0, {}
    ckpt = out_dir / CHECKPOINT
    if resume:
        if not ckpt.exists():
            raise ValueError(f"--resume: no checkpoint at {ckpt}")
        start, saved = load_checkpoint(ckpt, drafter, opt, cfg)
    elif cfg.init_from:
        init_from_weights(drafter, cfg.init_from)
    elif cfg.method == "transfer" and cfg.init == "lstsq":
        drafter.init_lstsq(*_lstsq_stats(model, drafter, examples, cfg, rank, world, dist))
    _check_finite(drafter, f"the start of training ({ckpt if resume else cfg.init_from or cfg.init})")
    depth_w = torch.tensor([cfg.depth_decay ** i for i in range(cfg.K)], device=model.device)
    meta = {"method": cfg.method, **(meta or {})}
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.method}", dynamic_ncols=True)
    window = torch.zeros(4, cfg.K)
    curve = out_dir / CURVE
    # training time (held-out measurements left out) and sequence tokens over all runs of this checkpoint
    train_s, tokens_seen = float(saved.get("train_seconds", 0)), int(saved.get("trained_tokens", 0))

    def measure(step: int) -> None:
        if held_out:
            row = {"step": step, "seconds": round(train_s, 1), "tokens": tokens_seen,
                   "held_out": evaluate(model, drafter, held_out, cfg, rank, world, dist)}
            if rank == 0:
                with curve.open("a") as f:
                    f.write(json.dumps(row) + "\n")

    if rank == 0 and curve.exists():  # keep the measurements up to the step this run starts from
        rows = [r for r in map(json.loads, curve.read_text().splitlines()) if r["step"] < start]
        curve.write_text("".join(json.dumps(r) + "\n" for r in rows))
    measure(start)
    for step in range(start, cfg.steps):
        t0 = time.time()
        batch = [examples[i] for i in batch_indices(len(examples), cfg.batch_size, step, cfg.seed)]
        tokens_seen += sum(len(e.tokens) for e in batch)
        normalizer = max(1, n_trained(batch, cfg.K))
        mine = batch[rank::world]
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        opt.zero_grad(set_to_none=False)
        stats = torch.zeros(4, cfg.K)
        if mine:
            tokens, lengths, starts = collate(mine, model.device)
            anchors = anchor_positions(lengths, starts, tokens.shape[1])
            frozen = drafter_pass(model, drafter, tokens, cfg.teacher_top_k, starts + 1, anchors.shape[1])
            mask = anchor_mask(lengths, starts, anchors, cfg.K)
            loss, stats = distill_loss(model, drafter(model, frozen, anchors), frozen, anchors, mask, depth_w,
                                       normalizer, recall=(cfg.recall_k, cfg.recall_weight))
            loss.backward()
            stats = stats.cpu()
        else:  # more processes than rows: contribute zero gradients
            for p in drafter.parameters():
                p.grad = torch.zeros_like(p)
        if dist is not None:
            for p in drafter.parameters():
                dist.all_reduce(p.grad)
            dist.all_reduce(stats)
        if not torch.isfinite(torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)):
            raise ValueError(f"training diverged at step {step + 1}: its gradients are not finite (lr {cfg.lr})")
        opt.step()
        train_s += time.time() - t0
        window = 0.9 * window + stats
        if bar is not None:
            ce, top1, top5, n = window
            bar.set_postfix_str(f"ce {float(ce.sum() / n.sum()):.3f} top1 " +
                                "/".join(f"{a:.2f}" for a in (top1 / n.clamp_min(1)).tolist()))
            bar.update(1)
        if (step + 1) % eval_every == 0 or step + 1 == cfg.steps:
            measure(step + 1)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            _check_finite(drafter, f"step {step + 1} (lr {cfg.lr})")  # every process: the same parameters
            if rank == 0:
                save_checkpoint(ckpt, drafter, opt, step + 1, cfg,
                                {**meta, "train_seconds": f"{train_s:.1f}", "trained_tokens": str(tokens_seen)})
    if bar is not None:
        bar.close()
    if dist is not None:
        dist.barrier()
    drafter.trained = {"steps": cfg.steps, "train_seconds": round(train_s, 1), "tokens": tokens_seen}
    return drafter
