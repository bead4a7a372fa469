"""Backend selection shared by every op: "auto" | "cuda" | "triton" | "torch"."""
from __future__ import annotations

import contextlib

import torch

from ..triton import installed as triton_installed, interpreting as triton_interpreting

BACKENDS = ("auto", "cuda", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs here."""


def resolve_backend(
    op: str, backend: str, device: torch.device, available: tuple[str, ...] = ("cuda", "triton", "torch")
) -> str:
    """The backend that runs `op` on tensors of `device`; raises if a named one cannot run.

    available: the backends `op` has an implementation for ("torch" always among them); "auto" picks
    only among them, and a named one outside them raises BackendUnavailableError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":  # the CUDA kernels are opt-in until measured on a GPU (benchmarks/RESULTS.md)
        use_triton = "triton" in available and device.type == "cuda" and triton_installed()
        return "triton" if use_triton else "torch"
    if backend not in available:
        raise BackendUnavailableError(
            f"{op}: backend={backend!r} is not implemented for this op (it has {list(available)})"
        )
    if backend == "torch":
        return backend
    if backend == "triton":
        if not triton_installed():
            raise BackendUnavailableError(f"{op}: backend='triton' needs the triton package")
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return backend
        raise BackendUnavailableError(
            f"{op}: backend='triton' runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; "
            f"got tensors on {device}"
        )
    if device.type != "cuda":
        raise BackendUnavailableError(f"{op}: backend='cuda' runs on CUDA tensors; got tensors on {device}")
    from ..cuda.build import CudaBuildError, load

    try:
        load()
    except CudaBuildError as e:
        raise BackendUnavailableError(f"{op}: backend='cuda' is not available: {e}") from e
    return backend


def device_guard(device: torch.device):
    """Make `device` current for a kernel launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def shape_of(t) -> str:
    """How a tensor argument is named in error messages: its shape, or the repr of a non-tensor."""
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else repr(t)
