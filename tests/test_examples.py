"""The scripts in examples/ run end to end (small settings) and say what they should."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_medusa_verify_step():
    out = run("medusa_verify_step.py", "--prefix", "37")
    assert "tree_attention vs plain attention" in out and out.count("accepted nodes [0") == 2


def test_streaming():
    out = run("streaming.py", "--max-new-tokens", "12")
    assert "forward passes]" in out and len(out.splitlines()[0]) > 0


def test_train_your_model(tmp_path):
    out = run("train_your_model.py", "--out", str(tmp_path / "run"), "--steps", "3")
    assert "same as plain decoding: True" in out and (tmp_path / "run" / "transfer.safetensors").exists()
