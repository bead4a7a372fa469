"""The public ops, one per file: argument checks, backend dispatch and `torch.library` registration. The fast
paths are in `torch_backend/`, `triton/` and `cuda/`; `reference/` is the oracle."""
