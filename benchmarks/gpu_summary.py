"""The issue targets from the JSON files of benchmarks/gpu_check.sh, as one short table.

    python benchmarks/gpu_summary.py DIR      # DIR: gpu_check.sh's output folder
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(path: Path, **case) -> dict:
    """{provider: row} of the case with these values in one benchmark JSON (empty when missing)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {r["provider"]: r for r in data["rows"] if all(r.get(k) == v for k, v in case.items())}


def main(folder: str) -> None:
    d = Path(folder)
    big = dict(B=8, L=16384, T=64, Hq=32, Hkv=8, D=128)
    ta = rows(d / "tree_attention.json", **big) or rows(d / "tree_attention_flex.json", **big)
    peers = rows(d / "tree_attention_flex.json", **big)
    wide_case = dict(B=8, L=16384, T=16, Hq=32, Hkv=8, D=128)
    wide = rows(d / "tree_attention.json", **wide_case)
    sm90 = d / "tree_attention_sm90.json"  # HT_KERNELS_CUDA_SM90=1: the Hopper kernel, as provider "cuda"
    ta = {**ta, **{f"{p}-sm90": r for p, r in rows(sm90, **big).items()}}
    wide = {**wide, **{f"{p}-sm90": r for p, r in rows(sm90, **wide_case).items()}}
    small = rows(d / "tree_attention.json", B=1, L=4096, T=64, Hq=32, Hkv=8, D=128)
    ht = rows(d / "hidden_transfer.json", N=64, K=4, D=4096)
    step = rows(d / "step_ops.json", layers=30, B=8, T=64)
    def cell(r, key, fmt):
        text = fmt.format(r[key]) if r and r.get(key) is not None else "-"
        return text + (" (events)" if key == "median_us" and r and r.get("timed") == "events" else "")
    print(f"{'target':<66} {'provider':>8} {'median us':>10} {'measured':>12}  (timed: CUDA-graph replays unless "
          "a row says events)")
    for name, r in ta.items():
        if name in ("triton", "cuda", "cuda-sm90"):
            # Against the peers timed in the same run as this provider (the Hopper kernel's run has none).
            own = peers.get(name, {}).get("median_us")
            vs = "".join(f", {peers[p]['median_us'] / own:.2f}x {p}"
                         for p in ("flashinfer", "flex") if own and peers.get(p, {}).get("median_us"))
            print(f"{'tree_attention B8 L16384 T64 32/8 D128: >=60% roof, 1.5x flashinfer, flex':<66} {name:>8} "
                  f"{cell(r, 'median_us', '{:.1f}'):>10} {cell(r, '% roof', '{:.0f}%')} roof" + vs)
    for name, r in wide.items():
        if name in ("triton", "cuda", "cuda-sm90"):
            print(f"{'tree_attention B8 L16384 T16 32/8 D128: >=80% copy':<66} {name:>8} "
                  f"{cell(r, 'median_us', '{:.1f}'):>10} {cell(r, '% copy', '{:.0f}%')}")
    for name, r in small.items():
        if name in ("triton", "cuda"):
            print(f"{'tree_attention B1 L4096 T64: <= 15 us':<66} {name:>8} {cell(r, 'median_us', '{:.1f}'):>10}")
    for name, r in ht.items():
        if name in ("auto", "triton", "cuda"):
            print(f"{'hidden_transfer rows 64 D4096 K4: >=80% copy':<66} {name:>8} "
                  f"{cell(r, 'median_us', '{:.1f}'):>10} {cell(r, '% copy', '{:.0f}%')}")
    for name, r in step.items():
        print(f"{'verify + compact_kv 30 layers B8 T64: < 20 us':<66} {name:>8} {cell(r, 'median_us', '{:.1f}'):>10}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
