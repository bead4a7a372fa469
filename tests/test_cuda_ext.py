"""The CUDA extension (csrc/, ht_kernels/cuda/build.py) on a machine without a GPU: it builds for sm_80
and sm_90a with warnings as errors, imports, raises RuntimeError when a kernel is launched without a
GPU, and is rebuilt only when its sources change. The kernels' numerics are tested by the op tests with
backend "cuda" (GPU only)."""
from __future__ import annotations

import shutil
import subprocess
import sysconfig

import pytest
import torch

from ht_kernels.cuda import build as cuda_build

try:
    cuda_build.nvcc()
    cuda_build.flags()
except cuda_build.CudaBuildError as e:
    pytest.skip(f"cannot build the CUDA extension here: {e}", allow_module_level=True)

SO = "_C" + sysconfig.get_config_var("EXT_SUFFIX")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The extension, compiled once into a fresh directory: (path, module)."""
    path = cuda_build.build(tmp_path_factory.mktemp("cuda"))
    return path, cuda_build._import(path)


def test_builds_for_sm80_and_sm90a_with_warnings_as_errors(built):
    """The build passes -Werror and both architectures, and every .cu file's code for both is in the module
    (cuobjdump lists the cubins where the toolkit has it; else each cubin's `.target sm_XX` marker)."""
    cu, cpp = cuda_build.flags()
    assert "-Werror=all-warnings" in cu and "-Xcompiler=-fPIC,-Wall,-Wextra,-Werror" in cu + cpp
    n_cu = sum(p.suffix == ".cu" for p in cuda_build.sources())
    cuobjdump = shutil.which("cuobjdump", path=str(cuda_build.Path(cuda_build.nvcc()).resolve().parent))
    if cuobjdump:
        listing = subprocess.run([cuobjdump, "--list-elf", str(built[0])], capture_output=True, text=True).stdout
        counts = {arch: listing.count(f".{arch}.") for arch in ("sm_80", "sm_90a")}
    else:
        data = built[0].read_bytes()
        counts = {arch: data.count(f".target {arch}".encode()) for arch in ("sm_80", "sm_90a")}
    assert counts == {"sm_80": n_cu, "sm_90a": n_cu}, f"cubins per architecture {counts}, .cu files {n_cu}"


def test_imports_with_the_launchers_and_its_source_hash(built):
    _, C = built
    assert C.source_hash == cuda_build.source_hash()
    assert {"compact_kv", "verify_tree_greedy", "hidden_transfer"} <= set(dir(C))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_launch_without_gpu_raises_runtime_error(built):
    _, C = built
    launches = {
        "compact_kv": lambda: C.compact_kv(0, 0, 0, 0, 0, 0, 2, 1, 1, 1, 8, 2, 0, 0, 1, True, 0, False, 1, 0),
        "verify_tree_greedy": lambda: C.verify_tree_greedy(0, 0, 0, 0, 0, 0, 1, 1, 0),
        "hidden_transfer": lambda: C.hidden_transfer(0, 8, 0, 64, 8, 0, 0, 0, 8, 8, 1, 1, 1, 8, 2, 0),
    }
    for op, launch in launches.items():
        with pytest.raises(RuntimeError, match=rf"^{op}: CUDA error: "):
            launch()


def test_bad_arguments_raise_value_error(built):
    _, C = built
    with pytest.raises(ValueError, match="dtype"):
        C.hidden_transfer(0, 8, 0, 64, 8, 0, 0, 0, 8, 8, 1, 1, 1, 8, 7, 0)
    with pytest.raises(ValueError, match="elem_bytes"):
        C.compact_kv(0, 0, 0, 0, 0, 0, 3, 1, 1, 1, 8, 3, 0, 0, 1, True, 0, False, 1, 0)


def test_hidden_transfer_kernel_choice(built):
    _, C = built
    assert C.hidden_transfer_kernel(0, 576, 0, 576 * 576, 576, 576, 2) == "mma"      # bf16, aligned
    assert C.hidden_transfer_kernel(0, 576, 0, 576 * 576, 576, 576, 1) == "mma"      # fp16
    assert C.hidden_transfer_kernel(0, 576, 0, 576 * 576, 576, 576, 0) == "simt"     # fp32
    assert C.hidden_transfer_kernel(0, 33, 0, 33 * 33, 33, 33, 2) == "simt"          # D % 8 != 0
    assert C.hidden_transfer_kernel(2, 576, 0, 576 * 576, 576, 576, 2) == "simt"     # misaligned rows


def test_source_hash_follows_sources_and_architectures(tmp_path, monkeypatch):
    first = cuda_build.source_hash()
    copy = tmp_path / "csrc"
    shutil.copytree(cuda_build.CSRC, copy)
    monkeypatch.setattr(cuda_build, "CSRC", copy)
    assert cuda_build.source_hash() == first
    (copy / "verify_tree.cuh").write_text((copy / "verify_tree.cuh").read_text() + "\n// changed\n")
    assert cuda_build.source_hash() != first
    monkeypatch.setattr(cuda_build, "CSRC", cuda_build.Path(cuda_build.__file__).resolve().parents[2] / "csrc")
    monkeypatch.setenv("HT_KERNELS_CUDA_ARCHS", "90a")
    assert cuda_build.source_hash() != first


def test_load_reuses_a_current_build_and_skips_a_stale_one(built, tmp_path, monkeypatch, capsys):
    """load() takes an ahead-of-time module whose source hash is current, else the cached just-in-time
    build; with both present nothing is compiled."""
    def no_build(*args, **kwargs):
        raise AssertionError("load() compiled although a current build exists")

    imported = []
    monkeypatch.setattr(cuda_build, "build", no_build)
    monkeypatch.setattr(cuda_build, "_import", lambda path: imported.append(path) or built[1])
    monkeypatch.setattr(cuda_build, "PACKAGE", tmp_path / "package")
    monkeypatch.setenv("HT_KERNELS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "package").mkdir()
    shutil.copy2(built[0], tmp_path / "package" / SO)
    assert cuda_build.load.__wrapped__() is built[1] and imported == [tmp_path / "package" / SO]

    cache = cuda_build.cache_dir()
    cache.mkdir(parents=True)
    shutil.copy2(built[0], cache / SO)
    monkeypatch.setattr(cuda_build, "source_hash", lambda: "0123456789abcdef")   # the sources moved on
    monkeypatch.setattr(cuda_build, "cache_dir", lambda: cache)
    assert cuda_build.load.__wrapped__() is built[1] and imported[1:] == [tmp_path / "package" / SO, cache / SO]
    assert "built from other sources" in capsys.readouterr().err
