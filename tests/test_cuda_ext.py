"""The CUDA extension (csrc/, ht_kernels/cuda/build.py) on a machine without a GPU: it builds for sm_80
and sm_90a with warnings as errors, imports, raises RuntimeError when a kernel is launched without a
GPU, and is rebuilt only when its sources change. The kernels' numerics are tested by the op tests with
backend "cuda" (GPU only)."""
from __future__ import annotations

import os
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
# q, its strides, caches, their strides, block table, its strides, page, num_blocks, new k/v, their strides,
# lengths, mask, its stride, out, its strides, lse, partials, B, T, Hq, Hkv, D, S, splits, scale, dtype (bf16),
# stream, sm90: one tiny case at address 0.
TREE_ATTENTION_ARGS = [0, 64, 64, 64, 0, 0, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 64, 64,
                       0, 0, 0, 1, 1, 1, 1, 64, 4, 1, 0.125, 2, 0, False]
# k, v, their strides (l, b, s, h, d), L, B, H, D, elem_bytes, block table, its strides, page, num_blocks,
# lengths, accepted, its stride, int64, accept_len, int64, A, stream.
COMPACT_KV_ARGS = [0, 0, 0, 0, 0, 0, 2, 1, 1, 1, 8, 2, 0, 0, 0, 0, 0, 0, 0, 1, True, 0, False, 1, 0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The extension, compiled once into a fresh directory: (path, module)."""
    path = cuda_build.build(tmp_path_factory.mktemp("cuda"))
    return path, cuda_build._import(path)


def test_builds_for_sm80_and_sm90a_with_warnings_as_errors(built):
    """The build passes -Werror and both architectures (or those HT_KERNELS_CUDA_ARCHS names), and every .cu
    file's code for each is in the module (cuobjdump lists the cubins where the toolkit has it; else each
    cubin's `.target sm_XX` marker)."""
    if "HT_KERNELS_CUDA_ARCHS" not in os.environ:
        assert cuda_build.archs() == ["80", "90a"]
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
    want = {arch: n_cu * (arch[3:] in cuda_build.archs()) for arch in ("sm_80", "sm_90a")}
    assert counts == want, f"cubins per architecture {counts}, .cu files {n_cu}"


def test_imports_with_the_launchers_and_its_source_hash(built):
    _, C = built
    assert C.source_hash == cuda_build.source_hash()
    assert {"compact_kv", "verify_tree_greedy", "hidden_transfer", "tree_attention"} <= set(dir(C))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_launch_without_gpu_raises_runtime_error(built):
    _, C = built
    launches = [  # (the op the error names, a call)
        ("compact_kv", lambda: C.compact_kv(*COMPACT_KV_ARGS)),
        ("verify_tree_greedy", lambda: C.verify_tree_greedy(0, 0, 0, 0, 0, 0, 1, 1, 0)),
        ("hidden_transfer", lambda: C.hidden_transfer(0, 8, 0, 64, 8, 0, 0, 0, 8, 8, 1, 1, 1, 8, 2, 0)),
        ("tree_attention", lambda: C.tree_attention(*TREE_ATTENTION_ARGS)),
        ("tree_attention", lambda: C.tree_attention(*TREE_ATTENTION_ARGS[:-1], True)),  # the Hopper kernel asked for
        ("tree_attention", lambda: C.tree_attention(*TREE_ATTENTION_ARGS[:9], 64, 1, 1, 4, 3,  # paged
                                                    *TREE_ATTENTION_ARGS[14:])),
        ("tree_attention", lambda: C.tree_attention_num_splits(1, 1, 1, 1, 16)),
        ("tree_attention", lambda: C.tree_attention_num_splits(1, 1, 1, 1, 16, sm90=True)),
    ]
    for op, launch in launches:
        with pytest.raises(RuntimeError, match=rf"^{op}: CUDA error: "):
            launch()


def test_bad_arguments_raise_value_error(built):
    _, C = built
    with pytest.raises(ValueError, match="dtype"):
        C.hidden_transfer(0, 8, 0, 64, 8, 0, 0, 0, 8, 8, 1, 1, 1, 8, 7, 0)
    with pytest.raises(ValueError, match="D must be 64 or 128"):
        C.tree_attention(*TREE_ATTENTION_ARGS[:33], 80, *TREE_ATTENTION_ARGS[34:])
    with pytest.raises(ValueError, match="dtype"):
        C.tree_attention(*TREE_ATTENTION_ARGS[:37], 0, *TREE_ATTENTION_ARGS[38:])
    with pytest.raises(ValueError, match="page must be >= 1"):
        C.tree_attention(*TREE_ATTENTION_ARGS[:9], 64, 1, 1, 0, 3, *TREE_ATTENTION_ARGS[14:])
    with pytest.raises(ValueError, match="elem_bytes"):
        C.compact_kv(*COMPACT_KV_ARGS[:6], 3, *COMPACT_KV_ARGS[7:11], 3, *COMPACT_KV_ARGS[12:])
    with pytest.raises(ValueError, match="page must be >= 1"):
        C.compact_kv(*COMPACT_KV_ARGS[:12], 64, 1, 1, 0, 3, *COMPACT_KV_ARGS[17:])


def test_hidden_transfer_kernel_choice(built):
    _, C = built
    assert C.hidden_transfer_kernel(0, 576, 0, 576 * 576, 576, 576, 2) == "mma"      # bf16, aligned
    assert C.hidden_transfer_kernel(0, 576, 0, 576 * 576, 576, 576, 1) == "mma"      # fp16
    assert C.hidden_transfer_kernel(0, 576, 0, 576 * 576, 576, 576, 0) == "simt"     # fp32
    assert C.hidden_transfer_kernel(0, 33, 0, 33 * 33, 33, 33, 2) == "simt"          # D % 8 != 0
    assert C.hidden_transfer_kernel(2, 576, 0, 576 * 576, 576, 576, 2) == "simt"     # misaligned rows


def test_source_hash_follows_sources_and_architectures(tmp_path, monkeypatch):
    monkeypatch.delenv("HT_KERNELS_CUDA_ARCHS", raising=False)
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
    assert cuda_build._load() is built[1] and imported == [tmp_path / "package" / SO]

    cache = cuda_build.cache_dir()
    cache.mkdir(parents=True)
    shutil.copy2(built[0], cache / SO)
    monkeypatch.setattr(cuda_build, "source_hash", lambda: "0123456789abcdef")   # the sources moved on
    monkeypatch.setattr(cuda_build, "cache_dir", lambda digest=None: cache)
    assert cuda_build._load() is built[1] and imported[1:] == [tmp_path / "package" / SO, cache / SO]
    assert "built from other sources" in capsys.readouterr().err


@pytest.mark.cuda
def test_small_case_of_each_kernel():
    """One small call of every CUDA kernel against the torch backend (run under compute-sanitizer by
    benchmarks/gpu_check.sh)."""
    import ht_kernels as ht

    dev, dtype = "cuda", torch.bfloat16
    q = torch.randn(2, 5, 4, 64, device=dev, dtype=dtype)
    caches = [torch.randn(2, 80, 2, 64, device=dev, dtype=dtype) for _ in range(2)]
    kv = [torch.randn(2, 5, 2, 64, device=dev, dtype=dtype) for _ in range(2)]
    lens = torch.tensor([70, 3], dtype=torch.int32, device=dev)
    mask = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]],
                        dtype=torch.bool, device=dev)
    got, want = ([ht.tree_attention(q, *[c.clone() for c in caches], lens, mask, k=kv[0], v=kv[1], backend=b)
                  for b in ("cuda", "torch")])
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    # 80 packed query rows over 2 tiles of 128 keys: with HT_KERNELS_CUDA_SM90=1 both consumer warpgroups of
    # the Hopper kernel work and take turns
    q, caches = torch.randn(1, 40, 4, 64, device=dev, dtype=dtype), [torch.randn(1, 250, 2, 64, device=dev, dtype=dtype)
                                                                      for _ in range(2)]
    lens, mask = torch.tensor([200], dtype=torch.int32, device=dev), torch.ones(40, 40, device=dev).tril().bool()
    got, want = ([ht.tree_attention(q, *caches, lens, mask, backend=b) for b in ("cuda", "torch")])
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)

    hidden, weight = torch.randn(7, 64, device=dev, dtype=dtype), torch.randn(3, 64, 64, device=dev, dtype=dtype) / 8
    torch.testing.assert_close(ht.hidden_transfer(hidden, weight, backend="cuda"),
                               ht.hidden_transfer(hidden, weight, backend="torch"), atol=2e-2, rtol=2e-2)

    draft = torch.randint(0, 2, (3, 5), device=dev)
    target = torch.randint(0, 2, (3, 5), device=dev)
    parents = torch.tensor([-1, 0, 0, 1, 2], device=dev)
    for a, b in zip(ht.verify_tree_greedy(draft, parents, target, backend="cuda"),
                    ht.verify_tree_greedy(draft, parents, target, backend="torch")):
        assert torch.equal(a, b)

    cache = [torch.randn(3, 2, 20, 2, 64, device=dev, dtype=dtype) for _ in range(2)]
    accepted = torch.tensor([[0, 2, 4], [0, 1, -1]], device=dev)
    accept_len = torch.tensor([3, 2], dtype=torch.int32, device=dev)
    lens = torch.tensor([4, 9], dtype=torch.int32, device=dev)
    moved = [c.clone() for c in cache]
    ht.compact_kv(*moved, lens, accepted, accept_len, backend="cuda")
    ht.compact_kv(*cache, lens, accepted, accept_len, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(moved, cache))


def test_a_failed_build_is_tried_once_per_process(monkeypatch):
    calls = []

    def failing():
        calls.append(1)
        raise cuda_build.CudaBuildError("no compiler")

    monkeypatch.setattr(cuda_build, "_load", failing)
    cuda_build._load_once.cache_clear()
    try:
        for _ in range(2):
            with pytest.raises(cuda_build.CudaBuildError, match="no compiler"):
                cuda_build.load()
        assert len(calls) == 1
    finally:
        cuda_build._load_once.cache_clear()
