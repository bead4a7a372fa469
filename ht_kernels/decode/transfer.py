"""Hidden-transfer weights: K linear maps applied after layer t, stored as safetensors with metadata."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

SHIPPED = Path(__file__).resolve().parent.parent / "weights"  # <model name>.safetensors, per model


@dataclass
class TransferWeights:
    """weight: [K, D, D] and bias: [K, D] (pseudo_i = weight[i] @ h + bias[i], h the hidden state after
    `layer` layers, 1 <= layer < n_layers); meta: string metadata (model, how the maps were trained);
    mlp: None, or (down [K, D, r], up [K, r, D]) of a residual low-rank SiLU block after the maps
    (`drafts.forced.transfer_mlp`); extra: None, or (layer e < layer, weight [K, D, D]) of maps of the
    hidden state after e layers, added to the maps' output (before the block); refine: None, or (down
    [K, 2 D, r], up [K, r, D], top) of the root refiner (`drafts.refine.RootRefiner`); calibration: None,
    or [K, 2] fp32 (a, b) per depth of the draft scores the tree policies use (`decode.trees.TreePolicy`)."""

    weight: torch.Tensor
    bias: torch.Tensor
    layer: int
    meta: dict[str, str] = field(default_factory=dict)
    mlp: tuple[torch.Tensor, torch.Tensor] | None = None
    extra: tuple[int, torch.Tensor] | None = None
    refine: tuple[torch.Tensor, torch.Tensor, int] | None = None
    calibration: torch.Tensor | None = None

    @property
    def K(self) -> int:
        return self.weight.shape[0]

    def first(self, depth: int) -> TransferWeights:
        """The first `depth` maps (the drafts of depths 1..depth), sharing this one's tensors. Pseudo state
        i attends pseudo states 1..i-1 only, so they are the first `depth` states of the full chain."""
        if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= self.K:
            raise ValueError(f"depth must be an int in [1, K={self.K}], got {depth!r}")
        mlp = None if self.mlp is None else (self.mlp[0][:depth], self.mlp[1][:depth])
        extra = None if self.extra is None else (self.extra[0], self.extra[1][:depth])
        refine = None if self.refine is None else (self.refine[0][:depth], self.refine[1][:depth], self.refine[2])
        calibration = None if self.calibration is None else self.calibration[:depth]
        return TransferWeights(self.weight[:depth], self.bias[:depth], self.layer, self.meta, mlp, extra, refine,
                               calibration)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The learned tensors by name: weight, bias and those of the block, the extra maps and the refiner."""
        return {"weight": self.weight, "bias": self.bias, **dict(zip(("mlp down", "mlp up"), self.mlp or ())),
                **({} if self.extra is None else {"extra weight": self.extra[1]}),
                **dict(zip(("refine down", "refine up"), (self.refine or ())[:2]))}

    @classmethod
    def untrained(cls, dim: int, n_layers: int, K: int = 3, layer: int | None = None) -> TransferWeights:
        """Zero maps at layer n_layers // 2: useless drafts, still lossless decoding."""
        return cls(torch.zeros(K, dim, dim), torch.zeros(K, dim), n_layers // 2 if layer is None else layer,
                   {"trained": "no"})

    @classmethod
    def load(cls, path: str | Path) -> TransferWeights:
        """From a safetensors file with tensors "weight" [K, D, D], "bias" [K, D] and a "layer" in its
        metadata (the rest of the metadata becomes `meta`)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                names, meta = set(f.keys()), dict(f.metadata() or {})
                if not {"weight", "bias"} <= names:
                    raise ValueError(f"TransferWeights.load: {path} needs tensors weight and bias, has {sorted(names)}")
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
                mlp = (f.get_tensor("mlp_down"), f.get_tensor("mlp_up")) if "mlp_down" in names else None
                extra = f.get_tensor("extra_weight") if "extra_weight" in names else None
                refine = (f.get_tensor("refine_down"), f.get_tensor("refine_up")) if "refine_down" in names else None
                calibration = f.get_tensor("calibration").float() if "calibration" in names else None
        except (SafetensorError, OSError) as e:
            raise ValueError(f"TransferWeights.load: {path} is not a readable safetensors file: {e}") from None
        need = ["layer"] + ["extra_layer"] * (extra is not None) + ["refine_top"] * (refine is not None)
        if any(k not in meta or not meta[k].strip().isdigit() for k in need):
            raise ValueError(f"TransferWeights.load: {path} needs integers {need} in its metadata, has "
                             f"{ {k: meta.get(k) for k in need} } (are these hidden-transfer maps?)")
        extra = None if extra is None else (int(meta.pop("extra_layer")), extra)
        refine = None if refine is None else (*refine, int(meta.pop("refine_top")))
        return cls(weight, bias, int(meta.pop("layer")), meta, mlp, extra, refine, calibration)

    def save(self, path: str | Path) -> None:
        """To safetensors: "weight", "bias" (and "mlp_down", "mlp_up", "extra_weight", "refine_down",
        "refine_up", "calibration") and the metadata, with layer, K, dim (and extra_layer, refine_top) added."""
        from safetensors.torch import save_file

        meta = {**self.meta, "layer": str(self.layer), "K": str(self.K), "dim": str(self.weight.shape[1])}
        tensors = {"weight": self.weight, "bias": self.bias}
        if self.mlp is not None:
            tensors.update(mlp_down=self.mlp[0], mlp_up=self.mlp[1])
        if self.extra is not None:
            tensors.update(extra_weight=self.extra[1])
            meta["extra_layer"] = str(self.extra[0])
        if self.refine is not None:
            tensors.update(refine_down=self.refine[0], refine_up=self.refine[1])
            meta["refine_top"] = str(self.refine[2])
        if self.calibration is not None:
            tensors.update(calibration=self.calibration.float())
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def resolve_transfer(transfer, name: str, dim: int, n_layers: int) -> TransferWeights:
    """transfer: "default" (the weights shipped for model `name`, else untrained maps with a warning),
    a path, a TransferWeights, or None (untrained) -> TransferWeights checked against the model."""
    if transfer is None:
        weights = TransferWeights.untrained(dim, n_layers)
    elif isinstance(transfer, TransferWeights):
        weights = transfer
    elif transfer == "default":
        shipped = SHIPPED / f"{name}.safetensors"
        if shipped.exists():
            weights = TransferWeights.load(shipped)
        else:
            warnings.warn(f"no transfer weights are shipped for model {name!r}: decoding with untrained maps "
                          f"(lossless, but the drafts are useless)", stacklevel=3)
            weights = TransferWeights.untrained(dim, n_layers)
    elif isinstance(transfer, (str, Path)) and Path(transfer).is_file():
        weights = TransferWeights.load(transfer)
    else:
        raise ValueError(f"transfer must be 'default', a weights file, TransferWeights or None, got {transfer!r}")
    _check_types(weights)
    K = weights.K
    if tuple(weights.weight.shape) != (K, dim, dim) or tuple(weights.bias.shape) != (K, dim):
        raise ValueError(f"transfer weights must be [K, {dim}, {dim}] and [K, {dim}] for this model, got "
                         f"{list(weights.weight.shape)} and {list(weights.bias.shape)}")
    if not 1 <= weights.layer < n_layers:
        raise ValueError(f"transfer layer must be in [1, {n_layers}) for a {n_layers}-layer model, got {weights.layer}")
    if weights.extra is not None and (not 0 <= weights.extra[0] < weights.layer
                                      or tuple(weights.extra[1].shape) != (K, dim, dim)):
        raise ValueError(f"transfer extra maps must be [K, {dim}, {dim}] of a layer in [0, {weights.layer}), got "
                         f"{list(weights.extra[1].shape)} of layer {weights.extra[0]}")
    if weights.refine is not None:
        down, up, top = weights.refine
        r = down.shape[-1]
        if tuple(down.shape) != (K, 2 * dim, r) or tuple(up.shape) != (K, r, dim) or not 1 <= top:
            raise ValueError(f"transfer refine must be [K, {2 * dim}, r] and [K, r, {dim}] with K={K} and top >= 1, "
                             f"got {list(down.shape)}, {list(up.shape)} and top={top}")
    if weights.calibration is not None:
        c = weights.calibration
        if tuple(c.shape) != (K, 2) or not bool(c.isfinite().all()) or not bool((c[:, 0] > 0).all()):
            raise ValueError(f"transfer calibration must be [K={K}, 2] finite (a, b) with a > 0, got "
                             f"{c.tolist() if c.numel() < 32 else list(c.shape)}")
    if weights.mlp is not None:
        down, up = weights.mlp
        r = down.shape[-1]
        if tuple(down.shape) != (K, dim, r) or tuple(up.shape) != (K, r, dim):
            raise ValueError(f"transfer mlp must be [K, {dim}, r] and [K, r, {dim}] with K={K}, got "
                             f"{list(down.shape)} and {list(up.shape)}")
    return weights


def _check_types(w: TransferWeights) -> None:
    """Real-valued tensors where TransferWeights holds tensors, ints where it holds layers and counts."""
    for name, t in w.named_tensors().items():
        if not isinstance(t, torch.Tensor) or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"transfer {name} must be a real-valued torch.Tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
    ints = {"layer": w.layer, **({} if w.extra is None else {"extra layer": w.extra[0]}),
            **({} if w.refine is None else {"refine top": w.refine[2]})}
    for name, n in ints.items():
        if not isinstance(n, int) or isinstance(n, bool):
            raise ValueError(f"transfer {name} must be an int, got {n!r}")
