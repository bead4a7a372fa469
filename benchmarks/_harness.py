"""Shared benchmark harness: header line, timing, output checks, table, skip lines and JSON.

A bench script defines its cases, a setup per case and its providers, then calls `run`.
"""
import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

import ht_kernels
from ht_kernels.train.cli import check_out_file, device_arg

# Loose sanity bound on the relative RMS error of each output against the reference provider's.
CHECK_BOUND = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 5e-3}
# Errors that mean "this provider or case cannot run here": reported as skips, not raised.
SKIPS = (ht_kernels.BackendUnavailableError, ImportError, NotImplementedError, torch.cuda.OutOfMemoryError)


class Skip(Exception):
    """A provider or case that cannot run here; the message says why."""


def parse_args(description: str, quick_help: str, extra=None, argv=None) -> argparse.Namespace:
    """The shared options; extra(parser) adds a script's own; argv: as for argparse (None: the command line)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help=quick_help + " (the default without a GPU)")
    p.add_argument("--full", action="store_true", help="the full grid even on a CPU (hours)")
    p.add_argument("--json", metavar="PATH", help="also write the header, rows and skips to PATH as JSON")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda if any")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on CUDA, float32 on CPU (bf16 matmuls can be slow on CPUs)")
    p.add_argument("--providers", help="comma-separated subset to run (the reference always runs)")
    p.add_argument("--case", type=case_arg, help="only the cases with these values, e.g. B=8,L=16384")
    p.add_argument("--timing", choices=["graph", "events"], default="graph",
                   help="CUDA: time replays of a CUDA graph of GRAPH_CALLS calls, the device time alone, as a "
                        "decoding step replays them (default), or each eager call between CUDA events, launch "
                        "overhead included; a provider that cannot be captured is timed with events")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: also list the device time of each kernel a provider launches (torch.profiler)")
    if extra:
        extra(p)
    args = p.parse_args(argv)
    check_outputs(json=args.json)
    args.device = torch.device(args.device)
    if args.device.type == "cpu" and not args.full and not args.quick:
        print("no GPU: running the --quick set (--full runs the whole grid on the CPU)")
        args.quick = True
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    return args


def case_arg(value: str) -> dict[str, str]:
    """--case: comma-separated KEY=VALUE pairs."""
    pairs = [kv.partition("=") for kv in value.split(",")]
    if any(not k or not eq or not v for k, eq, v in pairs):
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE pairs, comma-separated, got {value}")
    return {k: v for k, _, v in pairs}


def check_outputs(**paths: str | None) -> None:
    """Before the work: make the folders of the output files given (name: path, e.g. json=args.json) and
    refuse one that cannot be written there; plot= also needs matplotlib (the `bench` extra)."""
    for name, path in paths.items():
        if path is None:
            continue
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        check_out_file(f"--{name}", path)
        if name == "plot":
            import matplotlib  # noqa: F401 - ImportError: the one-line error names the package


def header(device: torch.device, dtype: torch.dtype) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if os.path.exists("/proc/cpuinfo") else []
    cpu = next((ln.split(":")[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu} CPU, {os.cpu_count()} cores"
    repo = Path(__file__).resolve().parent.parent
    git = lambda *a: subprocess.run(["git", "-C", repo, *a], capture_output=True, text=True)  # noqa: E731
    sha = git("rev-parse", "--short", "HEAD")
    dirty = "-dirty" if git("status", "--porcelain").stdout.strip() else ""
    triton = importlib.util.find_spec("triton") and importlib.metadata.version("triton")
    return {"device": name, "torch": torch.__version__, "triton": triton or "none", "dtype": str(dtype)[6:],
            "git": (sha.stdout.strip() if sha.returncode == 0 else "no-commit") + dirty}


GRAPH_CALLS = 20  # fn() calls per captured CUDA graph (--timing graph)


def time_fn(fn, warmup: float = 25, rep: float = 100, *, device: torch.device,
            graph: bool = False) -> tuple[float, float, float, str]:
    """Median, p20 and p80 of one fn() call in microseconds, and how it was timed: "cpu", "events" or
    "graph". As in triton.testing.do_bench, warmup and rep are budgets in ms (at least 1 and 10 timings).
    CUDA calls are timed with CUDA events; with `graph`, around replays of a CUDA graph of GRAPH_CALLS
    calls (the device time without launch overhead), unless fn cannot be captured."""
    cuda = device.type == "cuda"
    replay = _captured(fn, GRAPH_CALLS) if cuda and graph else None
    if replay is not None:
        median, p20, p80, _ = time_fn(replay, warmup, rep, device=device)
        return median / GRAPH_CALLS, p20 / GRAPH_CALLS, p80 / GRAPH_CALLS, "graph"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    sync()
    est_ms = max((time.perf_counter() - t0) / 3 * 1e3, 1e-3)
    for _ in range(max(1, round(warmup / est_ms))):
        fn()
    n = max(10, round(rep / est_ms))
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync()
        us = [start.elapsed_time(end) * 1e3 for start, end in events]
    else:
        us = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            us.append((time.perf_counter() - t0) * 1e6)
    deciles = statistics.quantiles(us, n=10)
    return statistics.median(us), deciles[1], deciles[7], "events" if cuda else "cpu"


def profile_kernels(fn, calls: int = 20) -> list[tuple[str, float]]:
    """(kernel name, device microseconds per call) of every kernel that one fn() call launches on CUDA,
    the longest first, from torch.profiler over `calls` eager calls after one untimed call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            totals[e.name] = totals.get(e.name, 0.0) + e.time_range.elapsed_us() / calls
    return sorted(totals.items(), key=lambda kv: -kv[1])


def _captured(fn, calls: int):
    """graph.replay of a CUDA graph holding `calls` calls of fn (warmed up on the capture stream first, as
    capture requires), or None when fn cannot be captured (host syncs, CPU work between kernels). The
    capture is begun and ended by hand so that a failed one still leaves its stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
            stream.synchronize()
            graph.capture_begin()
            try:
                for _ in range(calls):
                    fn()
            finally:
                graph.capture_end()
    except Exception:  # noqa: BLE001 - whatever breaks the capture, fn is then timed eagerly
        torch.cuda.synchronize()
        return None
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay


def copy_gb_per_s(device: torch.device) -> float:
    """Bytes read + written per second by a 512 MiB device-to-device copy: the bandwidth targets' yardstick."""
    src = torch.empty(2**29, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    gbs = 2 * src.numel() / time_fn(lambda: dst.copy_(src), device=device)[0] / 1e3
    print(f"device-to-device copy: {gbs:.0f} GB/s (bytes read + written)")
    return gbs


# Dense (no sparsity) 16-bit tensor-core peaks from the vendors' data sheets, TFLOP/s, by device name.
DENSE_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "H800": 989.0,
                     "GH200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0}


def dense_peak_tflops(device: torch.device) -> float:
    """The card's dense bf16 peak: the data-sheet figure for known names (the longest matching key), else
    the rate of an 8192^3 bf16 matmul measured here (printed, so a table says which it used)."""
    name = torch.cuda.get_device_name(device)
    known = [k for k in DENSE_PEAK_TFLOPS if k in name]
    if known:
        return DENSE_PEAK_TFLOPS[max(known, key=len)]
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    tflops = 2 * 8192**3 / time_fn(lambda: a @ a, device=device)[0] / 1e6
    print(f"{name}: no data-sheet peak known, measured bf16 matmul {tflops:.0f} TFLOP/s used as the peak")
    return tflops


def run(args, cases: list[dict], setup, providers: dict, *, reference: str, baseline: str, metrics: dict) -> list:
    """Checks and times every provider on every case; prints the table, then the skips; maybe JSON.

    setup(case) -> inputs, or raises Skip. providers: {name: make(inputs) -> fn}, fn() -> output; make
    or the first call raise Skip (or one of SKIPS) when the provider cannot run. Outputs are checked
    against `reference`'s, the ratio column is baseline time / provider time, and metrics maps extra
    columns to f(case, median_us). Returns the rows (one dict per case and provider).
    """
    if args.providers:
        want = args.providers.split(",")
        if set(want) - set(providers):
            raise ValueError(f"--providers {args.providers}: the providers are {','.join(providers)}")
        providers = {k: v for k, v in providers.items() if k in want or k == reference}
    if args.case:
        cases = [c for c in cases if all(str(c.get(k)) == v for k, v in args.case.items())]
        if not cases:
            raise ValueError(f"--case {','.join(f'{k}={v}' for k, v in args.case.items())}: no case has these values")
    head = header(args.device, args.dtype)
    print("  ".join(f"{k}: {v}" for k, v in head.items()))
    columns = [*cases[0], "provider", "median us", "p20-p80 us", "timed", *metrics, f"x {baseline}"]
    widths = [max(len(k), *(len(str(c[k])) for c in cases)) for k in cases[0]]
    widths += [max(8, *map(len, providers)), 10, 19, 6, *(max(9, len(m)) for m in metrics), 9]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(line(columns), line("-" * w for w in widths), sep="\n", flush=True)
    rows, case_skips, provider_skips = [], [], {}
    for case in cases:
        try:
            results = _run_case(args, case, setup(case), providers, reference, provider_skips)
        except (Skip, *SKIPS) as e:
            case_skips.append({"case": case, "reason": _reason(e)})
            continue
        base = results.get(baseline, {}).get("median_us")
        for name, r in results.items():
            if r["status"] == "ok":
                r.update({m: f(case, r["median_us"]) for m, f in metrics.items()},
                         ratio=base / r["median_us"] if base else None)
                cells = [f"{r['median_us']:.1f}", f"{r['p20_us']:.1f}-{r['p80_us']:.1f}", r["timed"],
                         *(f"{r[m]:.4g}" for m in metrics), f"{r['ratio']:.2f}x" if base else "-"]
            else:
                cells = [f"MISMATCH (rel rms {r['rel_rms'] or float('nan'):.2g})"]
            print(line([*case.values(), name, *cells]), flush=True)
            for kernel, us in r.get("kernels", []):
                print(f"{'':>12}{us:10.1f} us  {kernel[:100]}")
            rows.append({**case, "provider": name, **r})
    for s in case_skips:
        print(f"skipped: case {' '.join(f'{k}={v}' for k, v in s['case'].items())} ({s['reason']})")
    n_run = len(cases) - len(case_skips)
    for (name, reason), n in provider_skips.items():
        print(f"skipped: {name} ({reason})" + (f" in {n} of {n_run} cases" if n != n_run else ""))
    if args.json:
        skips = [{"provider": p, "reason": r, "cases": n} for (p, r), n in provider_skips.items()]
        Path(args.json).write_text(json.dumps(
            {"header": head, "rows": rows, "skipped_cases": case_skips, "skipped_providers": skips}, indent=1))
    return rows


def _run_case(args, case, inputs, providers, reference, provider_skips) -> dict:
    results, ref = {}, None
    for name in [reference, *(p for p in providers if p != reference)]:
        try:
            fn = providers[name](inputs)
            out = fn()
        except Exception as e:  # reported with the skips: one failing provider must not end the run
            reason = _reason(e) if isinstance(e, (Skip, *SKIPS)) else f"FAILED: {type(e).__name__}: {_reason(e)}"
            if name == reference:
                raise Skip(f"the reference {name} cannot run: {reason}") from e
            provider_skips[(name, reason)] = provider_skips.get((name, reason), 0) + 1
            continue
        ref = out if name == reference else ref
        err = ((out.float() - ref.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt()).item()
        if not err < CHECK_BOUND[args.dtype]:  # NaN fails too
            results[name] = {"status": "MISMATCH", "rel_rms": err if math.isfinite(err) else None}
            continue
        median, p20, p80, timed = time_fn(fn, device=args.device, graph=args.timing == "graph")
        results[name] = {"status": "ok", "rel_rms": err, "median_us": median, "p20_us": p20, "p80_us": p80,
                         "timed": timed}
        if args.profile and args.device.type == "cuda":
            results[name]["kernels"] = profile_kernels(fn)
    return {name: results[name] for name in providers if name in results}  # in the providers' order


def _reason(e: Exception) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0][:160]
