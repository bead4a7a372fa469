"""Build and load `ht_kernels._C`, the CUDA kernels of csrc/ (a torch-free pybind11 module).

Ahead of time: `HT_KERNELS_CUDA=1 pip install --no-build-isolation -e .` puts `_C` inside the package.
Otherwise the first use of a "cuda" backend builds it just in time into
`$HT_KERNELS_CACHE/cuda-<hash>` (default cache `~/.cache/ht_kernels`), under a file lock so concurrent
processes build it once; the hash covers the sources, the flags, nvcc's version and the Python ABI, so it
is rebuilt only when one of them changes. `HT_KERNELS_CUDA_ARCHS` picks the GPU architectures (default
"80;90a": sm_80 code and sm_90a code for Hopper). The sources compile in parallel, warnings are errors,
and the CUDA runtime is linked statically, so the module also builds and imports on a machine without a
GPU (its launchers then raise RuntimeError).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"
PACKAGE = Path(__file__).resolve().parents[1]
NAME = "_C"


class CudaBuildError(RuntimeError):
    """The CUDA extension cannot be built or loaded here (no nvcc, no pybind11, a compile error)."""


def archs() -> list[str]:
    raw = os.environ.get("HT_KERNELS_CUDA_ARCHS", "80;90a")
    return [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]


def nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    path = str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc")
    if not path or not Path(path).exists():
        raise CudaBuildError("nvcc not found (put the CUDA toolkit's bin on PATH or set CUDA_HOME)")
    return path


def _includes() -> list[str]:
    try:
        import pybind11
    except ImportError as e:
        raise CudaBuildError("the pybind11 package is needed to build the CUDA extension") from e
    return [f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}"]


def flags(arch_list: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(flags for the .cu files, flags for bindings.cpp)."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in (arch_list or archs())]
    common = ["-O3", "-std=c++17", "-Xcompiler=-fPIC,-Wall,-Wextra,-Werror"]
    return [*common, "-Werror=all-warnings", "-lineinfo", *gencode], [*common, *_includes()]


def sources() -> list[Path]:
    if not CSRC.is_dir():
        raise CudaBuildError(f"the CUDA sources are not at {CSRC} (install the package from its repository)")
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp"))


def source_hash() -> str:
    """Hash of the sources, the flags, nvcc's version and the Python ABI (16 hex digits)."""
    h = hashlib.sha256()
    for p in sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    cu, cpp = flags()
    version = subprocess.run([nvcc(), "--version"], capture_output=True, text=True).stdout
    h.update("\0".join([*cu, *cpp, version, sysconfig.get_config_var("EXT_SUFFIX")]).encode())
    return h.hexdigest()[:16]


def build(out_dir: Path, digest: str | None = None) -> Path:
    """Compile csrc/ into out_dir/_C<ext suffix> (objects in out_dir/obj) and return its path."""
    digest = digest or source_hash()
    out_dir = Path(out_dir)
    obj = out_dir / "obj"
    obj.mkdir(parents=True, exist_ok=True)
    cu, cpp = flags()
    compiler = nvcc()
    jobs = [[compiler, *cu, "-c", str(s), "-o", str(obj / f"{s.stem}.o")] for s in sources() if s.suffix == ".cu"]
    jobs.append([compiler, *cpp, f'-DHT_KERNELS_SOURCE_HASH="{digest}"', "-c", str(CSRC / "bindings.cpp"),
                 "-o", str(obj / "bindings.o")])
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), jobs))
    failed = [(cmd, r) for cmd, r in zip(jobs, results) if r.returncode != 0]
    if failed:
        cmd, r = failed[0]
        raise CudaBuildError(f"compiling {cmd[-3]} failed:\n{' '.join(cmd)}\n{(r.stderr or r.stdout)[-3000:]}")
    target = out_dir / (NAME + sysconfig.get_config_var("EXT_SUFFIX"))
    tmp = target.with_suffix(".tmp")
    link = [compiler, "-shared", "-cudart=static", *(str(obj / f"{Path(c[-3]).stem}.o") for c in jobs), "-o", str(tmp)]
    r = subprocess.run(link, capture_output=True, text=True)
    if r.returncode != 0:
        raise CudaBuildError(f"linking failed:\n{' '.join(link)}\n{(r.stderr or r.stdout)[-3000:]}")
    tmp.replace(target)  # atomic: a reader never sees a half-written module
    return target


def build_into_package() -> Path:
    """The ahead-of-time build (setup.py with HT_KERNELS_CUDA=1): compiled in build/cuda-<hash> (reused
    while the sources are unchanged), then copied into the package, where load() finds it."""
    digest = source_hash()
    work = PACKAGE.parent / "build" / f"cuda-{digest}"
    name = NAME + sysconfig.get_config_var("EXT_SUFFIX")
    if not (work / name).exists():
        build(work, digest)
    for old in PACKAGE.glob(NAME + ".*.so"):
        old.unlink()
    shutil.copy2(work / name, PACKAGE / name)
    return PACKAGE / name


def cache_dir(digest: str | None = None) -> Path:
    root = os.environ.get("HT_KERNELS_CACHE") or Path.home() / ".cache" / "ht_kernels"
    return Path(root) / f"cuda-{digest or source_hash()}"


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(f"ht_kernels.{NAME}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load():
    """The `_C` module: the ahead-of-time build when its sources are current, else the just-in-time one
    (built here on first use). Raises CudaBuildError when it cannot be built (remembered: a process tries
    once)."""
    module, error = _load_once()
    if error is not None:
        raise error
    return module


@functools.cache
def _load_once():
    try:
        return _load(), None
    except CudaBuildError as e:
        return None, e


def _load():
    digest = source_hash()
    aot = sorted(PACKAGE.glob(NAME + ".*.so"))
    if aot:
        module = _import(aot[0])
        if module.source_hash == digest:
            return module
        print(f"ht_kernels: {aot[0].name} was built from other sources; using a just-in-time build", file=sys.stderr)
    from filelock import FileLock

    out = cache_dir(digest)
    out.mkdir(parents=True, exist_ok=True)
    target = out / (NAME + sysconfig.get_config_var("EXT_SUFFIX"))
    with FileLock(str(out / "build.lock")):
        if not target.exists():
            print(f"ht_kernels: building the CUDA kernels into {out} (once; about a minute)", file=sys.stderr)
            build(out, digest)
    return _import(target)
