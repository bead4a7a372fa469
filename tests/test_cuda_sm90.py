"""The Hopper tree attention kernel (csrc/tree_attention_sm90.cuh), checked without a GPU as far as that goes.

Without a GPU:
- its sm_90a code holds warpgroup MMAs (HGMMA in the SASS, as many as the kernel issues), TMA loads and
  register reallocation, with no register spills and no local memory; its sm_80 code holds no body (a trap);
- the index math it relies on (csrc/wgmma_layout.h) passes tests/csrc/wgmma_layout_check.cpp, compiled by nvcc
  as host code and run here: fragment ownership, the P -> A conversion, the 128-byte swizzle against the PTX
  ISA's pattern and TMA's box layout, the matrix descriptors, and an emulation of S = Q K^T, the masked online
  softmax and O += P V over the 128 threads' registers that matches the dense fp64 attention.

What stays unverified until a GPU run (benchmarks/gpu_check.sh runs the op tests with HT_KERNELS_CUDA_SM90=1,
compute-sanitizer, and the GPU tests below):
- that the hardware reads the descriptors and the swizzle as the PTX ISA's canonical layouts describe them
  (the emulation models them, it cannot prove them), including the 32-byte start-address steps inside a
  swizzle atom for the K-major k-steps and tnspB for V;
- the tensor maps (cuTensorMapEncodeTiled through the runtime's driver entry point; dims (D, Hkv, S, B)) and
  the TMA boxes landing where wgmma_layout.h says, zero-filled past S;
- the mbarrier protocol (phases, expect-tx byte counts of the separate K and V barriers, one arrival per
  consumer warp), the consumers' turns (bar.sync / bar.arrive of 256 threads; synccheck in gpu_check.sh), the
  proxy fences after the Q stores and the zeroing of stale V rows, and the overlap of the softmax with the
  in-flight P V wgmma (register fences, wgmma.wait_group 1; the SASS order is checked here);
- setmaxnreg (40 / 232 registers) taking effect, shared memory within the opt-in limit, and the speed.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ht_kernels.cuda import build as cuda_build

try:
    NVCC = cuda_build.nvcc()
except cuda_build.CudaBuildError as e:
    pytest.skip(f"cannot build CUDA code here: {e}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "tree_attention_sm90.cu"
KERNEL = "tree_attention_sm90_kernel"
# HGMMA per kernel (4 per D: dtype x split): S = Q K^T, D / 16 k-steps of 64x128x16, issued for the first
# tile and in the loop; O += P V, 128 / 16 k-steps of 64xDx16, in the loop and after it.
HGMMA_PER_KERNEL = {128: {"64x128x16": 2 * 8 + 2 * 8}, 64: {"64x128x16": 2 * 4, "64x64x16": 2 * 8}}


def cuobjdump() -> str | None:
    """cuobjdump next to nvcc, on PATH, or the one Triton ships."""
    candidates = [Path(NVCC).resolve().parent / "cuobjdump", Path("/usr/local/cuda/bin/cuobjdump")]
    found = shutil.which("cuobjdump")
    if found:
        candidates.append(Path(found))
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        candidates.append(Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(c) for c in candidates if c.is_file()), None)


def compile_cubin(arch: str, out: Path) -> str:
    """tree_attention_sm90.cu -> out (a cubin for one arch) with the extension's flags; ptxas's report."""
    cu, _ = cuda_build.flags([arch])
    cmd = [NVCC, *cu, "-Xptxas", "-v", "-cubin", str(SOURCE), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-3000:]}"
    return r.stderr + r.stdout


def sass_functions(cubin: Path) -> dict[str, str]:
    """SASS of each kernel in the cubin: {mangled name: text}."""
    tool = cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump here (nor Triton's)")
    text = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.fixture(scope="module")
def sm90a(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm90a") / "tree_attention_sm90.cubin"
    return out, compile_cubin("90a", out)


@pytest.fixture(scope="module")
def sm80(tmp_path_factory):
    out = tmp_path_factory.mktemp("sm80") / "tree_attention_sm90.cubin"
    return out, compile_cubin("80", out)


def test_sm90a_code_uses_warpgroup_mma_tma_and_setmaxnreg(sm90a):
    functions = {name: sass for name, sass in sass_functions(sm90a[0]).items() if KERNEL in name}
    assert len(functions) == 8, sorted(functions)  # D 64/128 x fp16/bf16 x split or not
    for name, sass in functions.items():
        D = 128 if "TraitsILi128E" in name else 64
        shapes = dict.fromkeys(HGMMA_PER_KERNEL[D], 0)
        for shape in re.findall(r"HGMMA\.(\d+x\d+x\d+)\.F32", sass):
            shapes[shape] = shapes.get(shape, 0) + 1
        assert shapes == HGMMA_PER_KERNEL[D], f"{name}: HGMMA {shapes}"
        assert "UTMALDG" in sass, f"{name}: no TMA load"
        assert re.search(r"USETMAXREG\.DEALLOC", sass) and re.search(r"USETMAXREG\.TRY_ALLOC", sass), name
        assert not re.search(r"\b(LDL|STL)\b", sass), f"{name}: local memory"
        assert "HMMA" not in sass.replace("HGMMA", ""), f"{name}: mma.sync on the Hopper path"


def test_sm90a_softmax_overlaps_the_pv_product(sm90a):
    """In the main loop, every exponential of S_j runs between the wait for S_j (wait_group 1) and the wait
    for P_{j-1} V_{j-1} (wait_group 0), so the softmax overlaps that product; the new P is packed after it.
    (Without the shared-memory store of the row sums that pins them, ptxas moved all of them past the
    second wait.)"""
    functions = {name: sass for name, sass in sass_functions(sm90a[0]).items() if KERNEL in name}
    assert len(functions) == 8, sorted(functions)
    for name, sass in functions.items():
        ops = re.findall(r"/\*[0-9a-f]{4,5}\*/\s+([^;]*);", sass)
        start = next(i for i, op in enumerate(ops) if "DEPBAR.LE gsb0, 0x1" in op)
        end = next(i for i in range(start, len(ops)) if "DEPBAR.LE gsb0, 0x0" in ops[i])
        between = ops[start:end]
        exps = sum("MUFU.EX2" in op for op in between)
        assert exps >= 64 and not any("F2FP" in op for op in between), f"{name}: {exps} exponentials overlap"


def test_sm90a_kernels_do_not_spill(sm90a):
    report = sm90a[1]
    entries = re.findall(rf"Function properties for (\S*{KERNEL}\S*)\n\s*(\d+) bytes stack frame, (\d+) bytes spill "
                         r"stores, (\d+) bytes spill loads", report)
    assert len(entries) == 8, report[-2000:]
    for name, stack, stores, loads in entries:
        assert (int(stack), int(stores), int(loads)) == (0, 0, 0), f"{name}: stack {stack}, spills {stores}/{loads}"
    assert "warning" not in report.lower(), report[-2000:]  # e.g. setmaxnreg ignored, wgmma serialized


def test_sm80_code_holds_no_body(sm80):
    functions = {name: sass for name, sass in sass_functions(sm80[0]).items() if KERNEL in name}
    assert len(functions) == 8, sorted(functions)
    for name, sass in functions.items():
        instructions = [i for i in re.findall(r"/\*[0-9a-f]{4}\*/\s+([A-Z][A-Z0-9_.]*)", sass) if i != "NOP"]
        assert "BPT.TRAP" in instructions and len(instructions) < 8, f"{name}: {instructions}"
        assert "HGMMA" not in sass, name


def test_layout_math_on_the_host(tmp_path):
    exe = tmp_path / "wgmma_layout_check"
    cmd = [NVCC, "-std=c++17", "-O2", "-Xcompiler=-Wall,-Wextra,-Werror", f"-I{ROOT / 'csrc'}",
           str(ROOT / "tests" / "csrc" / "wgmma_layout_check.cpp"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    print(run.stdout)
    assert run.returncode == 0 and run.stdout.rstrip().endswith("all checks passed"), run.stdout[-2000:]


def test_opt_in_needs_the_flag_and_compute_capability_9_0(monkeypatch):
    from ht_kernels.cuda import tree_attention as cuda_ta

    for flag, capability, expected in [(None, (9, 0), False), ("0", (9, 0), False), ("1", (9, 0), True),
                                       ("1", (8, 0), False), ("1", (10, 0), False), ("1", (8, 9), False)]:
        if flag is None:
            monkeypatch.delenv(cuda_ta.SM90_ENV, raising=False)
        else:
            monkeypatch.setenv(cuda_ta.SM90_ENV, flag)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert cuda_ta.use_sm90("cuda") is expected, (flag, capability)


# ---- on a Hopper GPU ----------------------------------------------------------------------------------------
hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="needs a compute capability 9.0 GPU")


@pytest.mark.cuda
@hopper
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("D,dtype,G,T,lens", [
    (128, torch.bfloat16, 4, 64, [300, 0, 129]),   # tree inside one tile, the next, and across two
    (64, torch.float16, 3, 65, [1, 127, 128]),      # the second consumer warpgroup partly idle
    (128, torch.float16, 8, 17, [1000, 5]),
    (64, torch.bfloat16, 1, 130, [255, 256]),       # more rows than one block
])
def test_sm90_kernel_matches_reference(D, dtype, G, T, lens, num_splits, monkeypatch):
    from test_tree_attention import check, make_case

    monkeypatch.setenv("HT_KERNELS_CUDA_SM90", "1")
    check("cuda", make_case(len(lens), T, 2 * G, 2, D, dtype, lens, mask="any"), num_splits=num_splits)


@pytest.mark.cuda
@hopper
def test_sm90_kernel_runs_and_agrees_with_the_default_kernel(monkeypatch):
    """The flag routes to the Hopper kernel (seen in the profiler) and it agrees with the sm_80 kernel on a
    smaller version of the benchmark's target case (Hq/Hkv 32/8, T 64, D 128)."""
    import ht_kernels as ht
    from test_tree_attention import make_case

    q, kc, vc, lens, mask, k, v = make_case(2, 64, 32, 8, 128, torch.bfloat16, [4000, 1500])
    outs = []
    for flag in ("0", "1"):
        monkeypatch.setenv("HT_KERNELS_CUDA_SM90", flag)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            outs.append(ht.tree_attention(q, kc.clone(), vc.clone(), lens, mask, k=k, v=v, return_lse=True,
                                          backend="cuda"))
            torch.cuda.synchronize()
        names = " ".join(e.name for e in prof.events())
        assert (KERNEL in names) == (flag == "1"), names[:500]
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-3, rtol=1e-3)
