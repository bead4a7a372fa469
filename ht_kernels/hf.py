"""`ht_kernels.hf`: `ht_kernels.tree_attention` as a transformers attention backend named "ht_tree".

    import ht_kernels.hf  # registers "ht_tree" with AttentionInterface and AttentionMaskInterface
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="ht_tree")
    # or model.set_attn_implementation("ht_tree") on a loaded Llama / Qwen2 / Mistral model
    ht_kernels.hf.register("ht_tree_cuda", backend="cuda")  # another name for another backend

"ht_tree" runs `tree_attention` with backend "auto" (Triton on a GPU, the torch backend on CPU);
`register(name, backend)` adds a name whose calls run the given backend ("cuda", "triton", "torch"), which
raises `BackendUnavailableError` where that backend cannot run the inputs, as the op does.

A call attends Q new tokens over KV = n + Q keys (the cache after this step's update). The first n keys
(the prefix) are seen by every new token; the new tokens see each other through the mask: causal when
transformers passes none, or the last Q columns of a 4D boolean mask [B, 1, Q, KV], e.g. the ancestor mask
of a token tree in the verification pass of a tree-based speculative decoder. The mask function registered
with it is transformers' `sdpa_mask`, so causal masking is never dropped. A mask that hides prefix keys
(left padding, sliding windows) cannot be expressed and fails an assertion (asynchronous on a GPU).
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .ops._backend import BACKENDS
from .ops.tree_attention import tree_attention

NAME = "ht_tree"


def ht_tree_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      *, backend: str = "auto", **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function. query [B, Hq, Q, D]; key, value [B, Hkv, KV, D] with KV >= Q;
    attention_mask bool (or additive 0 / -inf) [B or 1, 1, Q, KV], or None for causal new tokens;
    backend: tree_attention's. Returns (out [B, Q, Hq, D], None)."""
    B, Hq, Q, D = query.shape
    KV = key.shape[2]
    if dropout:
        raise ValueError(f"ht_tree attention: dropout is not supported, got {dropout}")
    if KV < Q:
        raise ValueError(f"ht_tree attention: key must hold the {Q} new tokens, got key {list(key.shape)}")
    n = KV - Q
    if attention_mask is None:
        tree = torch.ones(Q, Q, dtype=torch.bool, device=query.device).tril()
    else:
        if attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[-2:] != (Q, KV):
            raise ValueError(f"ht_tree attention: attention_mask must be [B, 1, Q, KV] = [{B}, 1, {Q}, {KV}], got "
                             f"{list(attention_mask.shape)}")
        mask = attention_mask[:, 0] if attention_mask.dtype == torch.bool else attention_mask[:, 0] == 0
        torch._assert_async(mask[..., :n].all(), "ht_tree attention: every new token must see every prefix key "
                                                 "(left padding or sliding windows need another backend)")
        tree = mask[..., n:].expand(B, Q, Q)
    seqlens = torch.full((B,), n, dtype=torch.int32, device=query.device)
    out = tree_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), seqlens, tree,
                         softmax_scale=scaling, backend=backend)
    return out, None


def register(name: str = NAME, backend: str = "auto") -> None:
    """Register the attention function, running tree_attention with `backend` ("auto" | "cuda" | "triton"
    | "torch"), and its mask function under `name` (done on import for "ht_tree" with "auto")."""
    if backend not in BACKENDS:
        raise ValueError(f"register: backend must be one of {BACKENDS}, got {backend!r}")

    def attention(module, query, key, value, attention_mask, **kwargs):
        return ht_tree_attention(module, query, key, value, attention_mask, backend=backend, **kwargs)

    AttentionInterface.register(name, ht_tree_attention if backend == "auto" else attention)
    AttentionMaskInterface.register(name, sdpa_mask)


register()
