"""Triton kernel of hidden transfer: all K projections of a block of rows, bias fused, one launch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting


@triton.jit
def _hidden_transfer_fwd_kernel(
    h_ptr, w_ptr, b_ptr, o_ptr, N, D,
    stride_hn, stride_hd,
    stride_wk, stride_we, stride_wd,
    stride_bk, stride_be,
    stride_on, stride_ok, stride_oe,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[n, k, e] = sum_d hidden[n, d] * weight[k, e, d] + bias[k, e] on one [BLOCK_M, BLOCK_N] tile.

    Program (i, j, k) covers rows n in block i and output features e in block j of projection k.
    """
    pid_m, pid_n, k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_n = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_e = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_K)
    m_n, m_e = o_n < N, o_e < D
    p_h = h_ptr + o_n.to(tl.int64)[:, None] * stride_hn + o_d[None, :] * stride_hd       # [BLOCK_M, BLOCK_K]
    p_w = w_ptr + k * stride_wk + o_e[None, :] * stride_we + o_d[:, None] * stride_wd  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_K):
        m_d = d0 + o_d < D
        b_h = tl.load(p_h, mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_w = tl.load(p_w, mask=m_d[:, None] & m_e[None, :], other=0.0)
        if DOT_FP32:
            b_h, b_w = b_h.to(tl.float32), b_w.to(tl.float32)
        acc = tl.dot(b_h, b_w, acc, input_precision=PRECISION)
        p_h += BLOCK_K * stride_hd
        p_w += BLOCK_K * stride_wd
    if HAS_BIAS:
        b_b = tl.load(b_ptr + k * stride_bk + o_e * stride_be, mask=m_e, other=0.0)
        acc += b_b.to(tl.float32)[None, :]
    p_o = o_ptr + o_n.to(tl.int64)[:, None] * stride_on + k * stride_ok + o_e[None, :] * stride_oe
    tl.store(p_o, acc.to(o_ptr.dtype.element_ty), mask=m_n[:, None] & m_e[None, :])


def hidden_transfer_fwd(
    hidden2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out3d: torch.Tensor
) -> None:
    """Writes out3d[n, k] = hidden2d[n] @ weight[k].T + bias[k] in place; every tensor may be strided.

    hidden2d: [N, D]; weight: [K, D, D]; bias: [K, D] or None; out3d: [N, K, D]; one dtype for all.
    """
    N, D = hidden2d.shape
    K = weight.shape[0]
    if out3d.numel() == 0:
        return
    # The interpreter's bf16 dot is wrong: dot in fp32 there. On a GPU an fp32 dot defaults to tf32;
    # "tf32" (the default) applies to fp32 operands only, so 16-bit dots stay on the tensor cores.
    dot_fp32 = interpreting() and hidden2d.dtype == torch.bfloat16
    precision = "ieee" if hidden2d.dtype == torch.float32 or dot_fp32 else "tf32"
    block_m = min(64, max(16, triton.next_power_of_2(N)))
    block_n = block_k = min(64, max(16, triton.next_power_of_2(D)))
    b_ptr, stride_b = (bias, bias.stride()) if bias is not None else (weight, (0, 0))
    grid = (triton.cdiv(N, block_m), triton.cdiv(D, block_n), K)
    _hidden_transfer_fwd_kernel[grid](
        hidden2d, weight, b_ptr, out3d, N, D,
        *hidden2d.stride(), *weight.stride(), *stride_b, *out3d.stride(),
        HAS_BIAS=bias is not None, DOT_FP32=dot_fp32, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
