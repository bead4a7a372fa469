"""The hardware-aware tree: the step shape that commits the most tokens per second on this machine.

A step's cost depends on its shape only: T real nodes run layers 1..L and n pseudo chains of d nodes run
layers t+1..L. Its yield, tau (mean tokens committed per step), depends on the drafts. `tune_tree`
measures both for every candidate, a dynamic tree of `budget` nodes with chains under its `n_chains`
best-scoring nodes, drafting `depth` levels (the first `depth` of the K maps): the step latency on this
machine at a fixed context, and tau replayed from the drafter's teacher-forced drafts of the model's own
greedy answers to built-in prompts (never an evaluation set). It keeps the candidate with the highest
tau / latency and caches that choice per machine, model, dtype and transfer weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..drafts.drafters import drafter_from_weights
from ..drafts.forced import draft_logprobs
from ..drafts.prompts import builtin_prompts, encode_prompt
from .graphs import StepGraph
from .replay import Replay, answers, root_guesses
from .sampling import greedy
from .transfer import TransferWeights
from .trees import TreePolicy

BUDGETS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
CHAINS = (1, 2, 3, 4, 6, 8, 32, 64)  # capped at the budget: chains under every node
MIN_GAIN = 0.01  # a budget is timed only if its replayed tau beats the next smaller one's by this much
COARSE_REPS, FINALISTS = 3, 6  # every candidate is timed COARSE_REPS times, the best FINALISTS `reps` times
VERSION = 10  # bump when the measurement or the cost of a step changes, so cached choices are remade


@dataclass
class TreeChoice:
    """budget: tree nodes (root included); n_chains: nodes with pseudo chains; depth: draft depths (pseudo
    tokens per chain); head_once: the LM head runs once over every row of the step (else once for the real
    nodes, once for the accepted node's chain); tau: replayed tokens per step; step_ms: median step
    latency; ar_ms: a plain one-token step at the same context; table: one row (budget, n_chains, depth,
    head_once, tau, step_ms, tokens_per_s, finalist) per candidate (finalists: timed again, longer; the
    choice is the best of them)."""

    budget: int
    n_chains: int
    depth: int
    head_once: bool
    tau: float
    step_ms: float
    ar_ms: float
    table: list[dict]

    @property
    def tokens_per_s(self) -> float:
        return 1e3 * self.tau / self.step_ms

    def policy(self, maps: TransferWeights) -> TreePolicy:
        """The chosen tree as a dynamic TreePolicy over the depths of maps (the chosen depth's), with their
        calibration."""
        return TreePolicy(maps.K, None, budget=self.budget, calibration=maps.calibration)


def tune_tree(decoder, prompts: list[list[int]] | None = None, *, budgets=None, chains=None, depths=None,
              gen_tokens: int = 128, context: int | None = None, reps: int = 15, min_gain: float = MIN_GAIN,
              cache: bool = True, log=None) -> TreeChoice:
    """Measure every (budget, n_chains, depth) candidate for `decoder`'s model and maps (`decoder.maps`);
    return the best.

    prompts: calibration prompts as token lists (default: 8 of the package's built-in prompts in the
    model's chat template; needs the tokenizer). gen_tokens: length of the greedy answers replayed.
    context: committed tokens before the timed steps (default 256, less where the model's positions end);
    reps: timed steps per finalist. cache: reuse (and store) the choice kept under
    `$HT_KERNELS_CACHE/trees` (default ~/.cache/ht_kernels/trees) for this machine, model and weights.
    budgets, chains: the candidates (default BUDGETS, CHAINS; chains beyond a budget mean every node).
    depths: draft depths tried (default K - 1 and K: on a 2-core CPU a chain one shorter paid more in step
    time than its drafts lost, benchmarks/RESULTS.md). min_gain: larger trees are timed only while the
    drafts justify them (`justified`); None times every candidate.
    log: a print-like callable for progress and the table (None: silent).
    """
    K = decoder.maps.K
    budgets, chains, depths = budgets or BUDGETS, chains or CHAINS, depths or sorted({max(1, K - 1), K})
    if any(not 1 <= d <= K for d in depths):
        raise ValueError(f"tune_tree: depths must be in [1, K={K}], got {depths}")
    cands = sorted({(b, min(c, b), d) for b in budgets for c in chains for d in depths})
    if not cands or min(b for b, _, _ in cands) < 2:
        raise ValueError(f"tune_tree: budgets must be >= 2 nodes (the root and a draft), got {budgets}")
    room = decoder.model.config.max_seq_len - (max(b for b, _, _ in cands) + decoder.lookup_nodes) * (1 + K)
    context = min(256, room) if context is None else context
    if context < 1 or context > room:
        raise ValueError(f"tune_tree: context + the largest step must fit the model's "
                         f"{decoder.model.config.max_seq_len} positions, got context {context}")
    if prompts is None:
        prompts = builtin_calibration(decoder.model)
    path = _cache_path(decoder, prompts, cands, gen_tokens, context, min_gain)
    if cache and path.exists():
        return TreeChoice(**json.loads(path.read_text()))
    say = log or (lambda *_: None)
    say(f"tree auto: replaying {len(cands)} trees on {len(prompts)} calibration answers")
    taus = _replayed_taus(decoder, prompts, cands, gen_tokens)
    if min_gain is not None:
        cands = justified(cands, taus, min_gain)
    say(f"tree auto: timing the steps of {len(cands)} trees")
    once = _head_once(decoder, cands, reps)
    # A short pass over every candidate, then a long one over the best few and a plain step: a step
    # takes tens of milliseconds and the machine's speed drifts by more than the candidates differ.
    ms, _ = _step_latencies(decoder, cands, once, context, COARSE_REPS)
    finalists = sorted(cands, key=lambda c: -taus[c] / ms[c])[:FINALISTS]
    fine, ar_ms = _step_latencies(decoder, finalists, once, context, reps)
    ms.update(fine)
    table = [{"budget": b, "n_chains": c, "depth": d, "head_once": once[b, c, d], "tau": round(taus[b, c, d], 4),
              "step_ms": round(ms[b, c, d], 3), "tokens_per_s": round(1e3 * taus[b, c, d] / ms[b, c, d], 2),
              "finalist": (b, c, d) in fine}
             for b, c, d in cands]
    best = max((r for r in table if r["finalist"]), key=lambda r: r["tokens_per_s"])
    choice = TreeChoice(best["budget"], best["n_chains"], best["depth"], best["head_once"], best["tau"],
                        best["step_ms"], round(ar_ms, 3), table)
    say(format_table(choice))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(choice)))
        tmp.replace(path)
    return choice


def justified(cands: list[tuple[int, int, int]], taus: dict, min_gain: float) -> list[tuple[int, int, int]]:
    """The (budget, n_chains, depth) candidates whose budget the drafts justify: per chain count (chains
    under every node counting as one setting) and depth, budgets in ascending order, each kept only if its
    replayed tau exceeds that of the last budget kept by the relative min_gain. A larger tree's step costs at
    least a smaller one's, so a budget that adds no tau cannot be faster; this keeps deep and wide trees
    (64 nodes) among the candidates without timing those that good drafts alone would make worth it."""
    kept, last = [], {}
    for b, c, d in sorted(cands):
        key = ("all" if c == b else c, d)
        if key not in last or taus[b, c, d] > last[key] * (1 + min_gain):
            kept.append((b, c, d))
            last[key] = taus[b, c, d]
    return kept


def format_table(choice: TreeChoice) -> str:
    """The candidates as text, the chosen one marked."""
    lines = [f"{'budget':>6} {'chains':>6} {'depth':>5} {'head':>5} {'tau':>6} {'step ms':>8} {'tok/s':>7}  "
             f"(* timed again, < chosen)"]
    chosen = (choice.budget, choice.n_chains, choice.depth)
    for r in choice.table:
        mark = " *" if r["finalist"] else ""
        mark += " <" if (r["budget"], r["n_chains"], r["depth"]) == chosen else ""
        head = "once" if r["head_once"] else "twice"
        lines.append(f"{r['budget']:>6} {r['n_chains']:>6} {r['depth']:>5} {head:>5} "
                     f"{r['tau']:>6.3f} {r['step_ms']:>8.2f} {r['tokens_per_s']:>7.2f}{mark}")
    lines.append(f"plain step {choice.ar_ms:.2f} ms ({1e3 / choice.ar_ms:.2f} tok/s)")
    return "\n".join(lines)


def builtin_calibration(model, n: int = 8, seed: int = 1) -> list[list[int]]:
    """n built-in prompts (`drafts.prompts`) in the model's chat template."""
    if model.tokenizer is None:
        raise ValueError("tree='auto' needs the model's tokenizer for its calibration prompts; pass prompts "
                         "to tune_tree, or a tree")
    return [encode_prompt(model.tokenizer, p) for p in builtin_prompts(n, seed=seed)]


def _replayed_taus(decoder, prompts, cands, gen_tokens) -> dict[tuple[int, int, int], float]:
    """Mean replayed accept length per candidate over the prompts' greedy answers."""
    model = decoder.model
    examples = answers(decoder, prompts, gen_tokens, batch_size=len(prompts), eos_token_id=())  # fixed lengths
    lengths = {c: [] for c in cands}
    with torch.no_grad():
        for depth in sorted({d for _, _, d in cands}):
            drafter = drafter_from_weights(decoder.maps.first(depth)).to(model.device)
            mine = [(b, c) for b, c, d in cands if d == depth]
            cal = decoder.maps.first(depth).calibration
            for (logp, nxt), e in zip(draft_logprobs(model, drafter, examples), examples):  # one replay per budget
                logp, nxt = logp.cpu(), nxt.cpu()  # once for all budgets' replays, which walk on the CPU
                guess = root_guesses(e, depth + decoder.lookup_nodes, decoder.lookup_ngram) if decoder.lookup else None
                replays = {b: Replay(TreePolicy(depth, None, budget=b, calibration=cal), logp, nxt, guess, decoder.lookup,
                                     decoder.lookup_nodes) for b, _ in mine}
                for b, c in mine:
                    lengths[b, c, depth] += replays[b].accept_lengths(gen_tokens, None if c >= b else c)
    return {c: sum(v) / max(1, len(v)) for c, v in lengths.items()}


def _median_ms(fns: dict, device, reps: int, warmup: int = 1) -> dict:
    """Median milliseconds of each callable, timed in turns (one call of each per round), so that a
    change in the machine's speed during the measurement hits every candidate alike; the first `warmup`
    rounds are not timed."""
    times = {key: [] for key in fns}
    for r in range(warmup + reps):
        for key, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[key].append(time.perf_counter() - t0)
    return {key: 1e3 * statistics.median(t) for key, t in times.items()}


@torch.inference_mode()
def _head_once(decoder, cands, reps: int) -> dict[tuple[int, int, int], bool]:
    """Per candidate: whether one LM-head call over all T + n d rows of a step is measured to cost less
    than one over the T real rows plus one over the d rows of a chain."""
    model = decoder.model
    rows = sorted({r for b, c, d in cands for r in (d, b, b + c * d)})
    h = torch.randn(1, max(rows), model.config.dim, dtype=model.dtype, device=model.device)
    ms = _median_ms({r: lambda r=r: model.head(h[:, :r]) for r in rows}, model.device, COARSE_REPS)
    return {(b, c, d): ms[b + c * d] < ms[b] + ms[d] for b, c, d in cands}


@torch.inference_mode()
def _step_latencies(decoder, cands, once, context: int, reps: int):
    """Median latency (ms) of one forward pass per candidate (with its head_once), and of a plain one,
    after `context` random tokens; as CUDA graph replays where the decoder replays its steps."""
    model, K, dev = decoder.model, decoder.maps.K, decoder.model.device
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(model.config.vocab_size, (context,), generator=gen).tolist()
    cache = model.new_cache(1, context + (max(b for b, _, _ in cands) + decoder.lookup_nodes) * (1 + K))
    saved = decoder.tree, decoder.n_chains, decoder.head_once, decoder.transfer.K
    decoder.use_depth(K)
    _, drafts, _ = decoder._prefill([prompt], cache, draft=True)              # [1, K, V]
    depth_drafts = {d: drafts[:, :d].clone() for _, _, d in cands}            # a pass rewrites its drafts
    root = torch.zeros(1, dtype=torch.long, device=dev)
    history = None  # with the context lookup: the prompt, then the root
    if decoder.lookup:
        history = torch.zeros(1, cache.k.shape[2], dtype=torch.long, device=dev)
        history[0, :context] = torch.tensor(prompt, device=dev)
    graphs = decoder.cuda_graphs and dev.type == "cuda"

    def timed(settings=None):  # None: a plain pass. A pass commits nothing: each rewrites the same slots
        def use():  # the candidate's tree and depth; the pass reads them when it runs (or is recorded)
            if settings:
                decoder.tree, decoder.n_chains, decoder.head_once = settings[:3]
                decoder.use_depth(settings[3])

        use()
        forward_pass, out = decoder._forward_pass(settings is not None, root,
                                                  depth_drafts[settings[3]] if settings else drafts, cache,
                                                  greedy, None, None, history if settings else None)

        def run():
            use()
            forward_pass()
        step = StepGraph(run, dev) if graphs else run
        return lambda: (step(), out.tolist())

    try:
        fns = {(b, c, d): timed((TreePolicy(d, None, budget=b, calibration=decoder.maps.first(d).calibration), c,
                                 once[b, c, d], d)) for b, c, d in cands}
        fns["plain"] = timed()
        # a StepGraph runs its warm-up steps eagerly and records on the next call: time its replays only
        ms = _median_ms(fns, dev, reps, warmup=StepGraph.WARMUP + 1 if graphs else 1)
    finally:
        decoder.tree, decoder.n_chains, decoder.head_once = saved[:3]
        decoder.use_depth(saved[3])
    return ms, ms.pop("plain")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_path(decoder, prompts, cands, gen_tokens, context, min_gain) -> Path:
    """One file per machine, threads, torch, model, dtype, execution (prepacked weights, row-exact, CUDA graphs),
    weights, calibration and candidates."""
    model, w = decoder.model, decoder.maps
    if model.device.type == "cuda":
        machine = torch.cuda.get_device_name(model.device)
    else:
        machine = f"{_cpu_name()} x{os.cpu_count()} threads {torch.get_num_threads()}"
    h = hashlib.sha256()
    for part in (VERSION, machine, platform.machine(), torch.__version__, repr(model.config), model.dtype,
                 model.prepacked, model.row_exact, decoder.cuda_graphs, decoder.lookup, decoder.lookup_ngram,
                 decoder.lookup_nodes, w.layer,
                 json.dumps(prompts), cands, gen_tokens, context, min_gain):
        h.update(repr(part).encode())
    extra = [*(w.mlp or ()), *(w.extra[1:] if w.extra else ()), *(w.refine[:2] if w.refine else ()),
             *(() if w.calibration is None else (w.calibration,))]
    h.update(repr((None if w.extra is None else w.extra[0], None if w.refine is None else w.refine[2])).encode())
    for t in (w.weight, w.bias, *extra):  # every tensor of the drafts: maps, variants, refiner, calibration
        h.update(t.detach().float().cpu().numpy().tobytes())
    root = os.environ.get("HT_KERNELS_CACHE") or Path.home() / ".cache" / "ht_kernels"
    return Path(root) / "trees" / f"{h.hexdigest()[:24]}.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
