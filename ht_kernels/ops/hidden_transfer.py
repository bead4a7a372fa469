"""`ht_kernels.hidden_transfer`: K linear maps of hidden states into pseudo hidden states (public op)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..torch_backend.hidden_transfer import hidden_transfer_torch
from ._backend import device_guard, overlaps_itself, resolve_backend, shape_of, shares_memory

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# What "auto" runs, on every device. On an H100 (benchmarks/RESULTS.md, 2026-11-28; 64 rows, D 4096, K 4,
# bf16) one cuBLAS GEMM over the stacked maps took 53 us (87% of copy bandwidth), the Triton kernel 91 us
# and the CUDA kernel 217 us; the kernels stay selectable by name.
AUTO_BACKEND = "torch"


def hidden_transfer(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The K pseudo hidden states of each hidden state: pseudo[..., i, :] = hidden @ weight[i].T + bias[i].

    hidden: [..., D]; weight: [K, D, D] (weight[i] maps like nn.Linear); bias: [K, D] or None; all
    fp16, bf16 or fp32 of one dtype. Returns [..., K, D] in hidden's dtype, differentiable with respect
    to hidden, weight and bias.
    out: [..., K, D] with any strides (e.g. the pseudo slots of an interleaved hidden buffer), written
    in place and returned; it does not support autograd.
    backend: "auto" (the stacked GEMM of "torch" on every device: measured faster than either kernel, see
    AUTO_BACKEND) | "cuda" (CUDA tensors: tensor cores for fp16/bf16 with D % 8 == 0, a SIMT kernel
    otherwise) | "triton" | "torch" (the K maps as one [K * D, D] GEMM, cuBLAS on a GPU).
    """
    _check_inputs(hidden, weight, bias, out)
    name = AUTO_BACKEND if backend == "auto" else resolve_backend("hidden_transfer", backend, hidden.device)
    if out is None:
        return torch.ops.ht_kernels.hidden_transfer(hidden, weight, bias, name)
    tensors = {"hidden": hidden, "weight": weight, "bias": bias, "out": out}
    needs_grad = [n for n, t in tensors.items() if t is not None and t.requires_grad]
    if needs_grad and torch.is_grad_enabled():
        raise ValueError(f"hidden_transfer: out= does not support autograd, but {needs_grad} require grad")
    if torch.compiler.is_compiling():
        torch.ops.ht_kernels.hidden_transfer_out(hidden, weight, bias, out, name)
    else:  # eager: the op's body, without the custom-op dispatch (tens of microseconds a call)
        _run(hidden, weight, bias, out, name)
    return out


def _check_inputs(hidden, weight, bias, out) -> None:
    def fail(msg: str):
        raise ValueError(f"hidden_transfer: {msg}")

    if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[1] != weight.shape[2]:
        fail(f"weight must be a [K, D, D] tensor, got {shape_of(weight)}")
    K, D = weight.shape[:2]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1 or hidden.shape[-1] != D:
        fail(f"hidden must be [..., D] with D={D} from weight of shape {shape_of(weight)}, got {shape_of(hidden)}")
    if hidden.dtype not in DTYPES:
        fail(f"hidden must be fp16, bf16 or fp32, got {hidden.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (K, D)):
        fail(f"bias must be [K, D] = [{K}, {D}] for weight of shape {shape_of(weight)}, got {shape_of(bias)}")
    shape = [*hidden.shape[:-1], K, D]
    if out is not None and (not isinstance(out, torch.Tensor) or list(out.shape) != shape):
        fail(f"out must be [..., K, D] = {shape} for hidden {shape_of(hidden)} and weight {shape_of(weight)}, "
             f"got {shape_of(out)}")
    for name, t in (("weight", weight), ("bias", bias), ("out", out)):
        if t is not None and t.dtype != hidden.dtype:
            fail(f"{name} must have hidden's dtype {hidden.dtype}, got {t.dtype}")
        if t is not None and t.device != hidden.device:
            fail(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if out is not None:
        if overlaps_itself(out):
            fail(f"out is written in place, so it must not be an expanded view (stride 0), got shape "
                 f"{list(out.shape)} with strides {list(out.stride())}")
        for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
            if t is not None and shares_memory(out, t):
                fail(f"out must not share memory with {name} (it would be read after being overwritten)")


def _run(hidden, weight, bias, out, backend: str) -> None:
    """Writes the [..., K, D] projections of hidden [..., D] into out (any strides)."""
    if backend == "torch":
        out.copy_(hidden_transfer_torch(hidden, weight, bias))
        return
    if backend == "cuda":
        from ..cuda.hidden_transfer import hidden_transfer_fwd
    else:
        from ..triton.hidden_transfer import hidden_transfer_fwd

    K, D = weight.shape[:2]
    N = math.prod(hidden.shape[:-1])
    out3d = _rows_view(out, N, K, D)
    target = out3d if out3d is not None else out.new_empty(N, K, D)
    with device_guard(hidden.device):
        hidden_transfer_fwd(hidden.reshape(N, D), weight, bias, target)
    if out3d is None:
        out.copy_(target.view(out.shape))


def _rows_view(out: torch.Tensor, N: int, K: int, D: int) -> torch.Tensor | None:
    """out [..., K, D] as an [N, K, D] view, or None when its leading dims do not merge into one stride."""
    try:
        return out.view(N, K, D)
    except RuntimeError:
        return None


@torch.library.custom_op("ht_kernels::hidden_transfer", mutates_args=())
def _hidden_transfer_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], backend: str
) -> torch.Tensor:
    if backend == "torch":  # the GEMM's own output, not copied into another buffer (H200: 2.6 us of 39)
        return hidden_transfer_torch(hidden, weight, bias)
    out = hidden.new_empty(*hidden.shape[:-1], *weight.shape[:2])
    _run(hidden, weight, bias, out, backend)
    return out


@_hidden_transfer_op.register_fake
def _(hidden, weight, bias, backend):
    return hidden.new_empty(*hidden.shape[:-1], *weight.shape[:2])


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, _ = inputs
    ctx.save_for_backward(hidden, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad: torch.Tensor):
    """grad [..., K, D] -> grads of hidden [..., D], weight [K, D, D], bias [K, D] (fp32 accumulate)."""
    hidden, weight = ctx.saved_tensors
    K, D = weight.shape[:2]
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    N = math.prod(hidden.shape[:-1])
    g = grad.reshape(N, K * D).to(acc_dtype)                      # [N, K*D]
    x = hidden.reshape(N, D).to(acc_dtype)                        # [N, D]
    grad_hidden = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_hidden = (g @ weight.reshape(K * D, D).to(acc_dtype)).view(hidden.shape).to(hidden.dtype)
    if ctx.needs_input_grad[1]:
        grad_weight = (g.T @ x).view(K, D, D).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = g.sum(0).view(K, D).to(weight.dtype)
    return grad_hidden, grad_weight, grad_bias, None


_hidden_transfer_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("ht_kernels::hidden_transfer_out", mutates_args=("out",))
def _hidden_transfer_out_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor, backend: str
) -> None:
    _run(hidden, weight, bias, out, backend)


@_hidden_transfer_out_op.register_fake
def _(hidden, weight, bias, out, backend):
    return None
