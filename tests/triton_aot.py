"""Compile the Triton kernels for NVIDIA GPUs on a machine without one.

The launchers run on small CPU tensors with their kernels swapped for recorders, so every launch is
captured with the exact arguments, constexprs and options the launcher would use; each is then compiled
ahead of time for the chosen architecture and its cubin's resource usage is read with cuobjdump.
Run without TRITON_INTERPRET (the interpreter replaces @triton.jit kernels by Python functions).

    python tests/triton_aot.py --arch 90    # one JSON line per compiled launch
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature


class _Recorder:
    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.fn, args, kwargs))


def capture(module, launch) -> list:
    """Run `launch()` with every Triton kernel of `module` recorded instead of launched."""
    log = []
    kernels = {n: f for n, f in vars(module).items() if isinstance(f, triton.runtime.jit.JITFunction)}
    for name, fn in kernels.items():
        setattr(module, name, _Recorder(fn, log))
    try:
        launch()
    finally:
        for name, fn in kernels.items():
            setattr(module, name, fn)
    return log


def compile_launch(fn, args, kwargs, arch: int) -> dict:
    """Compile one recorded launch for sm_<arch>; registers, spill stack and shared memory of the cubin."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    res = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    consts = {k: v for k, v in kwargs.items() if k.isupper()}
    return dict(kernel=fn.__name__, arch=arch, regs=int(res["REG"]), stack=int(res["STACK"]),
                local=int(res["LOCAL"]), shared=kernel.metadata.shared, num_warps=kernel.metadata.num_warps,
                wgmma="wgmma.mma_async" in kernel.asm["ptx"], dtype=str(kernel.src.signature.get("Q")),
                config=consts)


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def tree_attention_launches() -> list:
    """Launches of tree attention over the dtypes, head dims, GQA packings and split modes it serves."""
    from ht_kernels.triton import tree_attention as mod

    log = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for D, T, G, splits, with_kv in ((128, 64, 4, 1, True), (128, 16, 1, 4, False), (80, 5, 3, 1, True),
                                         (64, 130, 1, 2, True), (256, 8, 8, 1, False)):
            B, Hkv, S = 1, 1, 300
            q = torch.zeros(B, T, G * Hkv, D, dtype=dtype)
            kc = torch.zeros(B, S, Hkv, D, dtype=dtype)
            kv = torch.zeros(B, T, Hkv, D, dtype=dtype) if with_kv else None
            lens = torch.zeros(B, dtype=torch.int32)
            mask = torch.ones(T, T, dtype=torch.bool)
            log += capture(mod, lambda: mod.tree_attention_fwd(q, kc, kc.clone(), lens, mask, kv, kv,
                                                               num_splits=splits))
    for dtype, config, with_kv in itertools.product((torch.float16, torch.bfloat16), mod.TUNE_CANDIDATES,
                                                    (True, False)):  # the tuner's tiles, as on a 7B/8B step
        q, kc = torch.zeros(1, 64, 4, 128, dtype=dtype), torch.zeros(1, 300, 1, 128, dtype=dtype)
        kv = torch.zeros(1, 64, 1, 128, dtype=dtype) if with_kv else None
        log += capture(mod, lambda: mod.tree_attention_fwd(q, kc, kc.clone(), torch.zeros(1, dtype=torch.int32),
                                                           torch.ones(64, 64, dtype=torch.bool), kv, kv, config=config))
    for (_, dtype_name, D, rows), config in mod.TUNED.items():  # the measured entries, at their row buckets
        dtype, G = torch.float32 if dtype_name == "float32" else torch.bfloat16, 4
        q, kc = torch.zeros(1, rows // G, G, D, dtype=dtype), torch.zeros(1, 300, 1, D, dtype=dtype)
        log += capture(mod, lambda: mod.tree_attention_fwd(q, kc, kc.clone(), torch.zeros(1, dtype=torch.int32),
                                                           torch.ones(rows // G, rows // G, dtype=torch.bool),
                                                           config=config))
    for dtype, (D, T, G, splits, with_kv) in itertools.product(  # paged caches: 16 blocks of 64 positions
            (torch.float16, torch.bfloat16), ((128, 64, 4, 1, True), (128, 16, 1, 4, False), (64, 130, 1, 2, True))):
        q, kc = torch.zeros(1, T, G, D, dtype=dtype), torch.zeros(16, 64, 1, D, dtype=dtype)
        kv = torch.zeros(1, T, 1, D, dtype=dtype) if with_kv else None
        table = torch.arange(16, dtype=torch.int32)[None]
        log += capture(mod, lambda: mod.tree_attention_fwd(q, kc, kc.clone(), torch.zeros(1, dtype=torch.int32),
                                                           torch.ones(T, T, dtype=torch.bool), kv, kv,
                                                           num_splits=splits, block_table=table))
    return log


def hidden_transfer_launches() -> list:
    from ht_kernels.triton import hidden_transfer as mod

    log = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for N, D in ((1, 576), (256, 4096)):
            h, w, b = torch.zeros(N, D, dtype=dtype), torch.zeros(3, D, D, dtype=dtype), torch.zeros(3, D, dtype=dtype)
            log += capture(mod, lambda: mod.hidden_transfer_fwd(h, w, b, torch.zeros(N, 3, D, dtype=dtype)))
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("triton_aot.py: unset TRITON_INTERPRET; interpreted kernels cannot be compiled")
    seen = set()
    for fn, a, kw in tree_attention_launches() + hidden_transfer_launches():
        key = (fn.__name__, tuple(sorted((k, str(v)) for k, v in kw.items())), tuple(str(x.dtype) for x in a
                                                                                    if hasattr(x, "dtype")))
        if key not in seen:
            seen.add(key)
            print(json.dumps(compile_launch(fn, a, kw, args.arch)), flush=True)


if __name__ == "__main__":
    main()
