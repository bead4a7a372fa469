"""Lossless hidden-transfer decoding, and the plain one-token-per-step baseline, over a batch of prompts.

A step feeds the tree [root + drafts] through layers 1..t, turns the hidden state of every chosen node
into K pseudo states (`hidden_transfer`), runs real and pseudo nodes through layers t+1..L (real nodes
never see pseudo nodes), verifies the drafts against the real nodes' logits, moves the accepted nodes'
keys/values to their committed slots (`compact_kv`), and drafts the next tree from the pseudo logits of
the last accepted node. The root of every step is the target's own choice, so every emitted token is
what plain decoding would emit (greedy), or a sample of the same distribution (sampling).
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..cpu import prepack_bytes, prepack_supported
from ..drafts.examples import right_pad
from ..drafts.forced import transfer_mlp
from ..drafts.refine import RootRefiner
from ..model import KVCache
from ..ops._backend import BACKENDS
from ..ops.compact_kv import compact_kv
from ..ops.hidden_transfer import hidden_transfer
from ..ops.tree_attention import cache_bounds_known
from ..ops.verify_tree import verify_tree_greedy
from .checks import count, real, token_ids
from .graphs import StepGraph
from .lookup import NODES as LOOKUP_NODES, WEIGHT as LOOKUP_WEIGHT, extend_tree, lookup_drafts, with_lookup
from .sampling import greedy, sample, verify_tree_sampling, warp_probs
from .transfer import resolve_transfer
from .trees import DEFAULT_PATHS, StepTree, TreePolicy, step_layout


@dataclass
class GenerateOutput:
    """sequences: the new tokens of each row (eos included when it ends a row). accept_lengths: the
    tokens each forward pass emitted for each row, the prefill's first token included, so they sum to
    len(sequences[b]); the mean of accept_lengths[b][1:] is the mean accepted length per step."""

    sequences: list[list[int]]
    accept_lengths: list[list[int]]


class HiddenTransferDecoder:
    """model: an ht_kernels Transformer (or a transformers Llama-family model, wrapped without copying).
    transfer: "default" (the weights shipped for the model), a weights file, TransferWeights, or None
    (untrained maps). tree: None (a static Medusa-style tree), a list of top-k rank paths, "dynamic" (the
    best `budget` nodes by draft probability, per row), a TreePolicy, or "auto": the dynamic budget and
    n_chains (and depth) with the most tokens per second on this machine (`autotree.tune_tree`: measured
    once, one to two minutes, then cached; the choice is in `tree_choice`). n_chains: pseudo chains hang under
    every real node (None) or under the n_chains best-scoring ones. depth: the draft depths a step uses, the
    first `depth` of the K maps (None: all K); each chain then carries `depth` pseudo tokens, so a shallower
    draft makes every step cheaper. The full maps stay in `maps`, the ones in use in `transfer`.
    backend: the backend of the step's hidden_transfer, verify_tree_greedy and compact_kv ("auto" | "cuda"
    | "triton" | "torch"; the last two have no Triton kernels and run "auto" under "triton"); tree
    attention takes the model's `attn_backend`.
    cuda_graphs: on CUDA, greedy decoding records its step once per generate call as a CUDA graph and
    replays it (`graphs.StepGraph`; `graph_status` tells how the last call ran); sampling runs eagerly.
    prepack: run the model's linear layers through oneDNN weights packed ahead (`model.prepack_linears`:
    CPU fp32 or bf16, one more copy of the weights); None: where supported for bf16, unless the copy would
    take more than half of the memory available (it warns then); fp32 on request.
    exact: make every row's values independent of the rows beside it (`model.set_row_exact`; CPU bf16),
    so that greedy `generate` gives `generate_ar`'s tokens bit for bit, not only up to near-ties; the linear
    layers then run packed even with prepack=False. It costs both decoders time (README), so it is off by
    default.
    lookup: the weight w in [0, 1) of the context lookup's guesses mixed into each step's drafts
    (`lookup.py`: the tokens that followed the latest earlier occurrence of the last `lookup_ngram` or
    fewer tokens, root included; default 0.25); 0: drafts from the maps alone. lookup_nodes: that many
    more tree nodes per step carry the guess on below its deepest node in the tree (`extend_tree`;
    None: 2 with the lookup, 0 without).
    """

    def __init__(self, model, transfer="default", *, tree=None, budget: int = 16, n_chains: int | None = None,
                 backend: str = "auto", cuda_graphs: bool = True, prepack: bool | None = None,
                 exact: bool = False, depth: int | None = None, lookup: float = LOOKUP_WEIGHT,
                 lookup_ngram: int = 3, lookup_nodes: int | None = None):
        if not hasattr(model, "run_layers"):
            from ..loading import load_model

            model = load_model(model)
        self.model = model
        cfg = model.config
        weights = resolve_transfer(transfer, cfg.name, cfg.dim, cfg.n_layers)
        param = next(model.parameters())
        self.maps = weights
        cast = [weights.weight, weights.bias, *(weights.mlp or (None, None)),
                None if weights.extra is None else weights.extra[1]]
        self._cast = [None if t is None else t.to(param.device, param.dtype) for t in cast]
        for name, t in zip(("weight", "bias", "mlp down", "mlp up", "extra weight"), self._cast):
            traced = torch.compiler.is_compiling()  # no values to check
            if t is not None and not traced and not bool(t.isfinite().all()):
                raise ValueError(f"transfer {name} {list(t.shape)} must be finite in the model's {param.dtype}, "
                                 f"holds {int((~t.isfinite()).sum())} NaN or inf values")
        if n_chains is not None and (not isinstance(n_chains, int) or isinstance(n_chains, bool) or n_chains < 1):
            raise ValueError(f"n_chains must be None (every node) or an int >= 1 (the root's chain at least), "
                             f"got {n_chains!r}")
        self.use_depth(weights.K if depth is None else depth)
        self._set_execution(backend, cuda_graphs, prepack, exact)
        self._set_lookup(lookup, lookup_ngram, lookup_nodes)
        self.tree_choice, self.head_once = None, False
        if isinstance(tree, str) and tree == "auto":
            for name, value in (("n_chains", n_chains), ("depth", depth)):
                if value is not None:
                    raise ValueError(f"{name}: tree='auto' chooses it, got {name}={value!r}")
            from .autotree import tune_tree

            self.tree, self.n_chains = make_tree_policy("dynamic", weights.K, budget, weights.calibration), None
            self.tree_choice = tune_tree(self)
            self.use_depth(self.tree_choice.depth)
            self.tree, self.n_chains = self.tree_choice.policy(self.transfer), self.tree_choice.n_chains
            self.head_once = self.tree_choice.head_once
        else:
            self.tree, self.n_chains = make_tree_policy(tree, self.transfer.K, budget, self.transfer.calibration), n_chains

    def use_depth(self, depth: int) -> None:
        """Draft depths 1..depth from the first `depth` maps (`transfer`, `weight`, `bias`); the tree policy
        must then be one over `depth` depths."""
        self.transfer = self.maps.first(depth)
        self.weight, self.bias, down, up, self.extra_weight = (None if t is None else t[:depth] for t in self._cast)
        self.mlp = None if down is None else (down, up)  # the residual block after the maps, or None
        self.extra_layer = None if self.maps.extra is None else self.maps.extra[0]
        refine = self.transfer.refine  # re-ranks the drafts once the next root is known (`_refine`), or None
        self.refiner = None if refine is None else RootRefiner.from_weights(*refine).to(self.model.device)

    def _set_lookup(self, lookup: float, ngram: int, nodes: int | None) -> None:
        if not (isinstance(lookup, (int, float)) and 0.0 <= lookup < 1.0):
            raise ValueError(f"lookup must be a weight in [0, 1), got {lookup!r}")
        if not isinstance(ngram, int) or ngram < 1:
            raise ValueError(f"lookup_ngram must be an int >= 1, got {ngram!r}")
        if nodes is None:
            nodes = LOOKUP_NODES if lookup else 0
        if not isinstance(nodes, int) or nodes < 0 or (nodes and not lookup):
            raise ValueError(f"lookup_nodes must be an int >= 0, and 0 without the lookup (lookup={lookup!r}), "
                             f"got {nodes!r}")
        self.lookup, self.lookup_ngram, self.lookup_nodes = float(lookup), ngram, nodes

    def _set_execution(self, backend: str, cuda_graphs: bool, prepack: bool | None, exact: bool = False) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        m = self.model
        if prepack is None:  # bf16 only: there the packed weights give F.linear's values (AMX: within rounding)
            prepack = m.dtype == torch.bfloat16 and prepack_supported(m.device, m.dtype)
            free, need = (available_memory(), prepack_bytes(m)) if prepack and not m.prepacked else (None, 0)
            if free is not None and need > free / 2:
                warnings.warn(f"prepack: the packed copy of the linear weights ({need / 2**30:.2f} GiB) would take "
                              f"more than half of the {free / 2**30:.2f} GiB of memory available: running "
                              f"unpacked (prepack=True packs anyway)", stacklevel=3)
                prepack = False
        if prepack != m.prepacked:
            m.prepack_linears(prepack)
        m.set_row_exact(exact)
        self.backend, self.cuda_graphs = backend, bool(cuda_graphs)
        # padded prompt tokens per prefill pass (`_prefill`): ~2k keeps a CPU pass's activations in its caches
        self.prefill_tokens = PREFILL_TOKENS_CPU if m.device.type == "cpu" else PREFILL_TOKENS
        # verify_tree_greedy and compact_kv have no Triton kernels: "triton" leaves them to "auto"
        self.verify_backend = "auto" if backend == "triton" else backend
        # The last generate call's: None (no CUDA graph tried), "replayed", or "eager: <why recording failed>"
        self.graph_status: str | None = None

    def generate(self, input_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, generator: torch.Generator | None = None, eos_token_id=None,
                 callback: Callable[[list[list[int]]], None] | None = None) -> GenerateOutput:
        """Hidden-transfer decoding. input_ids: list of token-id lists (ragged) or LongTensor [B, S].
        temperature 0: the greedy continuation; otherwise a sample of the model's own warped
        distribution. eos_token_id: an id or ids that end a row; None: the model's own end-of-sequence
        tokens (`model.eos_token_ids`, as transformers' generate does); () : none, every row runs
        max_new_tokens. callback(new_tokens) receives each forward pass's new tokens per row."""
        return self._generate(input_ids, max_new_tokens, temperature, top_p, top_k, generator, eos_token_id,
                              callback, speculative=True)

    def generate_ar(self, input_ids, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                    top_k: int = 0, generator: torch.Generator | None = None, eos_token_id=None,
                    callback: Callable[[list[list[int]]], None] | None = None) -> GenerateOutput:
        """Plain decoding, one token per forward pass; same arguments and result as `generate`."""
        return self._generate(input_ids, max_new_tokens, temperature, top_p, top_k, generator, eos_token_id,
                              callback, speculative=False)

    @torch.inference_mode()
    @cache_bounds_known()  # the cache below is sized for every step: no host read of its lengths per layer
    def _generate(self, input_ids, max_new_tokens, temperature, top_p, top_k, generator, eos_token_id,
                  callback, speculative: bool) -> GenerateOutput:
        m, cfg = self.model, self.model.config
        prompts = _prompts(input_ids, cfg.vocab_size)
        max_new_tokens = count("max_new_tokens", max_new_tokens, 1)
        temperature = real("temperature", temperature, 0.0)
        top_p, top_k = real("top_p", top_p, 0.0, 1.0, low_open=True), count("top_k", top_k)
        if generator is not None and (not isinstance(generator, torch.Generator)
                                      or generator.device.type != m.device.type):
            raise ValueError(f"generator must be None or a torch.Generator on the model's {m.device.type}, got "
                             f"{getattr(generator, 'device', generator)!r}")
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be None or callable, got {callback!r}")
        eos = set(m.eos_token_ids) if eos_token_id is None else token_ids("eos_token_id", eos_token_id)
        B, P = len(prompts), max(map(len, prompts))
        step_len = self._step_tokens() if speculative else 1
        need = P + max_new_tokens + step_len
        if need > cfg.max_seq_len:
            raise ValueError(f"the longest prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) + one step "
                             f"({step_len} tokens) need {need} positions, more than the model's {cfg.max_seq_len}")
        cache = m.new_cache(B, need)
        warp = None if temperature == 0 else (lambda x: warp_probs(x, temperature, top_k, top_p))

        def choose(logits):
            return greedy(logits) if warp is None else sample(warp(logits), generator)

        logits, drafts, states = self._prefill(prompts, cache, draft=speculative)
        root = choose(logits)
        if self.refiner is not None and speculative:
            drafts = self._refine(drafts, states, root)
        seqs, steps, active = [[] for _ in range(B)], [[] for _ in range(B)], [True] * B
        self._emit(root[:, None].tolist(), seqs, steps, active, max_new_tokens, eos, callback)
        history = None
        if speculative and self.lookup:  # every row's tokens by position: the prompt, then the root
            history = right_pad(prompts, root.device)[0]
            history = torch.cat([history, history.new_zeros(B, need - history.shape[1])], 1)
            history.scatter_(1, cache.lengths[:, None].long(), root[:, None])
        forward_pass, out = self._forward_pass(speculative, root, drafts, cache, choose, warp, generator, history)
        graphs = self.cuda_graphs and warp is None and root.is_cuda
        run = StepGraph(forward_pass, root.device) if graphs else forward_pass
        live, n_live = torch.ones(B, dtype=cache.lengths.dtype, device=root.device), B
        while any(active):
            run()
            rows = [r[1:1 + r[0]] for r in out.tolist()]
            self._emit(rows, seqs, steps, active, max_new_tokens, eos, callback)
            # Commit the pass's accepted nodes for the rows that go on; a retired row's cache stays as
            # it was, so its later (ignored) passes stay inside the P + max_new_tokens + one step slots.
            if sum(active) < n_live:
                live, n_live = torch.tensor(active, dtype=live.dtype, device=live.device), sum(active)
            cache.lengths += out[:, 0].to(live.dtype) * live
        self.graph_status = None if not graphs else "replayed" if run.graph is not None else f"eager: {run.error}"
        return GenerateOutput(seqs, steps)

    def _forward_pass(self, speculative: bool, root, drafts, cache, choose, warp, generator, history=None):
        """One forward pass over static tensors, as a function of none, and its output buffer out
        [B, 1 + W] (W: the tree's nodes, 1 for a plain pass). The pass advances root [B] (and drafts
        [B, K, V]) in place, moves the accepted nodes' keys/values behind the prefix, and writes into out
        each row's count n of new tokens, then the n tokens. It commits nothing (the caller adds n to the
        lengths of the rows that go on) and, greedy, reads nothing on the host, so a CUDA graph can
        replay it. history: None, or [B, S] each row's tokens by position, the root at cache.lengths:
        the pass mixes the context lookup's guesses into the drafts and writes its new tokens there."""
        nodes = self.tree.size + (self.lookup_nodes if history is not None else 0)
        out = torch.zeros(root.shape[0], 1 + (nodes if speculative else 1), dtype=torch.long,
                          device=root.device)
        if not speculative:
            def forward_pass():
                nxt = choose(self._forward_all(root[:, None], cache.lengths[:, None].long(), cache)[:, 0])
                out.copy_(torch.stack([torch.ones_like(nxt), nxt], 1))
                root.copy_(nxt)
            return forward_pass, out

        def forward_pass():
            guess = None if history is None else \
                lookup_drafts(history, cache.lengths, drafts.shape[1] + self.lookup_nodes, self.lookup_ngram)
            tree, accepted, accept_len, nxt, nxt_drafts = self._step(root, drafts, cache, warp, generator, guess)
            compact_kv(cache.k, cache.v, cache.lengths, accepted, accept_len, backend=self.verify_backend)
            path = tree.tokens.gather(1, accepted.clamp_min(0))                       # [B, T]
            new = torch.cat([path[:, 1:], nxt[:, None]], 1).scatter_(1, (accept_len - 1)[:, None], nxt[:, None])
            out.copy_(torch.cat([accept_len[:, None], new], 1))
            if history is not None:  # new tokens after the root (those past accept_len are rewritten later)
                at = cache.lengths[:, None].long() + torch.arange(1, new.shape[1] + 1, device=new.device)
                history.scatter_(1, at, new)
            root.copy_(nxt)
            drafts.copy_(nxt_drafts)
        return forward_pass, out

    def _run_prompts(self, prompts: list[list[int]], cache, cuts: tuple[int, ...]) -> list[torch.Tensor]:
        """Run the prompts through all layers into the cache (lengths left as they were) and return the
        hidden states [B, dim] of each prompt's last token after each number of layers in cuts (ascending,
        the last n_layers).

        The prompts run in passes of at most `prefill_tokens` padded tokens (`prefill_chunks`): groups
        of consecutive rows, each group's positions in chunks that attend to the group's earlier chunks
        in the cache. On a CPU the activations of such a pass stay in the caches: 32 prompts of ~514
        tokens prefill 3.3x faster in passes of ~2k tokens than in one pass."""
        m, dev = self.model, cache.k.device
        out = [torch.empty(len(prompts), m.config.dim, dtype=m.dtype, device=dev) for _ in cuts]
        for r0, r1, chunk in prefill_chunks([len(p) for p in prompts], self.prefill_tokens):
            tokens, ends = right_pad(prompts[r0:r1], dev)
            group = KVCache(cache.k[:, r0:r1], cache.v[:, r0:r1], cache.lengths[r0:r1])
            for s in range(0, tokens.shape[1], chunk):
                stop = min(tokens.shape[1], s + chunk)
                group.lengths.fill_(s)
                positions = torch.arange(s, stop, device=dev).expand(r1 - r0, stop - s)
                mask = torch.ones(stop - s, stop - s, dtype=torch.bool, device=dev).tril()
                here = ((ends >= s) & (ends < stop)).nonzero()[:, 0]   # the rows whose last token is in this chunk
                h, done = m.embed(tokens[:, s:stop]), 0
                for i, cut in enumerate(cuts):
                    if cut > done:
                        h, done = m.run_layers(h, positions, group, mask, range(done, cut)), cut
                    out[i][r0 + here] = h[here, ends[here] - s]
        return out

    def _prefill(self, prompts: list[list[int]], cache, draft: bool):
        """Run the right-padded prompts causally and commit them. Returns the logits [B, V] after each
        prompt's last token and, with `draft`, the draft log-probabilities [B, K, V] of the first step
        from that token's pseudo chain and their LM-head inputs [B, K, dim] (else None, None)."""
        m, L = self.model, self.model.config.n_layers
        dev = cache.k.device
        t = self.transfer.layer if draft else L
        e = t if not draft or self.extra_layer is None else self.extra_layer
        h_e, h_t, h_out = self._run_prompts(prompts, cache, (e, t, L))
        last = torch.tensor([len(p) - 1 for p in prompts], device=dev)
        cache.lengths.copy_(last + 1)  # the pads' keys/values lie beyond the lengths: never attended
        if not draft:
            return m.logits(h_out), None, None
        # The prompt ran exactly as plain decoding runs it (same rows, same passes); now the last token's
        # pseudo chain on its own above the committed prompt.
        K = self.transfer.K
        chain = hidden_transfer(h_t[:, None], self.weight, self.bias, backend=self.backend)[:, 0]
        if self.extra_weight is not None:
            chain = chain + hidden_transfer(h_e[:, None], self.extra_weight, backend=self.backend)[:, 0]
        if self.mlp is not None:
            chain = transfer_mlp(chain, *self.mlp)
        chain_mask = torch.ones(K, K, dtype=torch.bool, device=dev).tril()
        chain_positions = last[:, None] + torch.arange(1, K + 1, device=dev)
        hc = m.run_layers(chain, chain_positions, cache, chain_mask, range(t, L), finite_from=0)  # [B, K, dim]
        return m.logits(h_out), m.logits(hc).log_softmax(-1), m.norm(hc)

    def _forward_all(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """One plain step of tokens [B, 1] -> logits [B, 1, V]."""
        m = self.model
        mask = torch.ones(1, 1, dtype=torch.bool, device=tokens.device)
        return m.logits(m.run_layers(m.embed(tokens), positions, cache, mask, range(m.config.n_layers)))

    def _choose(self, root, drafts, guess) -> StepTree:
        """The step's tree: the policy's choice over the drafts [B, K, V], with the context lookup's guess
        [B, K + lookup_nodes] (None: no lookup) mixed in and carried on by lookup_nodes more nodes."""
        if guess is None:
            return self.tree.choose(root, drafts)
        tree = self.tree.choose(root, with_lookup(drafts, guess[:, :drafts.shape[1]], self.lookup))
        return extend_tree(tree, guess, self.lookup_nodes, self.lookup) if self.lookup_nodes else tree

    def _step(self, root, drafts, cache, warp, generator, guess=None):
        """One hidden-transfer step -> (tree, accepted [B, T], accept_len [B], next root [B], next drafts);
        guess: the context lookup's (`_choose`)."""
        m, K, t = self.model, self.transfer.K, self.transfer.layer
        tree = self._choose(root, drafts, guess)
        lay = step_layout(tree, K, self.n_chains, K + self.lookup_nodes)
        B, T, n = tree.tokens.shape[0], tree.size, lay.owners.shape[1]
        positions = cache.lengths[:, None].long() + lay.offsets                      # [B, T + n K]
        e = t if self.extra_layer is None else self.extra_layer
        h = h_e = m.run_layers(m.embed(tree.tokens), positions[:, :T], cache, lay.real_mask, range(e))
        if e < t:
            h = m.run_layers(h_e, positions[:, :T], cache, lay.real_mask, range(e, t))
        hs = h.new_empty(B, T + n * K, h.shape[-1])
        hs[:, :T] = h
        owners = lay.owners[..., None].expand(B, n, h.shape[-1])
        pseudo = hs[:, T:].view(B, n, K, -1)
        hidden_transfer(h.gather(1, owners), self.weight, self.bias, out=pseudo, backend=self.backend)
        if self.extra_weight is not None:
            pseudo += hidden_transfer(h_e.gather(1, owners), self.extra_weight, backend=self.backend)
        if self.mlp is not None:
            pseudo.copy_(transfer_mlp(pseudo, *self.mlp))
        hs = m.run_layers(hs, positions, cache, lay.mask, range(t, m.config.n_layers), finite_from=T)
        # The LM head reads its whole weight per call: one call over every row can cost less than a call
        # for the real rows and one for the accepted node's chain (`head_once`, chosen by tree auto).
        # Logits stay in the model's dtype: the argmax needs no fp32 copy of them.
        if self.head_once:
            rows_in = m.head(hs)                                                     # [B, T + n K, V]
            logits = rows_in[:, :T]
        else:
            rows_in, logits = hs, m.head(hs[:, :T])                                  # [B, T, V]
        accepted, accept_len, nxt, last = self._verify(logits, tree, warp, generator, self.verify_backend)
        return tree, accepted, accept_len, nxt, self._next_drafts(rows_in, hs, tree, lay, last, nxt)

    def _step_tokens(self) -> int:
        """Tokens one step feeds per row: the tree's nodes and a pseudo chain under each chain owner."""
        nodes = self.tree.size + self.lookup_nodes
        return nodes + (nodes if self.n_chains is None else min(self.n_chains, nodes)) * self.transfer.K

    @staticmethod
    def _verify(logits, tree: StepTree, warp, generator, backend: str = "auto"):
        """logits: [B, T, V] of the tree's real nodes -> accepted [B, T] node indices (path order),
        accept_len [B], the next root [B] and the last accepted node [B]."""
        if warp is None:
            target = greedy(logits)
            accepted, accept_len = verify_tree_greedy(tree.tokens, tree.parents, target, backend=backend)
            last = accepted.gather(1, (accept_len - 1)[:, None]).squeeze(1)
            return accepted, accept_len, target.gather(1, last[:, None]).squeeze(1), last
        accepted, accept_len, nxt = verify_tree_sampling(warp(logits), tree, generator)
        return accepted, accept_len, nxt, accepted.gather(1, (accept_len - 1)[:, None]).squeeze(1)

    def _next_drafts(self, rows_in, hs, tree: StepTree, lay, last, root) -> torch.Tensor:
        """Draft log-probabilities [B, K, V] of depths 1..K below the next root [B], from the chain of the
        deepest chain owner on the accepted path (the last accepted node itself when it has one): pseudo
        j of an owner d levels above the last node predicts depth j - d; depths it cannot reach are
        uniform. rows_in: the step's hidden states hs [B, N, dim], or (head_once) its logits [B, N, V] in
        the model's dtype. With a refiner, the drafts are re-ranked knowing the root (`_refine`)."""
        m, K, dev = self.model, self.transfer.K, rows_in.device
        B, T = tree.tokens.shape
        on_path = lay.real_mask.gather(1, last[:, None, None].expand(B, 1, T)).squeeze(1)    # [B, T]
        owner_depth = tree.depths.gather(1, lay.owners)                                      # [B, n]
        chain = torch.where(on_path.gather(1, lay.owners), owner_depth, -1).argmax(1)        # [B]
        shift = tree.depths.gather(1, last[:, None]) - owner_depth.gather(1, chain[:, None])  # [B, 1]
        j = torch.arange(K, device=dev) + shift                                              # pseudo j+1
        rows = T + chain[:, None] * K + j.clamp_max(K - 1)
        # Whole rows by advanced indexing: a gather with an index expanded over V reads one index per
        # element (6x slower on CPU for 3 x 49152 logits).
        at = (torch.arange(B, device=dev)[:, None], rows)
        picked = rows_in[at]                                                                 # [B, K, *]
        logp = (picked if self.head_once else m.head(picked)).float().log_softmax(-1)
        if self.refiner is not None:
            logp = self._refine(logp, m.norm(hs[at]), root)
        return torch.where((j < K)[..., None], logp, -math.log(logp.shape[-1]))

    def _refine(self, logp, states, root) -> torch.Tensor:
        """The drafts [B, K, V] re-ranked by the root refiner (`drafts.refine`), knowing the next root [B];
        states: their LM-head inputs [B, K, dim]."""
        m = self.model
        return self.refiner(logp, states, root, m.tok_embeddings.weight, m.output.weight)

    @staticmethod
    def _emit(rows, seqs, steps, active, max_new_tokens, eos, callback) -> None:
        """Append each active row's new tokens, cut at max_new_tokens and after an eos; retire rows."""
        new = []
        for b, toks in enumerate(rows):
            if not active[b]:
                new.append([])
                continue
            toks = toks[: max_new_tokens - len(seqs[b])]
            end = next((i for i, x in enumerate(toks) if x in eos), None)
            toks = toks if end is None else toks[: end + 1]
            seqs[b] += toks
            steps[b].append(len(toks))
            if end is not None or len(seqs[b]) >= max_new_tokens:
                active[b] = False
            new.append(toks)
        if callback is not None:
            callback(new)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def make_tree_policy(tree, K: int, budget: int, calibration: torch.Tensor | None = None) -> TreePolicy:
    """tree: None (the default static tree), a list of rank paths, "dynamic" or a TreePolicy -> a
    TreePolicy over K draft depths; calibration: the drafts' (`TransferWeights.calibration`), used by the
    policies made here (a TreePolicy given keeps its own)."""
    if isinstance(tree, TreePolicy):
        policy = tree
    elif isinstance(tree, str) and tree == "dynamic":
        policy = TreePolicy(K, None, budget=budget, calibration=calibration)
    elif tree is None or isinstance(tree, (list, tuple)):
        policy = TreePolicy(K, [p for p in DEFAULT_PATHS if len(p) <= K] if tree is None else tree,
                            calibration=calibration)
    else:
        raise ValueError(f"tree must be None (the default static tree), 'dynamic', 'auto', a list of rank paths "
                         f"or a TreePolicy, got {tree!r}")
    if policy.K != K:
        raise ValueError(f"tree: a TreePolicy for K={policy.K} drafts, but the drafter has K={K}")
    return policy


PREFILL_TOKENS_CPU, PREFILL_TOKENS = 2048, 32768


def prefill_chunks(lengths: list[int], budget: int) -> list[tuple[int, int, int]]:
    """The prefill passes of prompts of these lengths: (r0, r1, chunk) per group of consecutive rows
    r0..r1-1, run `chunk` positions at a time, so that rows x chunk <= budget (a row longer than the
    budget runs alone in chunks of `budget` positions)."""
    groups, r0 = [], 0
    while r0 < len(lengths):
        r1, longest = r0 + 1, lengths[r0]
        while r1 < len(lengths) and (r1 + 1 - r0) * max(longest, lengths[r1]) <= budget:
            longest, r1 = max(longest, lengths[r1]), r1 + 1
        groups.append((r0, r1, max(1, min(longest, budget // (r1 - r0)))))
        r0 = r1
    return groups


def _prompts(input_ids, vocab_size: int) -> list[list[int]]:
    """input_ids: list of token-id lists (or 1-D arrays) or an integer tensor / array [B, S] -> list of
    non-empty int lists."""
    rows = input_ids.tolist() if hasattr(input_ids, "tolist") else input_ids
    if not isinstance(rows, (list, tuple)) or not rows or (hasattr(input_ids, "tolist") and (
            getattr(input_ids, "ndim", 0) != 2 or getattr(input_ids, "dtype", None) in (torch.bool, bool))):
        raise ValueError(f"input_ids must be a non-empty list of token-id lists or an integer tensor [B, S], got "
                         f"{_summary(input_ids)}")
    rows = [r.tolist() if hasattr(r, "tolist") else r for r in rows]
    if not all(isinstance(r, (list, tuple)) and r for r in rows):
        raise ValueError(f"input_ids must hold non-empty token-id lists, got rows {[_summary(r) for r in rows[:5]]}")
    prompts, bad = [], []
    for r in rows:
        prompts.append([])
        for x in r:
            try:
                i = -1 if isinstance(x, bool) else operator.index(x)
            except TypeError:
                i = -1
            prompts[-1].append(i)
            if not 0 <= i < vocab_size:
                bad.append(x)
    if bad:
        raise ValueError(f"input_ids must hold token ids in [0, {vocab_size}), got {bad[:5]}")
    return prompts


def _summary(x) -> str:
    """What a bad argument is, in a few words."""
    if isinstance(x, torch.Tensor) or hasattr(x, "ndim") and hasattr(x, "dtype"):
        return f"{type(x).__name__} {x.dtype} {list(x.shape)}"
    if isinstance(x, (list, tuple)):
        return f"{type(x).__name__} of {len(x)}"
    return repr(x) if len(repr(x)) < 40 else type(x).__name__
