"""Medusa heads (Cai et al. 2024) as a baseline: K residual SiLU heads on the last hidden state.

Head i turns the normalised last hidden state x of a token into x + SiLU(W_i x + b_i), and the model's
own LM head predicts from it the token i + 1 places ahead (the draft of depth i below the next root).
Trained by `python -m ht_kernels.train --method medusa` with the same data and objective as hidden
transfer; `MedusaDecoder` decodes with the same tree policies and verification, so the two differ only
in where the drafts come from. A Medusa step feeds only the tree (no pseudo tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..decode.decoder import HiddenTransferDecoder, make_tree_policy
from ..decode.trees import ancestor_masks
from ..drafts.drafters import medusa_heads


@dataclass
class MedusaWeights:
    """weight: [K, D, D], bias: [K, D] of the K heads; meta: string metadata."""

    weight: torch.Tensor
    bias: torch.Tensor
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def K(self) -> int:
        return self.weight.shape[0]

    def check(self, dim: int) -> None:
        """Refuse heads that do not fit a model of width `dim`."""
        if tuple(self.weight.shape) != (self.K, dim, dim) or tuple(self.bias.shape) != (self.K, dim):
            raise ValueError(f"Medusa heads must be [K, {dim}, {dim}] and [K, {dim}] for this model, got "
                             f"{list(self.weight.shape)} and {list(self.bias.shape)}")

    @classmethod
    def load(cls, path: str | Path) -> MedusaWeights:
        """From a safetensors file with tensors "weight" [K, D, D] and "bias" [K, D], and its metadata."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                names, meta = set(f.keys()), dict(f.metadata() or {})
                if not {"weight", "bias"} <= names:
                    raise ValueError(f"MedusaWeights.load: {path} needs tensors weight and bias, has {sorted(names)}")
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"MedusaWeights.load: {path} is not a readable safetensors file: {e}") from None
        if "layer" in meta:
            raise ValueError(f"MedusaWeights.load: {path} holds hidden-transfer maps (layer {meta['layer']}), not "
                             f"Medusa heads")
        return cls(weight, bias, meta)

    def save(self, path: str | Path) -> None:
        """To safetensors: "weight", "bias" and the metadata, with K and dim added."""
        from safetensors.torch import save_file

        meta = {**self.meta, "K": str(self.K), "dim": str(self.weight.shape[1])}
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path), metadata=meta)


class MedusaDecoder(HiddenTransferDecoder):
    """Lossless tree decoding with Medusa drafts. model: an ht_kernels Transformer; heads: a weights
    file or MedusaWeights; tree, budget, backend, cuda_graphs, prepack: as for HiddenTransferDecoder.
    lookup, lookup_ngram, lookup_nodes: the context lookup's guesses mixed into the drafts, as there, but off by default
    (the baseline is Medusa's drafts alone). generate / generate_ar as there."""

    def __init__(self, model, heads, *, tree=None, budget: int = 16, backend: str = "auto", cuda_graphs: bool = True,
                 prepack: bool | None = None, lookup: float = 0.0, lookup_ngram: int = 3,
                 lookup_nodes: int | None = None):
        if not hasattr(model, "run_layers"):
            from ..loading import load_model

            model = load_model(model)
        heads = heads if isinstance(heads, MedusaWeights) else MedusaWeights.load(heads)
        heads.check(model.config.dim)
        self.model, self.heads = model, heads
        param = next(model.parameters())
        self.weight = heads.weight.to(param.device, param.dtype)
        self.bias = heads.bias.to(param.device, param.dtype)
        self.tree = make_tree_policy(tree, heads.K, budget)
        self.refiner = None
        self._set_execution(backend, cuda_graphs, prepack)
        self._set_lookup(lookup, lookup_ngram, lookup_nodes)

    def _drafts(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, dim] last-layer hidden states -> draft log-probabilities [B, K, V]."""
        m = self.model
        return m.output(medusa_heads(m.norm(h), self.weight, self.bias)).float().log_softmax(-1)

    def _step_tokens(self) -> int:
        return self.tree.budget + self.lookup_nodes

    def _prefill(self, prompts, cache, draft: bool):
        (h_last,) = self._run_prompts(prompts, cache, (self.model.config.n_layers,))
        cache.lengths.copy_(torch.tensor([len(p) for p in prompts], device=cache.k.device))
        return self.model.logits(h_last), self._drafts(h_last) if draft else None, None

    def _step(self, root, drafts, cache, warp, generator, guess=None):
        m = self.model
        tree = self._choose(root, drafts, guess)
        mask = ancestor_masks(tree.parents, self.heads.K + self.lookup_nodes)
        positions = cache.lengths[:, None].long() + tree.depths
        h = m.run_layers(m.embed(tree.tokens), positions, cache, mask, range(m.config.n_layers))
        accepted, accept_len, nxt, last = self._verify(m.head(h), tree, warp, generator, self.verify_backend)
        h_last = h.gather(1, last[:, None, None].expand(-1, 1, h.shape[-1]))[:, 0]
        return tree, accepted, accept_len, nxt, self._drafts(h_last)
