"""What the tree-attention kernels' inner loops compile to for a GPU, on a machine without one.

Compiles one kernel, disassembles it (cuobjdump) and prints, for every loop of at least 100 instructions
(a backward branch and its target), its length and how many of the instructions that set the loop's cost
it holds; for the Hopper kernel also how many exponentials run between the wait for S = Q K^T and the wait
for the P V product before it (the softmax overlapping that product).

    python tests/sass_loops.py triton      # Triton, bf16, D 128, 256 packed rows, the sm_90 tiles of TUNED
    python tests/sass_loops.py sm90        # csrc/tree_attention_sm90.cu, bf16, D 128, one split
    python tests/sass_loops.py sm80        # csrc/tree_attention.cu for sm_80, bf16, D 128, one split
Run without TRITON_INTERPRET. Counts are static (both sides of a branch inside a loop count).
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHOWN = ("HGMMA", "HMMA", "MUFU.EX2", "FFMA", "FMUL", "FADD", "FMNMX", "FSETP", "F2FP", "LDGSTS", "UTMALDG",
         "BAR.SYNC", "SHFL")


def triton_cubin() -> tuple[bytes, str]:
    """The cubin of the Triton tree attention's launch for a 7B/8B step (T 64, G 4, D 128, bf16) on sm_90."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    sys.path.insert(0, str(ROOT / "tests"))
    from triton_aot import capture

    from ht_kernels.triton import tree_attention as mod

    config = mod.TUNED[(90, "16-bit", 128, 256)]
    q, kc = torch.zeros(1, 64, 4, 128, dtype=torch.bfloat16), torch.zeros(1, 300, 1, 128, dtype=torch.bfloat16)
    log = capture(mod, lambda: mod.tree_attention_fwd(q, kc, kc.clone(), torch.zeros(1, dtype=torch.int32),
                                                      torch.ones(64, 64, dtype=torch.bool), config=config))
    fn, args, kwargs = log[0]
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return kernel.asm["cubin"], fn.__name__


def cuda_cubin(source: str, arch: str, kernel: str) -> tuple[bytes, str]:
    """The cubin of a csrc/ source built with the extension's flags for one arch."""
    from ht_kernels.cuda import build

    cu, _ = build.flags([arch])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k.cubin"
        subprocess.run([build.nvcc(), *cu, "-cubin", str(ROOT / "csrc" / source), "-o", str(out)], check=True)
        return out.read_bytes(), kernel


def functions(cubin: bytes) -> dict[str, list[str]]:
    """{mangled kernel name: its SASS instructions, in order}, through the cuobjdump Triton ships."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    return {name: re.findall(r"/\*([0-9a-f]{4,5})\*/\s+([^;]*);", body) for name, body in zip(parts[1::2], parts[2::2])}


def report(name: str, sass: list[tuple[str, str]]) -> None:
    ops = [(int(a, 16), op.strip()) for a, op in sass]
    print(f"{name[:100]}: {len(ops)} instructions")
    for addr, op in ops:
        back = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", op)
        if back and int(back.group(1), 16) < addr:
            body = [o for a, o in ops if int(back.group(1), 16) <= a <= addr]
            if len(body) >= 100:
                kinds = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", o).split()[0] for o in body)
                counts = {k: sum(n for kind, n in kinds.items() if kind.startswith(k)) for k in SHOWN}
                print(f"  loop {int(back.group(1), 16):#x}-{addr:#x}: {len(body)} instructions,",
                      ", ".join(f"{k} {n}" for k, n in counts.items() if n))
    waits = [i for i, (_, op) in enumerate(ops) if "DEPBAR.LE gsb0, 0x1" in op]
    if waits:
        end = next(i for i in range(waits[0], len(ops)) if "DEPBAR.LE gsb0, 0x0" in ops[i][1])
        print(f"  exponentials between the wait for S and the wait for P V: "
              f"{sum('MUFU.EX2' in op for _, op in ops[waits[0]:end])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=["triton", "sm90", "sm80"])
    args = parser.parse_args()
    if args.kernel == "triton":
        cubin, want = triton_cubin()
    elif args.kernel == "sm90":
        cubin, want = cuda_cubin("tree_attention_sm90.cu", "90a", "TreeAttentionSm90TraitsILi128E13__nv_bfloat16EELb0E")
    else:
        cubin, want = cuda_cubin("tree_attention.cu", "80", "tree_attention_kernelINS_19TreeAttentionTraitsILi128E13__nv_bfloat16EELb0E")
    for name, sass in functions(cubin).items():
        if want in name:
            report(name, sass)


if __name__ == "__main__":
    main()
