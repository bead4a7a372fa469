"""Fused kernels for lossless parallel decoding of LLMs by hidden transfer.

Triton kernels load on first use, so `import ht_kernels` stays cheap and works without a GPU.
"""
from .decode.decoder import GenerateOutput, HiddenTransferDecoder
from .decode.transfer import TransferWeights
from .decode.trees import TreePolicy
from .loading import load_model
from .ops._backend import BackendUnavailableError
from .ops.compact_kv import compact_kv
from .ops.hidden_transfer import hidden_transfer
from .ops.tree_attention import tree_attention
from .ops.verify_tree import verify_tree_greedy
from .tree import Tree, pack_mask_bits

__all__ = ["BackendUnavailableError", "GenerateOutput", "HiddenTransferDecoder", "TransferWeights", "Tree",
           "TreePolicy", "compact_kv", "hidden_transfer", "load_model", "pack_mask_bits", "tree_attention",
           "verify_tree_greedy"]
__version__ = "0.1.0"
