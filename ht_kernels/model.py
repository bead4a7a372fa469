"""A lean Llama-family decoder (Llama, Qwen2, Mistral) whose every layer attends with `tree_attention`.

The model never owns a KV cache: `new_cache` allocates a static `KVCache`, `run_layers` writes the new
tokens' keys/values at `cache.lengths[b] + j` and the caller (the decoder) advances `cache.lengths`.
CPU execution (`cpu.py`) enters through one seam: the `Linear` / `FusedLinears` layers, the attention
plan of a pass (`cpu.attention_plan`), and the switches `prepack_linears` and `set_row_exact`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu
from .cpu import FusedLinears, Linear
from .ops.tree_attention import tree_attention


@dataclass
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, {"rope_type": "linear", "factor"} or HF's "llama3" dict
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2, Llama's attention_bias
    o_bias: bool = False  # Llama's attention_bias
    max_seq_len: int = 2048
    name: str = "llama"

    def __post_init__(self):
        sizes = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "max_seq_len")
        bad = {k: getattr(self, k) for k in sizes
               if not isinstance(getattr(self, k), int) or isinstance(getattr(self, k), bool) or getattr(self, k) < 1}
        if bad:
            raise ValueError(f"ModelConfig: sizes must be integers >= 1, got {bad}")
        if self.n_heads % self.n_kv_heads or self.head_dim % 2:
            raise ValueError(f"ModelConfig: n_heads must be a multiple of n_kv_heads and head_dim even, got "
                             f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}")
        for k in ("norm_eps", "rope_theta"):
            x = getattr(self, k)
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not 0 < x < math.inf:
                raise ValueError(f"ModelConfig: {k} must be a finite number > 0, got {x!r}")


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[head_dim / 2] fp32 inverse frequencies, with HF's "linear" or "llama3" scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling or {"rope_type": "default"}
    if s["rope_type"] == "linear":
        inv_freq = inv_freq / s["factor"]
    elif s["rope_type"] == "llama3":
        factor, lo, hi, old_len = (s[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings"))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF rotate_half RoPE in fp32. x: [B, N, H, D]; cos, sin: [B, N, 1, D] fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


@dataclass
class KVCache:
    """Static cache. k, v: [n_layers, B, S, n_kv_heads, head_dim]; lengths: [B] int32 committed tokens.
    Past a row's length it holds zeros (`Transformer.new_cache`) or keys/values the model wrote, never NaN."""

    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, **factory):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, **factory):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = Linear(c.dim, c.n_heads * c.head_dim, bias=c.qkv_bias, **factory)
        self.wk = Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias, **factory)
        self.wv = Linear(c.dim, c.n_kv_heads * c.head_dim, bias=c.qkv_bias, **factory)
        self.wo = Linear(c.n_heads * c.head_dim, c.dim, bias=c.o_bias, **factory)
        self.wqkv = FusedLinears(self.wq, self.wk, self.wv)

    def forward(self, x, cos, sin, k_cache, v_cache, attend):
        """x: [B, N, dim]; k_cache, v_cache: [B, S, Hkv, D]; attend(q, k_cache, v_cache, k, v) -> [B, N, Hq, D]
        writes k, v into the caches and attends (`Transformer.run_layers`). Returns [B, N, dim]."""
        B, N, _ = x.shape
        Hq, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv.packs(x):  # one GEMM, and RoPE on q and k at once
            qkv = self.wqkv(x).view(B, N, Hq + 2 * Hkv, D)
            qk = apply_rope(qkv[:, :, :Hq + Hkv], cos, sin)
            q, k, v = qk[:, :, :Hq], qk[:, :, Hq:], qkv[:, :, Hq + Hkv:]
        else:
            q = apply_rope(self.wq(x).view(B, N, Hq, D), cos, sin)
            k = apply_rope(self.wk(x).view(B, N, Hkv, D), cos, sin)
            v = self.wv(x).view(B, N, Hkv, D)
        return self.wo(attend(q, k_cache, v_cache, k, v).reshape(B, N, -1))


class FeedForward(nn.Module):
    def __init__(self, c: ModelConfig, **factory):
        super().__init__()
        self.w1 = Linear(c.dim, c.hidden_dim, bias=False, **factory)  # gate
        self.w3 = Linear(c.dim, c.hidden_dim, bias=False, **factory)  # up
        self.w2 = Linear(c.hidden_dim, c.dim, bias=False, **factory)  # down
        self.w13 = FusedLinears(self.w1, self.w3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, -1) if self.w13.packs(x) else (self.w1(x), self.w3(x))
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, c: ModelConfig, **factory):
        super().__init__()
        self.attention_norm = RMSNorm(c.dim, c.norm_eps, **factory)
        self.attention = Attention(c, **factory)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps, **factory)
        self.feed_forward = FeedForward(c, **factory)

    def forward(self, x, cos, sin, k_cache, v_cache, attend):
        h = x + self.attention(self.attention_norm(x), cos, sin, k_cache, v_cache, attend)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama-family decoder. Parameters of a loaded or random model are frozen (requires_grad=False).
    tokenizer and eos_token_ids (the ids that end a generation by default) are set by the loaders."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, **factory)
        self.layers = nn.ModuleList(TransformerBlock(config, **factory) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, **factory)
        self.output = Linear(config.dim, config.vocab_size, bias=False, **factory)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.tokenizer = None
        self.eos_token_ids: tuple[int, ...] = ()
        self.attn_backend = "auto"
        self.row_exact = False  # set_row_exact
        self._inv_freq = rope_inv_freq(config)  # fp32 on purpose: not a buffer, so .to(dtype) keeps it

    @classmethod
    def from_config(cls, config: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
        """Random model: N(0, 0.02) weights, N(0, 0.02) biases, N(1, 0.1) norm weights."""
        model = cls(config, device="meta")
        state = {}
        for name, p in model.named_parameters():
            t = torch.empty(p.shape, dtype=torch.float32, device=device)
            state[name] = t.normal_(1.0, 0.1) if name.endswith("norm.weight") else t.normal_(0.0, 0.02)
        model.load_weights({n: t.to(dtype) for n, t in state.items()})
        return model

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Adopt the tensors of `state` (our parameter names) as parameters, without copying.

        nn.Parameter values are kept as they are (shared with their owner); plain tensors become frozen
        parameters. "output.weight" may be left out of a tied model.
        """
        ours = dict(self.named_parameters(remove_duplicate=False))
        tied = {"output.weight"} if self.config.tie_embeddings else set()
        missing, unexpected = ours.keys() - state.keys() - tied, state.keys() - ours.keys()
        if missing or unexpected:
            raise ValueError(f"load_weights: state has missing keys {sorted(missing)[:8]} and unexpected keys "
                             f"{sorted(unexpected)[:8]}")
        for name, t in state.items():
            if t.shape != ours[name].shape:
                raise ValueError(f"load_weights: {name} must have shape {list(ours[name].shape)}, got {list(t.shape)}")
            module_name, attr = name.rpartition(".")[::2]
            p = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
            setattr(self.get_submodule(module_name), attr, p)
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def prepack_linears(self, enabled: bool = True) -> None:
        """CPU inference through oneDNN weights packed ahead (`cpu.prepack_linears`)."""
        cpu.prepack_linears(self, enabled)

    def set_row_exact(self, enabled: bool = True) -> None:
        """CPU bf16: a row's values independent of the rows beside it (`cpu.set_row_exact`)."""
        cpu.set_row_exact(self, enabled)

    @property
    def prepacked(self) -> bool:
        return self.output.prepack

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """Zeroed cache for batch_size rows of up to max_len tokens, on the model's device and dtype."""
        if not 0 < max_len <= self.config.max_seq_len:
            raise ValueError(f"new_cache: max_len must be in [1, {self.config.max_seq_len}], got {max_len}")
        c = self.config
        shape = (c.n_layers, batch_size, max_len, c.n_kv_heads, c.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        lengths = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        return KVCache(k, torch.zeros_like(k), lengths)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, N] int64 -> [B, N, dim]."""
        return self.tok_embeddings(tokens)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, N] int64 -> cos, sin: [B, N, 1, head_dim] fp32."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self._inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos(), emb.sin()

    def run_layers(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache, mask: torch.Tensor,
                   layers: range, finite_from: int | None = None) -> torch.Tensor:
        """Run `layers` on N new tokens per row; returns h [B, N, dim].

        h: [B, N, dim]; positions: [B, N] int64 (RoPE positions, any values: tree node at depth d sits
        at lengths + d); mask: bool [N, N] or [B, N, N], which new tokens each new token sees (the
        committed prefix [0, cache.lengths[b]) is always seen). Writes the new keys/values of each layer
        at cache.lengths[b] + j; does not change cache.lengths.
        finite_from: None, or n: the hidden states of tokens n.. (drafts, whose values may be anything)
        have NaN and inf replaced by 0 before each layer and at the end. A token that hides a key still
        multiplies its value by a zero probability, so a non-finite key or value would reach it as NaN;
        from finite states, keys and values are finite (each layer normalises its input).
        """
        if h.dim() != 3 or tuple(positions.shape) != tuple(h.shape[:2]):
            raise ValueError(f"run_layers: h must be [B, N, dim] and positions [B, N], got h {list(h.shape)} "
                             f"and positions {list(positions.shape)}")
        B, N = positions.shape
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or \
                tuple(mask.shape) not in ((N, N), (B, N, N)):
            raise ValueError(f"run_layers: mask must be bool [N, N] or [B, N, N] with B={B}, N={N}, got "
                             f"{getattr(mask, 'dtype', type(mask))} {list(getattr(mask, 'shape', []))}")
        cos, sin = self.rope(positions)
        attend = self._attention(cache, mask, h)
        for i in layers:
            if finite_from is not None:
                h[:, finite_from:].nan_to_num_(0.0, 0.0, 0.0)
            h = self.layers[i](h, cos, sin, cache.k[i], cache.v[i], attend)
        if finite_from is not None:
            h[:, finite_from:].nan_to_num_(0.0, 0.0, 0.0)
        return h

    def _attention(self, cache: KVCache, mask: torch.Tensor, h: torch.Tensor):
        """attend(q, k_cache, v_cache, k, v) -> out for the layers of one pass: on CPU one plan for all of
        them (`cpu.attention_plan`), else `tree_attention` per layer."""
        lengths, backend, c = cache.lengths, self.attn_backend, self.config
        plan = cpu.attention_plan(lengths, cache.max_len, mask, h, c.n_heads // c.n_kv_heads, backend, self.row_exact)
        return plan or (lambda q, k_cache, v_cache, k, v: tree_attention(q, k_cache, v_cache, lengths, mask, k=k, v=v,
                                                                         backend=backend))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """h: [..., dim] -> [..., vocab] logits in the model's dtype (final norm + LM head)."""
        return self.output(self.norm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [..., dim] -> [..., vocab] fp32 logits."""
        return self.head(h).float()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                mask: torch.Tensor) -> torch.Tensor:
        """tokens, positions: [B, N] -> logits [B, N, vocab] fp32 (all layers; see run_layers)."""
        h = self.run_layers(self.embed(tokens), positions, cache, mask, range(self.config.n_layers))
        return self.logits(h)
