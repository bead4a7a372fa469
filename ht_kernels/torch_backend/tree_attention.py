"""Tree attention in batched PyTorch ops: the "torch" backend (CPU, and any device without a kernel)."""
from __future__ import annotations

import math

import torch

FLASH_CPU = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
FLASH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# From KERNEL_ROWS query rows per (batch, head) on, the fused CPU kernel gives a row the same bits beside
# any others (bf16; measured: 1-3 rows take another path). RowExactCPUPlan pads to it, splits keys at
# multiples of EXACT_BLOCK and attends a window of EXACT_WINDOW keys past the split.
KERNEL_ROWS = 4
EXACT_BLOCK, EXACT_WINDOW = 32, 64


def tree_attention_torch(q, k_cache, v_cache, cache_seqlens, tree_mask, k=None, v=None, softmax_scale=None,
                         block_table=None):
    """Same contract as `reference.tree_attention_ref`, without a loop over rows or heads.

    q: [B, T, Hq, D]; k_cache, v_cache: [B, S, Hkv, D]; cache_seqlens: [B] int; tree_mask: bool [T, T]
    or [B, T, T]; k, v: [B, T, Hkv, D] or None. Attends over the first max(cache_seqlens) + T cache
    positions of every row at once (each row masked to its own prefix and tree), accumulating in fp32
    (fp64 for fp64). On CPU, fp16/bf16/fp32 go through PyTorch's fused CPU flash-attention kernel with an
    additive mask (`FlashCPUPlan`); elsewhere (and for fp64) scores and softmax are materialized.
    block_table: [B, max_blocks] int or None; with it the caches are paged, [num_blocks, block_size, Hkv, D]
    (see `_paged`). Returns out [B, T, Hq, D] in q's dtype and lse [B, Hq, T] fp32 (fp64 for fp64).
    """
    if block_table is not None:
        return _paged(q, k_cache, v_cache, cache_seqlens, tree_mask, k, v, softmax_scale, block_table)
    B, T, Hq, D = q.shape
    if FlashCPUPlan.runs(q):
        plan = FlashCPUPlan(cache_seqlens, tree_mask, T, Hq // k_cache.shape[2], q.dtype)
        return plan(q, k_cache, v_cache, k, v, softmax_scale)
    if k is not None:
        write_tree_kv(k_cache, v_cache, cache_seqlens, k, v)
    return _materialized(q, k_cache, v_cache, cache_seqlens.long(), tree_mask, softmax_scale)


def write_tree_kv(k_cache, v_cache, cache_seqlens, k, v, block_table=None) -> None:
    """k, v [B, T, Hkv, D] into the caches at positions cache_seqlens[b] + j of each row b: [B, S, Hkv, D]
    caches, or paged ones [num_blocks, block_size, Hkv, D] through block_table [B, max_blocks]."""
    B, T = k.shape[:2]
    pos = cache_seqlens.long()[:, None] + torch.arange(T, device=k.device)                # [B, T]
    if block_table is None:
        rows, slots = torch.arange(B, device=k.device)[:, None], pos
    else:
        block_size = k_cache.shape[1]
        rows, slots = block_table.long().gather(1, pos // block_size), pos % block_size
    k_cache[rows, slots] = k
    v_cache[rows, slots] = v


def _paged(q, k_cache, v_cache, cache_seqlens, tree_mask, k, v, softmax_scale, block_table):
    """Tree attention over paged caches [num_blocks, block_size, Hkv, D]: k, v are written through
    block_table [B, max_blocks] (position p of row b at block_table[b, p // block_size], p % block_size),
    then the first ceil((max(cache_seqlens) + T) / block_size) blocks of every row are gathered into
    contiguous caches [B, S, Hkv, D]. Table entries past a row's own blocks may hold any id (padding
    such as -1): they are clamped into the pool, and their slots lie past the row's keys, which are masked."""
    B, T = q.shape[:2]
    num_blocks, block_size = k_cache.shape[:2]
    lens = cache_seqlens.long()
    if k is not None:
        write_tree_kv(k_cache, v_cache, cache_seqlens, k, v, block_table)
    n_blocks = (int(lens.max()) + T + block_size - 1) // block_size if B else 0
    ids = block_table[:, :n_blocks].long().clamp(0, num_blocks - 1)                      # [B, n_blocks]
    return tree_attention_torch(q, k_cache[ids].flatten(1, 2), v_cache[ids].flatten(1, 2), cache_seqlens,
                                tree_mask, softmax_scale=softmax_scale)


def _visible(lens: torch.Tensor, tree_mask: torch.Tensor, T: int, S: int):
    """-> visible bool [B, T, S] (each row's prefix and its tree_mask) and rel [B, S], the key's position
    relative to the row's tree (negative: prefix; >= T: beyond the row's own keys)."""
    B = lens.shape[0]
    rel = torch.arange(S, device=lens.device) - lens[:, None]                             # [B, S]
    in_tree = tree_mask.expand(B, T, T).gather(2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, S))
    return (rel < 0)[:, None, :] | (in_tree & (rel < T)[:, None, :]), rel


class _CPUPlan:
    """What every layer of one CPU forward pass shares: the prefix bounds (one host read) and where the new
    keys/values go: one slice [lo, lo + T) of every row (rows None), or rows [B, 1] at slots [B, T]."""

    def __init__(self, lens: torch.Tensor, T: int):
        self.lo, self.hi = (int(x) for x in torch.aminmax(lens))
        self.T = T
        self.rows = self.slots = None
        if self.lo != self.hi:
            self.rows, self.slots = torch.arange(lens.shape[0])[:, None], lens[:, None] + torch.arange(T)

    def write(self, k_cache, v_cache, k, v) -> None:
        if k is not None and self.rows is None:
            k_cache[:, self.lo:self.lo + self.T] = k
            v_cache[:, self.lo:self.lo + self.T] = v
        elif k is not None:
            k_cache[self.rows, self.slots] = k
            v_cache[self.rows, self.slots] = v


class FlashCPUPlan(_CPUPlan):
    """Tree attention through the fused CPU kernel for calls that share cache_seqlens [B] and tree_mask
    (every layer of one forward pass): the prefix bounds and the additive mask are made once. GQA without
    copies: the G query heads of a KV head are stacked as G * T rows, and the mask is built per query head
    of a KV head ([B, 1, G, T, S] viewed as G * T rows). Calling it has `tree_attention_torch`'s contract
    for q [B, T, G * Hkv, D] of the planned dtype. dead_finite: the slots past each row's prefix + tree
    hold finite values whose scores cannot overflow (a model's own cache), so they are masked, not zeroed.
    """

    @staticmethod
    def runs(q: torch.Tensor) -> bool:
        """Whether tree attention of q goes through the fused CPU kernel."""
        return FLASH_CPU and q.numel() > 0 and q.device.type == "cpu" and q.dtype in FLASH_DTYPES

    def __init__(self, cache_seqlens: torch.Tensor, tree_mask: torch.Tensor, T: int, G: int, dtype: torch.dtype,
                 dead_finite: bool = False):
        lens = cache_seqlens.long()
        super().__init__(lens, T)
        self.dead_finite = dead_finite
        B, lo, S = lens.shape[0], self.lo, self.hi + T
        self.dead = None  # [B, 1, S, 1]: the slots past a row's own prefix and tree (None: none)
        if self.rows is None:  # one shared prefix length: the prefix is all visible, the tree columns are the mask
            self.bias = None
            if T > 1 or not bool(tree_mask.all()):
                bias = torch.zeros(B, 1, G, T, S, dtype=dtype)
                bias[..., lo:].masked_fill_(~tree_mask.reshape(-1, 1, 1, T, T), -math.inf)
                self.bias = bias.view(B, 1, G * T, S)
            self.blind = ~tree_mask.any(-1).expand(B, T) if lo == 0 else None
        else:  # keys past a row's own prefix + tree may hold anything (NaN too): mask them, zero them unless
            # the caller knows them finite (a copy of the prefix per layer: more than the kernel costs at B=32)
            visible, rel = _visible(lens, tree_mask, T, S)
            self.bias = torch.zeros(B, 1, G, T, S, dtype=dtype).masked_fill_(~visible[:, None, None], -math.inf)
            self.bias = self.bias.view(B, 1, G * T, S)
            self.dead = (rel >= T)[:, None, :, None]
            self.blind = ~visible.any(-1) if lo == 0 else None

    def __call__(self, q, k_cache, v_cache, k=None, v=None, softmax_scale=None):
        B, T, Hq, D = q.shape
        Hkv, S = k_cache.shape[2], self.hi + T
        G = Hq // Hkv
        self.write(k_cache, v_cache, k, v)
        kh, vh = k_cache[:, :S].transpose(1, 2), v_cache[:, :S].transpose(1, 2)         # [B, Hkv, S, D]
        if self.dead is not None and not self.dead_finite:
            kh, vh = kh.masked_fill(self.dead, 0.0), vh.masked_fill(self.dead, 0.0)
        qh = q.view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
        out, lse = _flash(qh, kh, vh, attn_mask=self.bias, scale=softmax_scale)
        out = out.view(B, Hkv, G, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, Hq, D)
        lse = lse.reshape(B, Hq, T)
        if self.blind is not None:  # queries that see nothing: out 0, lse -inf
            out = out.masked_fill(self.blind[..., None, None], 0.0)
            lse = lse.masked_fill(self.blind[:, None, :], -math.inf)
        return out, lse


def tree_depths(tree_mask: torch.Tensor) -> torch.Tensor | None:
    """tree_mask: bool [T, T] or [B, T, T] -> depth [..., T] (ancestors seen) when every row sees itself and
    exactly one node of each depth above it (a tree, or a forest of chains), else None."""
    depth = tree_mask.sum(-1) - 1
    anc = ancestors(tree_mask, depth)
    ok = tree_mask.diagonal(0, -2, -1).all() and bool(((anc >= 0).sum(-1) == depth + 1).all())
    return depth if ok else None


def ancestors(tree_mask: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """-> anc [..., T, T]: anc[r, j] the node of depth j that row r sees (-1: none)."""
    T = tree_mask.shape[-1]
    at = torch.where(tree_mask, depth[..., None, :], T)                         # depth of each seen node
    anc = torch.full(tree_mask.shape[:-1] + (T + 1,), -1, dtype=torch.long)
    return anc.scatter_(-1, at, torch.arange(T).expand_as(at))[..., :T]


class RowExactCPUPlan(_CPUPlan):
    """Tree attention on CPU (bf16) in which a row's output depends only on the keys of its positions 0..p
    (p: its prefix length + its depth), not on the rows beside it or on where its tree keys sit: a tree
    node gets the bits plain decoding gets at p, so tree decoding gives plain decoding's tokens.

    The fused CPU kernel gives a query row the same bits beside any others in an entry of at least
    `KERNEL_ROWS` rows, but the number of keys (masked ones included) and their order change them. So a
    row splits its keys at E = the largest multiple of `EXACT_BLOCK` <= p - EXACT_BLOCK (shared by the
    rows around it): keys [0, E) go through the kernel in one entry with the other rows of the same E; the
    `EXACT_WINDOW` keys from E on, in position order (prefix keys, then the row's ancestors by depth;
    past p masked), go through it as an entry of their own, laid out as plain decoding lays them out;
    the two parts merge in fp64 before one rounding. Needs a tree mask (`tree_depths`) of depth at most
    EXACT_BLOCK. Calls have `FlashCPUPlan`'s contract; the plan reads the lengths and the tree on the host.
    """

    @staticmethod
    def runs(q: torch.Tensor, tree_mask: torch.Tensor) -> torch.Tensor | None:
        """The tree's depths when q's attention under tree_mask can be row-exact, else None."""
        if not (FLASH_CPU and q.numel() > 0 and q.device.type == "cpu" and q.dtype == torch.bfloat16):
            return None
        depth = tree_depths(tree_mask)
        return depth if depth is not None and int(depth.max()) <= EXACT_BLOCK else None

    def __init__(self, cache_seqlens: torch.Tensor, tree_mask: torch.Tensor, depth: torch.Tensor):
        lens = cache_seqlens.long()
        T = tree_mask.shape[-1]
        super().__init__(lens, T)
        B = lens.shape[0]
        mask, depth = tree_mask.expand(B, T, T), depth.expand(B, T)
        pos = lens[:, None] + depth                                                 # [B, T]
        split = ((pos - EXACT_BLOCK).div(EXACT_BLOCK, rounding_mode="floor") * EXACT_BLOCK).clamp_min(0)
        self.groups = []  # (b, E, rows [n] or None: all) per prefix [0, E) the kernel attends
        for b, row in enumerate(split.tolist()):
            for e in sorted(set(row) - {0}):
                rows = [t for t, x in enumerate(row) if x == e]
                self.groups.append((b, e, None if len(rows) == T else torch.tensor(rows)))
        # The windows: keys at positions split + j (j < EXACT_WINDOW) as cache slots [B, T, W], masked past p
        x = split[..., None] + torch.arange(EXACT_WINDOW)
        anc = ancestors(mask, depth).gather(2, (x - lens[:, None, None]).clamp(0).clamp_max(depth[..., None]))
        self.slots_w = torch.where(x < lens[:, None, None], x, lens[:, None, None] + anc)
        self.past_p = x > pos[..., None]
        self._shape = None

    def _prepare(self, S: int, Hkv: int, G: int, D: int, dtype: torch.dtype) -> None:
        """Per pass, at its first layer: the windows' flat cache slots, their mask and a zero-padded q."""
        B, T = self.past_p.shape[:2]
        rows = max(G, KERNEL_ROWS)
        self._shape = (S, Hkv, G, D)
        self.flat_w = (torch.arange(B)[:, None, None] * S + self.slots_w).view(-1)
        self.bias_w = torch.zeros(B * T, 1, rows, EXACT_WINDOW, dtype=dtype).masked_fill_(
            self.past_p.view(B * T, 1, 1, EXACT_WINDOW), -math.inf)
        self.q_w = torch.zeros(B * T, Hkv, rows, D, dtype=dtype) if rows > G else None

    def _window(self, cache: torch.Tensor) -> torch.Tensor:
        """cache [B, S, Hkv, D] -> each row's window [B T, Hkv, W, D] (past p: the row's own key; the
        slots there may hold anything, NaN too, which a masked key would still spread)."""
        Hkv, D = cache.shape[2:]
        return cache.flatten(0, 1).index_select(0, self.flat_w).view(-1, EXACT_WINDOW, Hkv, D).transpose(1, 2)

    def __call__(self, q, k_cache, v_cache, k=None, v=None, softmax_scale=None):
        B, T, Hq, D = q.shape
        S, Hkv = k_cache.shape[1:3]
        G = Hq // Hkv
        self.write(k_cache, v_cache, k, v)
        if self._shape != (S, Hkv, G, D):
            self._prepare(S, Hkv, G, D, q.dtype)
        # Each row's window as an entry of its own: [B T, Hkv, >= 4, D] against [B T, Hkv, W, D]
        qw = q.reshape(B * T, Hkv, G, D)
        if self.q_w is not None:
            qw = self.q_w
            qw[:, :, :G].copy_(q.view(B * T, Hkv, G, D))
        kw, vw = self._window(k_cache), self._window(v_cache)
        out, lse = _flash(qw, kw, vw, attn_mask=self.bias_w, scale=softmax_scale)
        out, lse = out[:, :, :G], lse[:, :, :G]                                   # [B T, Hkv, G(, D)]
        if self.groups:  # the prefixes [0, E), merged in fp64, weighted by their share of the softmax
            out_p, lse_p = self._prefixes(q, qw, k_cache, v_cache, softmax_scale)
            w = lse_p.double().sub_(lse).sigmoid_()[..., None]
            out = torch.lerp(out.double(), out_p.double(), w)
            lse = torch.logaddexp(lse_p, lse)
        return out.to(q.dtype).reshape(B, T, Hq, D), lse.reshape(B, T, Hq).transpose(1, 2)

    def _prefixes(self, q, qw, k_cache, v_cache, softmax_scale):
        """-> out_p [B T, Hkv, G, D], lse_p [B T, Hkv, G]: each row over its prefix [0, E) (-inf: none)."""
        B, T, Hq, D = q.shape
        Hkv = k_cache.shape[2]
        G = Hq // Hkv
        if B == 1 and len(self.groups) == 1 and self.groups[0][2] is None:  # one prefix for all rows
            e = self.groups[0][1]  # one row: the window's query rows are the prefix's
            qp = qw if T == 1 else _rows(q[0].view(T, Hkv, G, D).permute(1, 2, 0, 3).reshape(1, Hkv, G * T, D))
            o, l = _flash(qp, k_cache[:, :e].transpose(1, 2), v_cache[:, :e].transpose(1, 2), scale=softmax_scale)
            return (o[0, :, :G * T].view(Hkv, G, T, D).permute(2, 0, 1, 3),
                    l[0, :, :G * T].view(Hkv, G, T).permute(2, 0, 1))
        out_p = q.new_zeros(B, T, Hkv, G, D)
        lse_p = torch.full((B, T, Hkv, G), -math.inf)
        for b, e, sel in self.groups:  # the rows of one prefix in one entry, as G n query rows
            qs = q[b] if sel is None else q[b, sel]                                        # [n, Hq, D]
            n = qs.shape[0]
            o, l = _flash(_rows(qs.view(n, Hkv, G, D).permute(1, 2, 0, 3).reshape(1, Hkv, G * n, D)),
                         k_cache[b:b + 1, :e].transpose(1, 2), v_cache[b:b + 1, :e].transpose(1, 2),
                         scale=softmax_scale)
            at = (b, slice(None) if sel is None else sel)
            out_p[at] = o[0, :, :G * n].view(Hkv, G, n, D).permute(2, 0, 1, 3)
            lse_p[at] = l[0, :, :G * n].view(Hkv, G, n).permute(2, 0, 1)
        return out_p.view(B * T, Hkv, G, D), lse_p.view(B * T, Hkv, G)


def _rows(q: torch.Tensor) -> torch.Tensor:
    """q [N, H, M, D] with zero rows appended up to KERNEL_ROWS."""
    if q.shape[2] >= KERNEL_ROWS:
        return q
    return torch.cat([q, q.new_zeros(q.shape[0], q.shape[1], KERNEL_ROWS - q.shape[2], q.shape[3])], 2)


def _flash(q, k, v, attn_mask=None, scale=None):
    """PyTorch's fused CPU flash-attention kernel on q [N, H, M, D], k, v [N, H, S, D]. The kernel reads the
    head dim as if its stride were 1 (a strided one gives wrong values, NaN from the gaps), so such
    inputs are copied first."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=attn_mask, scale=scale)


def _materialized(q, k_cache, v_cache, lens, tree_mask, softmax_scale):
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    S = int(lens.max()) + T if B else T
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    visible, rel = _visible(lens, tree_mask, T, S)
    qh = q.to(acc).view(B, T, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, D)
    kh = k_cache[:, :S].to(acc).transpose(1, 2)                                        # [B, Hkv, S, D]
    live = (rel < T)[:, None, :, None]  # slots past a row's own prefix + tree may hold anything (NaN too)
    vh = v_cache[:, :S].to(acc).transpose(1, 2).masked_fill(~live, 0.0)
    scores = (qh @ kh.transpose(-1, -2)).view(B, Hkv, G, T, S) * scale
    scores = scores.masked_fill(~visible[:, None, None], -math.inf)
    lse = torch.logsumexp(scores, dim=-1)                                              # [B, Hkv, G, T]
    probs = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])  # rows seeing nothing: 0
    out = (probs.view(B, Hkv, G * T, S) @ vh).view(B, Hkv, G, T, D)
    return out.permute(0, 3, 1, 2, 4).to(q.dtype).contiguous().view(B, T, Hq, D), lse.reshape(B, Hq, T)
