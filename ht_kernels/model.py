"""A lean Llama-family decoder (Llama, Qwen2, Mistral) whose every layer attends with `tree_attention`.

The model never owns a KV cache: `new_cache` allocates a static `KVCache`, `run_layers` writes the new
tokens' keys/values at `cache.lengths[b] + j` and the caller (the decoder) advances `cache.lengths`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .eager.tree_attention import FlashCPUPlan, RowExactCPUPlan
from .ops.tree_attention import check_cache_bounds, tree_attention

HF_MODEL_TYPES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")


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

    @classmethod
    def from_hf(cls, config) -> ModelConfig:
        """From a LlamaConfig / Qwen2Config / MistralConfig or its dict (config.json, old or new rope keys).

        Sliding-window attention equals full attention on sequences within the window, so a window
        caps max_seq_len instead of being implemented.
        """
        c = config if isinstance(config, dict) else config.to_dict()
        kind = c.get("model_type")
        if kind not in HF_MODEL_TYPES:
            raise ValueError(f"ModelConfig.from_hf: config model_type must be one of {HF_MODEL_TYPES}, got {kind!r}")
        if c.get("hidden_act", "silu") != "silu" or c.get("mlp_bias"):
            raise ValueError(f"ModelConfig.from_hf: config must use a bias-free SiLU MLP, got hidden_act="
                             f"{c.get('hidden_act')!r}, mlp_bias={c.get('mlp_bias')!r}")
        rope = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        theta = c.get("rope_theta") or rope.pop("rope_theta", 10000.0)
        rope.pop("rope_theta", None)
        if rope_type not in ROPE_TYPES or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"ModelConfig.from_hf: config rope must be one of {ROPE_TYPES} over the full head, "
                             f"got rope_type={rope_type!r} with {rope}")
        scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}
        if rope_type == "llama3":
            scaling.setdefault("original_max_position_embeddings", c["max_position_embeddings"])
        max_len = c.get("max_position_embeddings", 2048)
        window = c.get("sliding_window") if kind == "mistral" or c.get("use_sliding_window") else None
        bias = bool(c.get("attention_bias", False))
        return cls(
            vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=scaling, tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=kind == "qwen2" or bias, o_bias=bias, max_seq_len=min(max_len, window or max_len),
            name=c.get("_name_or_path") or kind,
        )


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
    """Static cache. k, v: [n_layers, B, S, n_kv_heads, head_dim]; lengths: [B] int32 committed tokens."""

    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


PREPACK_DTYPES = (torch.float32, torch.bfloat16)
LONE_ROW_MAX_K = 1024  # row-exact linear layers: a lone row over more inputs runs as two (one_row_as_two)


def prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `Linear.prepack` applies: CPU fp32, or bf16 with oneDNN's bf16 kernels (avx512_bf16, AMX)."""
    return (device.type == "cpu" and dtype in PREPACK_DTYPES and torch.backends.mkldnn.is_available()
            and (dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()))


class Linear(nn.Linear):
    """nn.Linear that, with `prepack` set, runs CPU inference through a copy of its weight packed ahead
    in oneDNN's blocked layout (what inductor's freezing does), and a decoding step 1.2-1.5x faster on
    this project's CPU (README). bf16 gives F.linear's values, and among two or more rows a row's values do
    not depend on the others (alone, over more than 1024 inputs, they can: `one_row_as_two`). fp32
    differs from F.linear within rounding; in fp32 a row computed alone and among others differs in its
    last bits on either path (one row takes another kernel), so plain and tree decoding can part at
    near-ties. The copy is made by `pack()` and remade when the weight changes; calls
    that record autograd, or inputs of another dtype or device, use `weight`.
    """

    prepack = False
    _packed: tuple | None = None  # ((weight, its version, storage, dtype), the packed copy)
    fused = False  # set by FusedLinears: the layer's packed copy is part of its group's
    row_exact = False  # set by Transformer.set_row_exact: a lone row runs as two (`one_row_as_two`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return one_row_as_two(self._forward, x) if self.row_exact else self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packs(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.pack(), self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def packs(self, x: torch.Tensor) -> bool:
        """Whether a call on x runs through the packed weight."""
        return self.prepack and x.dtype == self.weight.dtype and x.device.type == "cpu" and not torch.is_grad_enabled()

    def pack(self) -> torch.Tensor:
        """The packed copy of the current weight (made once per weight and version)."""
        key = _identity(self.weight)
        if self._packed is None or not _same(self._packed[0], key):
            with torch.no_grad():
                self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1))
        return self._packed[1]


class FusedLinears(nn.Module):
    """Linear layers that read the same input (q, k, v; gate, up), run as one GEMM over their weights
    packed as one [sum of outputs, in] copy when they are prepacked: each output column equals the
    separate call's bitwise (oneDNN, bf16 and fp32), and the call costs about half (README). The layers
    stay their owner's (parameters, state dict, weight sharing): this module holds no parameters and
    remakes its copy when a weight or bias changes.
    """

    def __init__(self, *linears: Linear):
        super().__init__()
        self.linears = linears  # a tuple: not registered as submodules
        for lin in linears:
            lin.fused = True
        self._packed: tuple | None = None  # (identities of the weights and biases, packed weight, bias)

    def packs(self, x: torch.Tensor) -> bool:
        """Whether forward(x) runs as one packed GEMM (else call the layers one by one)."""
        return all(lin.packs(x) for lin in self.linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> the layers' outputs side by side [..., sum of outputs]; only where packs(x)."""
        return one_row_as_two(self._forward, x) if self.linears[0].row_exact else self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.pack()
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    def pack(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The packed copy of the concatenated weights and the concatenated bias (None: no layer has one)."""
        key = tuple(_identity(t) for lin in self.linears for t in (lin.weight, lin.bias))
        if self._packed is None or not all(_same(a, b) for a, b in zip(self._packed[0], key)):
            with torch.no_grad():
                w = torch.cat([lin.weight.detach() for lin in self.linears])
                has_bias = any(lin.bias is not None for lin in self.linears)
                bias = torch.cat([lin.bias.detach() if lin.bias is not None else w.new_zeros(lin.out_features)
                                  for lin in self.linears]) if has_bias else None
                self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(w, 1), bias)
        return self._packed[1:]


def one_row_as_two(f, x: torch.Tensor) -> torch.Tensor:
    """f(x) for x [..., in]; a lone row (x.numel() == in) over more than `LONE_ROW_MAX_K` inputs is
    computed as two copies of itself. CPU bf16 GEMMs (oneDNN, avx512_bf16) sum such a row in another order
    than rows among others (SmolLM2's down projection, 1536 inputs: 0.02% of outputs differ in the last
    bit; measured with 1152-4096 inputs), while from two rows on, and up to 1024 inputs, a row's bits are
    its own. Doubling such a row costs nothing measurable (two rows of the LM head, 576 inputs, would
    cost 1.2x one)."""
    if x.dim() < 2 or x.numel() != x.shape[-1] or x.shape[-1] <= LONE_ROW_MAX_K:
        return f(x)
    return f(torch.cat((x, x), -2)).narrow(-2, 0, 1)


def _identity(t: torch.Tensor | None) -> tuple:
    """(tensor, its version, storage and dtype): what tells that a packed copy is stale (in-place writes,
    `module.to()` swapping a parameter's data; inference tensors cannot be written in place)."""
    if t is None:
        return None, None
    return t, (None if t.is_inference() else t._version, t.data_ptr(), t.dtype)


def _same(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] == b[1]


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
    """Llama-family decoder. Parameters of a loaded or random model are frozen (requires_grad=False)."""

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
        """Run inference of every linear layer through oneDNN weights packed ahead (`Linear.prepack`;
        CPU fp32 or bf16, see `prepack_supported`), q/k/v and gate/up as one GEMM each (`FusedLinears`):
        one more copy of those weights in memory."""
        if enabled and not prepack_supported(self.device, self.dtype):
            raise ValueError(f"prepack_linears: needs a CPU fp32 or bf16 model and oneDNN (bf16: its bf16 "
                             f"kernels), got a {self.dtype} model on {self.device}")
        for m in self.modules():
            if isinstance(m, Linear):
                m.prepack, m._packed = enabled, None
                if enabled and not m.fused:
                    m.pack()
            elif isinstance(m, FusedLinears):
                m._packed = None
                if enabled:
                    m.pack()

    def set_row_exact(self, enabled: bool = True) -> None:
        """Make a row's outputs independent of the rows computed with it (CPU bf16), so that tree decoding
        gives plain decoding's tokens bit for bit: attention of tree-shaped passes with depths up to 32
        through `RowExactCPUPlan` (with `attn_backend` "auto" or "torch"), and a lone row through linear
        layers of more than 1024 inputs as two (`one_row_as_two`).
        Other passes (longer causal ones: prefills) keep the fused kernel: give them the same rows in
        the same passes to get the same bits."""
        if enabled and not (self.device.type == "cpu" and self.dtype == torch.bfloat16):
            raise ValueError(f"set_row_exact: needs a CPU bf16 model, got a {self.dtype} model on {self.device}")
        self.row_exact = bool(enabled)
        for m in self.modules():
            if isinstance(m, Linear):
                m.row_exact = self.row_exact

    @property
    def prepacked(self) -> bool:
        return self.output.prepack

    def prepack_bytes(self) -> int:
        """Memory that prepack_linears adds: one copy of every linear weight (the tied LM head's too)."""
        return sum(m.weight.numel() * m.weight.element_size() for m in self.modules() if isinstance(m, Linear))

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
                   layers: range) -> torch.Tensor:
        """Run `layers` on N new tokens per row; returns h [B, N, dim].

        h: [B, N, dim]; positions: [B, N] int64 (RoPE positions, any values: tree node at depth d sits
        at lengths + d); mask: bool [N, N] or [B, N, N], which new tokens each new token sees (the
        committed prefix [0, cache.lengths[b]) is always seen). Writes the new keys/values of each layer
        at cache.lengths[b] + j; does not change cache.lengths.
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
            h = self.layers[i](h, cos, sin, cache.k[i], cache.v[i], attend)
        return h

    def _attention(self, cache: KVCache, mask: torch.Tensor, h: torch.Tensor):
        """attend(q, k_cache, v_cache, k, v) -> out for the layers of one pass: `tree_attention` per layer,
        or on CPU (backend auto or torch, eager) one `FlashCPUPlan` for all of them, which reads the
        lengths and builds the additive mask once instead of once a layer."""
        lengths, backend = cache.lengths, self.attn_backend
        if backend in ("auto", "torch") and FlashCPUPlan.runs(h) and not torch.compiler.is_compiling():
            check_cache_bounds(lengths, h.shape[1], cache.max_len)
            depth = RowExactCPUPlan.runs(h, mask) if self.row_exact else None
            if depth is not None:
                plan = RowExactCPUPlan(lengths, mask, depth)
            else:
                plan = FlashCPUPlan(lengths, mask, h.shape[1], self.config.n_heads // self.config.n_kv_heads, h.dtype)
            return lambda q, k_cache, v_cache, k, v: plan(q, k_cache, v_cache, k, v)[0]
        return lambda q, k_cache, v_cache, k, v: tree_attention(q, k_cache, v_cache, lengths, mask, k=k, v=v,
                                                                backend=backend)

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
