"""Readable PyTorch references of the ops, written for clarity: the oracle that tests run in fp64 against every
backend, never a fast path (those are `torch_backend/`, `triton/` and `cuda/`)."""
