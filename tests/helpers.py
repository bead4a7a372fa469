"""Shared test vocabulary: the tolerance table, the error measure, devices and backends."""
from __future__ import annotations

import pytest
import torch

from ht_kernels.triton import installed as triton_installed, interpreting as triton_interpreting

# Relative RMS error against an fp64 reference, per input dtype. One table for every op.
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOL)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Backends that can run on DEVICE in this process: triton needs a GPU or the interpreter.
BACKENDS = ["torch"] + (["triton"] if triton_installed() and (DEVICE.type == "cuda" or triton_interpreting()) else [])
# The CUDA kernels of csrc/, for the ops that have them (built on first use; GPU only).
CUDA_BACKEND = [pytest.param("cuda", marks=pytest.mark.cuda)] if DEVICE.type == "cuda" else []

POISON = float("nan")


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in fp64 (the absolute RMS when ref is all zeros)."""
    x, ref = x.double(), ref.double()
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num


def assert_close(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output") -> None:
    """x matches the fp64 reference within TOL[dtype]; finite wherever ref is finite."""
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    bad = torch.isfinite(ref) & ~torch.isfinite(x)
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: non-finite value {x[idx].item()} at {idx} (reference {ref[idx].item()})")
    same_inf = torch.isinf(ref) == torch.isinf(x)
    assert same_inf.all(), f"{what}: infinities differ at {tuple((~same_inf).nonzero()[0].tolist())}"
    finite = torch.isfinite(ref)
    err = rel_rms(x[finite], ref[finite])
    if err > TOL[dtype]:
        diff = (x.double() - ref.double()).abs().nan_to_num(0.0)
        idx = tuple(torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: relative RMS error {err:.3e} > {TOL[dtype]:.0e} for {dtype}; largest difference at "
            f"{tuple(int(i) for i in idx)}: {x[idx].item()} vs {ref[idx].item()}"
        )
