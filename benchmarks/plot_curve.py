"""Plot the held-out curves of training runs (OUT/curve.jsonl of python -m ht_kernels.train --dataset):
cross-entropy and top-1 per depth against the training tokens seen.

    python benchmarks/plot_curve.py runs/a runs/b [--labels a,b] --out curve.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ht_kernels.drafts.prompts import jsonl_rows
from ht_kernels.train.cli import check_out_file, run_main


def read(run: str) -> list[dict]:
    path = Path(run) / "curve.jsonl"
    if not path.exists():
        raise ValueError(f"{path} does not exist: train with --dataset to measure a held-out curve")
    rows = []
    for i, row in jsonl_rows(path):
        held = row.get("held_out")
        numbers = all(isinstance(row.get(k), (int, float)) for k in ("tokens", "step", "seconds"))
        if not (numbers and isinstance(held, dict) and all(isinstance(held.get(k), list) and held[k]
                                                             for k in ("ce", "top1"))):
            raise ValueError(f"{path}:{i}: a curve row needs tokens, step, seconds and held_out's ce and top1 lists")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no curve rows yet")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--labels", help="comma-separated names (default: the directories' names)")
    p.add_argument("--out", required=True, help="PNG path")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        p.error(f"--labels names {len(labels)} runs, {len(args.runs)} given")
    check_out_file("--out", args.out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ce, ax_top1) = plt.subplots(1, 2, figsize=(11, 4))
    for run, label, color in zip(args.runs, labels, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4):
        rows = read(run)
        tokens = [r["tokens"] / 1e6 for r in rows]
        K = len(rows[0]["held_out"]["ce"])
        for d, style in zip(range(K), ["-", "--", ":", "-."] * 2):
            name = f"{label} d{d + 1}"
            ax_ce.plot(tokens, [r["held_out"]["ce"][d] for r in rows], style, color=color, label=name)
            ax_top1.plot(tokens, [r["held_out"]["top1"][d] for r in rows], style, color=color, label=name)
        print(f"{label}: {rows[-1]['step']} steps, {rows[-1]['tokens']} tokens, {rows[-1]['seconds']:.0f} s; "
              f"held-out top-1 " + "/".join(f"{x:.3f}" for x in rows[-1]["held_out"]["top1"]))
    ax_ce.set(xlabel="training tokens (M)", ylabel="held-out cross-entropy", title="loss per depth")
    ax_top1.set(xlabel="training tokens (M)", ylabel="held-out top-1", title="accuracy per depth")
    ax_top1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
