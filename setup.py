"""Package build: pure Python. With HT_KERNELS_CUDA=1 it also compiles the CUDA kernels of csrc/ into
ht_kernels/_C ahead of time (needs nvcc and pybind11): `HT_KERNELS_CUDA=1 pip install --no-build-isolation -e .`.
Without it the kernels are built on first use (ht_kernels/cuda/build.py)."""
import importlib.util
import os
from pathlib import Path

from setuptools import setup

if os.environ.get("HT_KERNELS_CUDA") == "1":
    # build.py alone (no torch import): the package itself need not be importable yet
    path = Path(__file__).resolve().parent / "ht_kernels" / "cuda" / "build.py"
    spec = importlib.util.spec_from_file_location("ht_kernels_cuda_build", path)
    cuda_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_build)
    print(f"ht_kernels: CUDA kernels at {cuda_build.build_into_package()}")

setup()
