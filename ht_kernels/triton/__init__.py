"""Triton kernels (one file per op): the fast path on CUDA GPUs, also run on CPU tensors under Triton's
interpreter for tests. `reference/` holds the oracle they are checked against.

Importing this package does not import Triton: the kernel modules do, on first use.
"""
from __future__ import annotations

import functools
import importlib.util
import os


def interpreting() -> bool:
    """True when Triton kernels run under its CPU interpreter (`TRITON_INTERPRET=1`).

    Triton reads the variable when a kernel is decorated, so it must be set before the first use of a
    Triton backend in the process.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def installed() -> bool:
    return importlib.util.find_spec("triton") is not None
