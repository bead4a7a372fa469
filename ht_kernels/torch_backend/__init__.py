"""The "torch" backend: vectorised PyTorch implementations of the ops, the fast path on CPU (and on any device
without a kernel). `reference/` holds the oracle they are tested against."""
