"""Vectorised PyTorch implementations: the "torch" backend (the readable loops in reference/ are the oracle)."""
