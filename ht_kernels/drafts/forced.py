"""Drafts on teacher-forced sequences: every anchor of a batch of sequences in one pass.

For a sequence x_0..x_{N-1}, anchor n and depth i (1..K): the draft of depth i made at anchor n predicts
the token at position n + i + 1. `frozen_pass` runs the frozen model once (no gradient) and keeps what the
drafters need; `pseudo_hidden` runs the pseudo chains of every anchor through layers t+1..L against the
real tokens' keys/values, with the pseudo-chain mask (pseudo i of anchor n sees the real tokens 0..n and
pseudo 1..i of its own chain; real tokens never see pseudo tokens, so they are not recomputed): the states
a decoding step computes for the same chains. `draft_logprobs` turns a drafter's outputs into the draft
log-probabilities that training evaluates and tree auto replays.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model import apply_rope
from ..ops.hidden_transfer import hidden_transfer
from .examples import Example, collate


@dataclass
class FrozenPass:
    """What one frozen forward over tokens [B, N] leaves for the drafters (no gradient anywhere).

    hidden: [B, N, dim] after `layer` layers; keys, values: per layer l >= layer, [B, N, Hkv, Dh] (RoPE
    applied); last: [B, N, dim] after all layers; teacher_p, teacher_idx: [B, W, k] the k most likely
    next tokens at positions teacher_from[b] + 0..W-1 of row b (fp32 probabilities renormalised over them,
    int64 ids; `teacher` indexes them by position); teacher_from: [B] int64; extra: [B, N, dim] after
    extra_layer < layer layers (None: not asked for).
    """

    layer: int
    hidden: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last: torch.Tensor
    teacher_p: torch.Tensor
    teacher_idx: torch.Tensor
    teacher_from: torch.Tensor
    extra: torch.Tensor | None = None

    def teacher(self, rows: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (p, idx) [..., k] at positions pos (>= teacher_from) of rows (broadcast together)."""
        at = (pos - self.teacher_from[rows]).clamp(0, self.teacher_p.shape[1] - 1)
        return self.teacher_p[rows, at], self.teacher_idx[rows, at]


@torch.no_grad()
def frozen_pass(model, tokens: torch.Tensor, layer: int, top_k: int = 32, extra_layer: int | None = None,
                teacher_from: int | torch.Tensor = 0, teacher_len: int | None = None) -> FrozenPass:
    """tokens: [B, N] int64 (rows right-padded; pads only influence positions after them); extra_layer:
    also keep the hidden states after that many layers (< layer); teacher_from: int or [B], the first
    position of each row whose teacher distribution is kept, and teacher_len the positions kept per row
    (None: up to N for the row that starts first). The LM head and its top-k run on those positions only:
    the prompts before a row's first trained target need none."""
    B, N = tokens.shape
    L = model.config.n_layers
    cache = model.new_cache(B, N)
    positions = torch.arange(N, device=tokens.device).expand(B, N)
    causal = torch.ones(N, N, dtype=torch.bool, device=tokens.device).tril()
    cut = layer if extra_layer is None else extra_layer
    h_t = h_e = model.run_layers(model.embed(tokens), positions, cache, causal, range(cut))
    if cut < layer:
        h_t = model.run_layers(h_e, positions, cache, causal, range(cut, layer))
    h_L = model.run_layers(h_t, positions, cache, causal, range(layer, L))
    start = torch.as_tensor(teacher_from, device=tokens.device).long().clamp(0, N - 1).expand(B)
    W = max(1, N - int(start.min()) if teacher_len is None else teacher_len)
    at = (start[:, None] + torch.arange(W, device=tokens.device)).clamp_max(N - 1)          # [B, W]
    # top-k of the model-dtype logits: the fp32 copy of all [B, W, vocab] logits would cost more than the head
    logits, idx = model.head(h_L.gather(1, at[..., None].expand(B, W, h_L.shape[-1]))).topk(top_k, dim=-1)
    return FrozenPass(layer, h_t, [cache.k[l] for l in range(layer, L)], [cache.v[l] for l in range(layer, L)],
                      h_L, logits.float().softmax(-1), idx, start, None if extra_layer is None else h_e)


def drafter_pass(model, drafter, tokens: torch.Tensor, top_k: int = 32, teacher_from: int | torch.Tensor = 0,
                 teacher_len: int | None = None) -> FrozenPass:
    """`frozen_pass` with what the drafter reads: its layer (the last for Medusa) and extra layer."""
    return frozen_pass(model, tokens, getattr(drafter, "layer", model.config.n_layers), top_k,
                       getattr(drafter, "extra_layer", None), teacher_from, teacher_len)


def anchor_positions(lengths: torch.Tensor, starts: torch.Tensor, N: int) -> torch.Tensor:
    """The anchors to run per row: [B, A] = starts[b] + 0..A-1 with A the most trained anchors of a row
    (start..length-2), clamped to N - 1. Positions past a row's last anchor are padding (see anchor_mask),
    so no row runs the prompt positions before its start. lengths, starts: [B]."""
    A = max(1, int((lengths - 1 - starts).max()))
    return (starts[:, None] + torch.arange(A, device=starts.device)).clamp_max(N - 1)


def pseudo_attention(q, k, v, k_real, v_real, anchors: torch.Tensor, chain: bool = True) -> torch.Tensor:
    """Attention of the pseudo tokens of anchors [B, A] (positions in the row).

    q: [B, A, K, Hq, Dh]; k, v: [B, A, K, Hkv, Dh] (the pseudo tokens' own keys/values); k_real,
    v_real: [B, S, Hkv, Dh] (all real tokens). Pseudo i of anchor n sees real tokens 0..n and pseudo
    1..i of its chain (only itself when chain=False). Returns [B, A, K, Hq, Dh].
    """
    B, A, K, Hq, Dh = q.shape
    Hkv = k.shape[3]
    G = Hq // Hkv
    # scores in q's dtype, masked in place, one softmax over [real | chain] (it accumulates in fp32 inside):
    # no fp32 copy of the [B, Hkv, G, A, K, S] scores, which dominate the pass
    qg = (q * (1.0 / math.sqrt(Dh))).view(B, A, K, Hkv, G, Dh).permute(0, 3, 4, 1, 2, 5)   # [B, Hkv, G, A, K, Dh]
    kc, vc = (x.permute(0, 3, 1, 2, 4) for x in (k, v))                     # [B, Hkv, A, K, Dh]
    kr, vr = (x.permute(0, 2, 1, 3) for x in (k_real, v_real))              # [B, Hkv, S, Dh]
    S = kr.shape[2]
    s_real = torch.einsum("bhgnid,bhmd->bhgnim", qg, kr)                    # [B, Hkv, G, A, K, S]
    s_chain = torch.einsum("bhgnid,bhnjd->bhgnij", qg, kc)                  # [B, Hkv, G, A, K, K]
    sees_real = torch.arange(S, device=q.device) <= anchors[..., None]      # [B, A, S]
    depth = torch.arange(K, device=q.device)
    sees_chain = depth[None, :] <= depth[:, None] if chain else depth[None, :] == depth[:, None]
    s_real.masked_fill_(~sees_real[:, None, None, :, None, :], -math.inf)
    s_chain.masked_fill_(~sees_chain, -math.inf)
    p = torch.cat([s_real, s_chain], -1).softmax(-1)
    out = torch.einsum("bhgnim,bhmd->bhgnid", p[..., :S], vr) + torch.einsum("bhgnij,bhnjd->bhgnid", p[..., S:], vc)
    return out.permute(0, 3, 4, 1, 2, 5).reshape(B, A, K, Hq, Dh)


def transfer_mlp(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The residual low-rank SiLU block after the transfer maps: x + SiLU(x down_i) up_i for pseudo state
    i. x: [..., K, dim]; down: [K, dim, r], up: [K, r, dim] (cast to x's dtype)."""
    u = F.silu(torch.einsum("...kd,kdr->...kr", x, down.to(x.dtype)))
    return x + torch.einsum("...kr,krd->...kd", u, up.to(x.dtype))


def pseudo_hidden(model, frozen: FrozenPass, weight: torch.Tensor, bias: torch.Tensor | None,
                  chain: bool = True, record: list | None = None, anchors: torch.Tensor | None = None,
                  mlp: tuple[torch.Tensor, torch.Tensor] | None = None,
                  extra_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The pseudo chains of anchors [B, A] (positions; None: every position) after all layers:
    [B, A, K, dim] (differentiable in weight and bias; each anchor's chain is independent of the others').

    weight: [K, dim, dim], bias: [K, dim] (cast to the model's dtype); extra_weight: [K, dim, dim] maps of
    the hidden states at the extra layer (`frozen.extra`), added to the maps' output, or None; mlp:
    (down, up) of `transfer_mlp` after the maps, or None; pseudo i of anchor n sits at position n + i. record: a list that receives
    the states after layer t, t+1, ..., L.
    """
    m, c = model, model.config
    B, N, D = frozen.hidden.shape
    if anchors is None:
        anchors = torch.arange(N, device=frozen.hidden.device).expand(B, N)
    A, K = anchors.shape[1], weight.shape[0]
    hidden = frozen.hidden.gather(1, anchors[..., None].expand(B, A, D))
    x = hidden_transfer(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    if extra_weight is not None:
        if frozen.extra is None:
            raise ValueError("pseudo_hidden: extra_weight needs the frozen pass's states at the extra layer: run "
                             "frozen_pass with extra_layer (or drafter_pass)")
        x = x + hidden_transfer(frozen.extra.gather(1, anchors[..., None].expand(B, A, D)),
                                extra_weight.to(hidden.dtype))
    if mlp is not None:
        x = transfer_mlp(x, *mlp)
    positions = (anchors[..., None] + torch.arange(1, K + 1, device=x.device)).reshape(B, -1)
    cos, sin = (t.view(B, A, K, 1, c.head_dim) for t in m.rope(positions))
    if record is not None:
        record.append(x)
    for l, (k_real, v_real) in enumerate(zip(frozen.keys, frozen.values), start=frozen.layer):
        blk = m.layers[l]
        att = blk.attention
        a = blk.attention_norm(x)
        q = apply_rope(att.wq(a).view(B, A, K, c.n_heads, c.head_dim), cos, sin)
        k = apply_rope(att.wk(a).view(B, A, K, c.n_kv_heads, c.head_dim), cos, sin)
        v = att.wv(a).view(B, A, K, c.n_kv_heads, c.head_dim)
        o = pseudo_attention(q, k, v, k_real, v_real, anchors, chain)
        x = x + att.wo(o.reshape(B, A, K, -1))
        x = x + blk.feed_forward(blk.ffn_norm(x))
        if record is not None:
            record.append(x)
    return x


@torch.no_grad()
def draft_logprobs(model, drafter, examples: list[Example], batch_size: int = 4):
    """Yields, for each example in turn, (draft log-probabilities [n, K, V] of anchors start..len-2,
    the token after each anchor [n]) - anchor n's depth-i draft predicts token n + i + 1; refined
    knowing that token (the next step's root) when the drafter has a root refiner."""
    for s in range(0, len(examples), batch_size):
        batch = examples[s:s + batch_size]
        tokens, lengths, starts = collate(batch, model.device)
        anchors = anchor_positions(lengths, starts, tokens.shape[1])                 # [B, A] from each start
        head_in = drafter(model, drafter_pass(model, drafter, tokens, 1, tokens.shape[1]), anchors)  # [B, A, K, D]
        refiner = getattr(drafter, "refiner", None)
        for b, e in enumerate(batch):
            n = len(e.tokens) - 1 - e.start
            logp, nxt = model.output(head_in[b, :n]).float().log_softmax(-1), tokens[b, e.start + 1:len(e.tokens)]
            if refiner is not None:  # the root of the step after anchor j is the token after it, nxt[j]
                logp = refiner.to(logp.device)(logp, head_in[b, :n], nxt, model.tok_embeddings.weight,
                                               model.output.weight)
            yield logp, nxt
