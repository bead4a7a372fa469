"""What the command lines of training share: argument types that name the option in their errors, the
frozen model's arguments and its loading (`refine`, `calibrate`), and one way of reporting errors."""
from __future__ import annotations

import argparse
import errno
import math
import sys
from pathlib import Path

import torch

from ..loading import check_device

MAX_THREADS = 1024


def int_in(lo: int, hi: int | None = None):
    """An argparse type: an int in [lo, hi] (hi None: no upper bound)."""
    def parse(value: str) -> int:
        n = int(value)
        if n < lo or (hi is not None and n > hi):
            raise argparse.ArgumentTypeError(f"must be {f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'}, got {n}")
        return n
    parse.__name__ = "int"  # argparse's "invalid int value" for what int() refuses
    return parse


def float_in(lo: float, hi: float | None = None, *, open_lo: bool = False, open_hi: bool = False):
    """An argparse type: a finite float in [lo, hi] (hi None: no upper bound; open_lo / open_hi exclude the bound)."""
    def parse(value: str) -> float:
        x = float(value)
        too_low = x <= lo if open_lo else x < lo
        too_high = hi is not None and (x >= hi if open_hi else x > hi)
        if not math.isfinite(x) or too_low or too_high:
            bound = f"{'>' if open_lo else '>='} {lo}" if hi is None else \
                f"in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {x}")
        return x
    parse.__name__ = "float"
    return parse


def path_arg(value: str) -> str:
    """An argparse type: a non-empty path."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must be a non-empty path")
    return value


threads_arg = int_in(1, MAX_THREADS)


def device_arg(value: str) -> str:
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:1, ...)."""
    try:
        check_device(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_frozen_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """--maps, --dataset, --out (out_help), --model, --dtype, --device, --threads."""
    p.add_argument("--maps", required=True, type=path_arg, help="trained transfer maps (safetensors)")
    p.add_argument("--dataset", required=True, type=path_arg, help="a dataset of python -m ht_kernels.train.dataset")
    p.add_argument("--out", required=True, type=path_arg, help=out_help)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cpu", type=device_arg)
    p.add_argument("--threads", type=threads_arg)


def load_frozen(args: argparse.Namespace):
    """-> (the frozen model, the maps of --maps, checked against it) after setting --threads."""
    from ..decode.transfer import resolve_transfer
    from ..loading import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    if not Path(args.maps).is_file():
        raise ValueError(f"--maps {args.maps}: no such file")
    weights = resolve_transfer(args.maps, "", model.config.dim, model.config.n_layers)
    bad = [n for n, t in weights.named_tensors().items() if not t.isfinite().all()]
    if bad:
        raise ValueError(f"--maps {args.maps}: its {bad} are not finite")
    return model, weights


def check_out_file(name: str, path: str) -> None:
    """Refuse an output file that cannot be written, before the work that makes it (a file opened to append
    and closed; one that did not exist is removed again)."""
    p = Path(path)
    existed = p.exists()
    try:
        if p.is_dir():
            raise IsADirectoryError(errno.EISDIR, "a directory")
        with open(p, "a"):
            pass
    except OSError as e:
        raise ValueError(f"{name} {path}: cannot write a file there ({e.strerror or e})") from None
    if not existed:
        p.unlink()


def run_main(main, argv=None) -> int:
    """main(argv) -> its exit status (main's int, else 0), with the errors a user can fix (ValueError, OSError,
    ImportError) printed as one line on stderr and exit status 2."""
    try:
        status = main(argv)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0
