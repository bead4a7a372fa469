"""CUDA C++ kernels (`csrc/`), their build and launchers: a fast path on GPUs, taken when asked for
(`backend="cuda"`). `reference/` holds the oracle they are tested against."""
