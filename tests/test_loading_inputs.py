"""Bad input to `load_model` and `ModelConfig`: damaged files, configs, dtypes and devices are refused with a
ValueError naming the file or the argument, never another exception."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import ht_kernels as ht
from ht_kernels.model import ModelConfig


def test_damaged_gguf_files_are_refused_by_name(tmp_path):
    f = tmp_path / "m.gguf"
    for data in (b"junk", b"GGUF" + bytes(40), b"GGUF\x03\x00\x00\x00" + bytes(7)):
        f.write_bytes(data)
        with pytest.raises(ValueError, match="m.gguf' is not a readable GGUF file"):
            ht.load_model(str(f))
    try:
        real = ht.loading._smollm2_path()
    except (ImportError, FileNotFoundError, ValueError):
        return
    with open(real, "rb") as src:
        f.write_bytes(src.read(5_000_000))  # its header and part of its tensors
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        ht.load_model(str(f))


@pytest.fixture
def hf_copy(tiny, tmp_path):
    """A copy of the tiny HF model directory to damage."""
    path = tmp_path / "model"
    shutil.copytree(tiny, path)
    return path


def test_damaged_hf_directories_are_refused_by_file(hf_copy):
    config = json.loads((hf_copy / "config.json").read_text())
    cases = [
        ("model.safetensors", b"junk" * 10, "model.safetensors' is not a readable safetensors file"),
        ("model.safetensors", (hf_copy / "model.safetensors").read_bytes()[:5000], "not a readable safetensors file"),
        ("config.json", b"{bad", "config.json' is not JSON"),
        ("config.json", b"[1]", "config.json' must hold a JSON object, got list"),
        ("config.json", json.dumps({k: v for k, v in config.items() if k != "vocab_size"}).encode(),
         "config.json' lacks 'vocab_size'"),
        ("config.json", json.dumps({**config, "num_attention_heads": 0}).encode(), "sizes must be integers >= 1"),
        ("config.json", json.dumps({**config, "vocab_size": "258"}).encode(), "sizes must be integers >= 1"),
        ("config.json", json.dumps({**config, "num_key_value_heads": 3}).encode(),
         "n_heads must be a multiple of n_kv_heads"),
        ("config.json", json.dumps({**config, "hidden_size": 32}).encode(), "must have shape"),
        ("generation_config.json", b"\xff\xfe", "generation_config.json' is not JSON"),
    ]
    for name, data, match in cases:
        kept = (hf_copy / name).read_bytes()
        (hf_copy / name).write_bytes(data)
        with pytest.raises(ValueError, match=match):
            ht.load_model(str(hf_copy))
        (hf_copy / name).write_bytes(kept)
    assert ht.load_model(str(hf_copy)).config.vocab_size == config["vocab_size"]


def test_bad_dtypes_and_devices_are_refused(tiny):
    for dtype in ("float32", torch.int64, None):
        with pytest.raises(ValueError, match="dtype must be torch.float32, torch.bfloat16 or torch.float16"):
            ht.load_model(tiny, dtype=dtype)
    bad = ["tpu", "meta", 3.5] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"])
    for device in bad:
        with pytest.raises(ValueError, match="load_model: device"):
            ht.load_model(tiny, device=device)
    for device in ("cpu", "cpu:0", torch.device("cpu")):
        assert ht.load_model(tiny, device=device).device.type == "cpu"


@pytest.mark.parametrize("change,match", [
    (dict(dim=0), "sizes must be integers >= 1"), (dict(n_layers=True), "sizes must be integers"),
    (dict(head_dim=2.0), "sizes must be integers"), (dict(max_seq_len=-1), "sizes must be integers"),
    (dict(n_kv_heads=3), "n_heads must be a multiple of n_kv_heads"), (dict(head_dim=15), "head_dim even"),
    (dict(norm_eps=0.0), "norm_eps must be a finite number > 0"),
    (dict(rope_theta=float("inf")), "rope_theta must be a finite number > 0"),
])
def test_model_config_refuses_impossible_shapes(change, match):
    base = dict(vocab_size=50, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128)
    ModelConfig(**base)
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**base, **change})
