"""Launcher of the CUDA `hidden_transfer` kernels (csrc/hidden_transfer.cu)."""
from __future__ import annotations

import torch

from .build import load

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with a contiguous last dim (a copy only when it is strided)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def hidden_transfer_fwd(hidden, weight, bias, out) -> None:
    """out [N, K, D] (any strides) = hidden [N, D] @ weight[k].T + bias[k] for weight [K, D, D], bias [K, D]
    or None; CUDA tensors of one dtype, checked by ht_kernels.hidden_transfer. Tensor cores (fp16/bf16,
    D % 8 == 0) or the SIMT kernel: see kernel_name."""
    hidden, weight = _rows(hidden), _rows(weight)
    bias = None if bias is None else _rows(bias)
    N, D = hidden.shape
    K = weight.shape[0]
    load().hidden_transfer(hidden.data_ptr(), hidden.stride(0), weight.data_ptr(), weight.stride(0), weight.stride(1),
                           0 if bias is None else bias.data_ptr(), 0 if bias is None else bias.stride(0),
                           out.data_ptr(), *out.stride(), N, K, D, DTYPE_CODES[hidden.dtype],
                           torch.cuda.current_stream(hidden.device).cuda_stream)


def kernel_name(hidden, weight) -> str:
    """"mma" (tensor cores) or "simt": the kernel hidden_transfer_fwd runs for these inputs."""
    hidden, weight = _rows(hidden), _rows(weight)
    return load().hidden_transfer_kernel(hidden.data_ptr(), hidden.stride(0), weight.data_ptr(), weight.stride(0),
                                         weight.stride(1), hidden.shape[-1], DTYPE_CODES[hidden.dtype])
