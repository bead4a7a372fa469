"""Fused kernels for lossless parallel decoding of LLMs by hidden transfer.

Triton kernels load on first use, so `import ht_kernels` stays cheap and works without a GPU.
"""
from .ops._backend import BackendUnavailableError
from .ops.hidden_transfer import hidden_transfer
from .ops.tree_attention import tree_attention
from .tree import Tree, pack_mask_bits

__all__ = ["BackendUnavailableError", "Tree", "hidden_transfer", "pack_mask_bits", "tree_attention"]
__version__ = "0.1.0"
