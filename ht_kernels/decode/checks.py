"""Checks of the decoding API's arguments: each returns the value in its plain Python type, or raises a
ValueError naming the argument and what it got."""
from __future__ import annotations

import math
import numbers
import operator

import torch


def count(name: str, value, minimum: int = 0) -> int:
    """value: an integer >= minimum (a Python or NumPy integer, or an integer tensor of one element; not a
    bool) -> int."""
    try:
        if isinstance(value, bool) or isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            raise TypeError
        n = operator.index(value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value)
    except (TypeError, ValueError, RuntimeError):
        n = None
    if n is None or n < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return n


def real(name: str, value, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """value: a finite real number (not a bool) in [low, high], or (low, high] with low_open -> float."""
    x = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
    ok = isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))
    if not ok or not (low < float(x) if low_open else low <= float(x)) or float(x) > high:
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise ValueError(f"{name} must be a finite real number in {interval}, got {value!r}")
    return float(x)


def token_ids(name: str, value) -> set[int]:
    """value: a token id, or a list, tuple, set or tensor of them -> the set of ids."""
    items = value.tolist() if isinstance(value, torch.Tensor) else value
    items = list(items) if isinstance(items, (list, tuple, set, frozenset)) else [items]
    try:
        return {count(name, x, -2**63) for x in items}
    except ValueError:
        raise ValueError(f"{name} must be a token id or a list, tuple, set or tensor of ids, got {value!r}") from None
