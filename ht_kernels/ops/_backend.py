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
    """How an argument is named in error messages: a tensor's shape, a sequence's type and length, or a
    short repr of anything else."""
    if isinstance(t, torch.Tensor):
        return str(list(t.shape))
    if isinstance(t, (list, tuple)):
        return f"a {type(t).__name__} of length {len(t)}"
    text = repr(t)
    return text if len(text) <= 60 else text[:57] + "..."


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of t share memory through a stride of 0 (an expanded view): writing to t in
    place would then write some elements twice."""
    return any(size > 1 and stride == 0 for size, stride in zip(t.shape, t.stride()))


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b reach a common element. Exact for views of one storage with one element size (two
    interleaved views that never touch the same element do not share memory, e.g. the K and V halves of a
    [B, S, 2, H, D] buffer); conservative (True) where the search would take long. For meta tensors and
    under torch.compile, whose fake tensors have no memory, False."""
    if torch.compiler.is_compiling() or a.is_meta or a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    size = a.element_size()
    delta, misaligned = divmod(b.data_ptr() - a.data_ptr(), size)
    if size != b.element_size() or misaligned:
        return True
    # Is there an index i of a and j of b with sum(i_k a.stride(k)) - sum(j_k b.stride(k)) = delta? Terms of
    # one stride merge into one coefficient range; a depth-first search over the strides, largest first,
    # keeps only coefficients whose remainder the smaller strides can still reach.
    ranges: dict[int, list[int]] = {}
    for t, sign in ((a, 1), (b, -1)):
        for n, stride in zip(t.shape, t.stride()):
            if n > 1 and stride > 0:
                lo, hi = ranges.setdefault(stride, [0, 0])
                ranges[stride] = [lo + min(0, sign * (n - 1)), hi + max(0, sign * (n - 1))]
    terms = sorted(((st, lo, hi) for st, (lo, hi) in ranges.items()), reverse=True)
    low, high = [0] * (len(terms) + 1), [0] * (len(terms) + 1)  # what the strides from i on can sum to
    for i in range(len(terms) - 1, -1, -1):
        st, lo, hi = terms[i]
        low[i], high[i] = low[i + 1] + lo * st, high[i + 1] + hi * st
    budget = [10_000]

    def reach(i: int, rest: int) -> bool:
        budget[0] -= 1
        if budget[0] < 0:
            return True
        if i == len(terms):
            return rest == 0
        if not low[i] <= rest <= high[i]:
            return False
        st, lo, hi = terms[i]
        first, last = max(lo, -((high[i + 1] - rest) // st)), min(hi, (rest - low[i + 1]) // st)
        return any(reach(i + 1, rest - c * st) for c in range(first, last + 1))

    return reach(0, delta)


def check_writable(op: str, name: str, t: torch.Tensor) -> None:
    """ValueError unless t can be written in place: no element reached twice, no autograd leaf."""
    if overlaps_itself(t):
        raise ValueError(f"{op}: {name} is written in place, so it must not be an expanded view (stride 0), got "
                         f"shape {list(t.shape)} with strides {list(t.stride())}")
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: {name} is written in place, so it must not require grad (or call under "
                         f"torch.no_grad())")
