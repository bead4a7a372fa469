"""CPU execution of the model: the specialisations that make a decoding step fast, or row-exact, on a CPU.

The model (`model.py`) uses this module through one seam: its linear layers are `Linear` and, where
layers read the same input, `FusedLinears`; `attention_plan` chooses how the attention of one pass runs;
`prepack_linears` and `set_row_exact` (the model's methods of the same names call them) switch the
layers over. Elsewhere (GPU, autograd, other dtypes) all of it falls through to `F.linear` and
`tree_attention`, so the model reads the same with or without it.

- Prepacked linears: oneDNN weights packed ahead in its blocked layout (what inductor's freezing does),
  q/k/v and gate/up as one GEMM each: a decoding step 1.2-1.5x faster on this project's CPU (README).
- Row-exact passes (CPU bf16): a row's values independent of the rows computed beside it, so that tree
  decoding gives plain decoding's tokens bit for bit (`one_row_as_two`, `RowExactCPUPlan`).
- Attention plans: one `FlashCPUPlan` per pass reads the lengths and builds the additive mask once for
  every layer, instead of once a layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops.tree_attention import check_cache_bounds
from .torch_backend.tree_attention import FlashCPUPlan, RowExactCPUPlan

PREPACK_DTYPES = (torch.float32, torch.bfloat16)
LONE_ROW_MAX_K = 1024  # row-exact linear layers: a lone row over more inputs runs as two (one_row_as_two)


def prepack_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `Linear.prepack` applies: CPU fp32, or bf16 with oneDNN's bf16 kernels (avx512_bf16, AMX)."""
    return (device.type == "cpu" and dtype in PREPACK_DTYPES and torch.backends.mkldnn.is_available()
            and (dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()))


class Linear(nn.Linear):
    """nn.Linear that, with `prepack` set, runs CPU inference through a copy of its weight packed ahead
    in oneDNN's blocked layout (what inductor's freezing does), and a decoding step 1.2-1.5x faster on
    this project's CPU (README). In bf16, among two or more rows a row's values do not depend on the
    others (alone, over more than 1024 inputs, they can on avx512_bf16 CPUs: `one_row_as_two`); they are
    F.linear's on avx512_bf16 CPUs and within rounding of them on AMX ones. fp32 differs from F.linear within
    rounding; in fp32 a row computed alone and among others differs in its last bits on either path (one
    row takes another kernel), so plain and tree decoding can part at near-ties. The copy is made by
    `pack()` and remade when the weight changes; calls that record autograd, or inputs of another dtype or
    device, use `weight`. A row-exact layer (`row_exact`) runs packed whatever `prepack` says: on AMX CPUs
    F.linear's bf16 kernel gives a row other bits beside 23-36 rows than beside fewer or more (README).
    """

    prepack = False
    _packed: tuple | None = None  # ((weight, its version, storage, dtype), the packed copy)
    fused = False  # set by FusedLinears: the layer's packed copy is part of its group's
    row_exact = False  # set by set_row_exact: packed, and a lone row runs as two (`one_row_as_two`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return one_row_as_two(self._forward, x) if self.row_exact else self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packs(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.pack(), self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def packs(self, x: torch.Tensor) -> bool:
        """Whether a call on x runs through the packed weight."""
        return ((self.prepack or self.row_exact) and x.dtype == self.weight.dtype and x.device.type == "cpu"
                and not torch.is_grad_enabled())

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


def prepack_linears(model: nn.Module, enabled: bool = True) -> None:
    """Run inference of every linear layer of `model` through oneDNN weights packed ahead (`Linear.prepack`;
    CPU fp32 or bf16, see `prepack_supported`), q/k/v and gate/up as one GEMM each (`FusedLinears`):
    one more copy of those weights in memory (`prepack_bytes`)."""
    if enabled and not prepack_supported(model.device, model.dtype):
        raise ValueError(f"prepack_linears: needs a CPU fp32 or bf16 model and oneDNN (bf16: its bf16 "
                         f"kernels), got a {model.dtype} model on {model.device}")
    for m in model.modules():
        if isinstance(m, Linear):
            m.prepack, m._packed = enabled, None
            if enabled and not m.fused:
                m.pack()
        elif isinstance(m, FusedLinears):
            m._packed = None
            if enabled:
                m.pack()


def prepack_bytes(model: nn.Module) -> int:
    """Memory that prepack_linears adds: one copy of every linear weight (the tied LM head's too)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, Linear))


def set_row_exact(model: nn.Module, enabled: bool = True) -> None:
    """Make a row's outputs independent of the rows computed with it (CPU bf16), so that tree decoding
    gives plain decoding's tokens bit for bit: attention of tree-shaped passes with depths up to 32
    through `RowExactCPUPlan` (with the model's `attn_backend` "auto" or "torch"), linear layers through
    their packed weights (made on first use where the model is not prepacked), and a lone row through
    linear layers of more than 1024 inputs as two (`one_row_as_two`).
    Other passes (longer causal ones: prefills) keep the fused kernel: give them the same rows in
    the same passes to get the same bits."""
    if enabled and not (model.device.type == "cpu" and model.dtype == torch.bfloat16):
        raise ValueError(f"set_row_exact: needs a CPU bf16 model, got a {model.dtype} model on {model.device}")
    if enabled and not prepack_supported(model.device, model.dtype):
        raise ValueError("set_row_exact: needs oneDNN's bf16 kernels (avx512_bf16 or AMX), which this CPU "
                         f"({torch.backends.cpu.get_cpu_capability()}) lacks: decode in fp32 instead")
    model.row_exact = bool(enabled)
    for m in model.modules():
        if isinstance(m, Linear):
            m.row_exact = model.row_exact


def attention_plan(lengths: torch.Tensor, max_len: int, mask: torch.Tensor, h: torch.Tensor, group: int,
                   backend: str, row_exact: bool):
    """How one pass attends on CPU: attend(q, k_cache, v_cache, k, v) -> out [B, N, Hq, D] for all its
    layers, or None where `tree_attention` runs per layer (another device, backend "triton"/"cuda", or
    under torch.compile). lengths: [B] the cache's committed tokens, of max_len slots; mask: bool [N, N]
    or [B, N, N]; h: [B, N, dim] the pass's input; group: query heads per KV head. The cache is the model's
    own (`Transformer.new_cache`): past a row's length it holds zeros or keys/values the model wrote, so
    those slots are masked but not zeroed (`FlashCPUPlan`'s dead_finite)."""
    if backend not in ("auto", "torch") or not FlashCPUPlan.runs(h) or torch.compiler.is_compiling():
        return None
    check_cache_bounds(lengths, h.shape[1], max_len)
    depth = RowExactCPUPlan.runs(h, mask) if row_exact else None
    plan = RowExactCPUPlan(lengths, mask, depth) if depth is not None else \
        FlashCPUPlan(lengths, mask, h.shape[1], group, h.dtype, dead_finite=True)
    return lambda q, k_cache, v_cache, k, v: plan(q, k_cache, v_cache, k, v)[0]


def best_dtype(device) -> tuple[torch.dtype, bool, str]:
    """(dtype, exact, why): how the package decodes best on `device`. On a CPU with oneDNN's bf16 kernels
    (avx512_bf16, AMX), bf16 with row-exact passes: the tokens of plain decoding bit for bit, and a step
    whose cost barely grows with its tokens; on other CPUs fp32, since bf16 would run slower there; on
    a GPU bf16 (exact is CPU-only)."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.bfloat16, False, f"{device.type}: bf16 (tree and plain decoding may part at near-ties)"
    if prepack_supported(device, torch.bfloat16):
        return torch.bfloat16, True, "this CPU has oneDNN's bf16 kernels: bf16, exact (plain decoding's tokens bit for bit)"
    return torch.float32, False, "this CPU lacks oneDNN's bf16 kernels (avx512_bf16 or AMX): fp32, faster than bf16 here"
