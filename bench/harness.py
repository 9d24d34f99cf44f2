"""Shared benchmark harness: timing, FLOP/byte accounting, peak table, environment header, output.

Every kernel benchmark builds a list of `Case`s (a shape label, FLOPs and bytes of one call, and one
callable per provider), calls `run(...)`, and gets one printed table
    shape | provider | ms (p20-p80) | TFLOP/s | GB/s | % of peak | speedup vs ref-compile
plus optional JSON/CSV. Correctness is checked against the first available reference provider BEFORE
timing. On GPU, timing uses triton.testing.do_bench (CUDA events, L2 flushed); on CPU, perf_counter over
repeated calls. GPU providers on a CPU-only machine are reported as skipped, never silently dropped.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.metadata
import json
import platform
import statistics
import time
from typing import Callable

import torch

from wan_kernels.hardware import PEAKS, gpu_peak  # noqa: F401  (re-exported for the benchmarks)


@dataclasses.dataclass
class Provider:
    name: str
    fn: Callable[[], object]
    gpu_only: bool = False


@dataclasses.dataclass
class Case:
    shape: str
    flops: float              # per call
    bytes: float              # per call, minimum HBM traffic (reads + writes)
    providers: list[Provider]
    peak_kind: str = "bf16"   # which compute peak applies ("bf16" or "fp4")


@dataclasses.dataclass
class Row:
    shape: str
    provider: str
    ms: float | None
    p20: float | None
    p80: float | None
    tflops: float | None
    gbps: float | None
    pct_peak: float | None
    speedup: float | None
    note: str = ""


def time_cpu(fn: Callable[[], object], warmup: int = 1, min_time: float = 0.5, max_reps: int = 50) -> list[float]:
    """Wall-clock ms of repeated calls (at least 3 and `min_time` seconds in all)."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of a list of times."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def time_fn(fn: Callable[[], object], on_gpu: bool) -> tuple[float, float, float]:
    if on_gpu:
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    return quantiles(time_cpu(fn))


def env_header() -> str:
    import wan_kernels

    def v(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    info = wan_kernels.EXTENSION.build_info
    built = f"_C archs {info.get('cuda_archs') or 'CPU only'}" if wan_kernels.EXTENSION.loaded else "_C not built"
    return (f"# device: {dev} | torch {torch.__version__} | triton {v('triton')} | wan-kernels "
            f"{wan_kernels.__version__} ({built}) | python {platform.python_version()}")


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check_close(got, want, atol: float, rtol: float) -> None:
    for g, w in zip(_as_list(got), _as_list(want)):
        if g.dtype in (torch.uint8, torch.float8_e4m3fn):
            assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), "bit patterns differ"
        else:
            torch.testing.assert_close(g.float(), w.float(), atol=atol, rtol=rtol)


def run(cases: list[Case], reference: str = "ref-eager", baseline: str = "ref-compile", atol: float = 2e-2,
        rtol: float = 2e-2) -> list[Row]:
    """Check every provider against `reference`, time it, and return the rows (GPU-only providers are
    reported skipped without a GPU)."""
    on_gpu = torch.cuda.is_available()
    peak = gpu_peak()
    rows: list[Row] = []
    for case in cases:
        runnable = [p for p in case.providers if on_gpu or not p.gpu_only]
        ref_p = next((p for p in runnable if p.name == reference), None)
        want = ref_p.fn() if ref_p is not None else None
        case_rows = []
        for p in case.providers:
            if p.gpu_only and not on_gpu:
                case_rows.append(Row(case.shape, p.name, None, None, None, None, None, None, None,
                                     "skipped: needs a GPU"))
                continue
            if want is not None and p is not ref_p:
                check_close(p.fn(), want, atol, rtol)
            ms, p20, p80 = time_fn(p.fn, on_gpu)
            tflops = case.flops / ms / 1e9 if case.flops else None
            gbps = case.bytes / ms / 1e6 if case.bytes else None
            pct = None
            if peak is not None:
                compute = peak[1].get(case.peak_kind) or peak[1]["bf16"]
                t_min = max(case.flops / (compute * 1e12), case.bytes / (peak[1]["gbps"] * 1e9)) * 1e3
                pct = 100.0 * t_min / ms
            case_rows.append(Row(case.shape, p.name, ms, p20, p80, tflops, gbps, pct, None))
        base = next((r for r in case_rows if r.provider == baseline and r.ms), None)
        for r in case_rows:
            if base is not None and r.ms:
                r.speedup = base.ms / r.ms
        rows += case_rows
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'shape':34s} {'provider':14s} {'ms':>10s} {'p20-p80':>17s} {'TFLOP/s':>8s} {'GB/s':>8s} {'%peak':>6s} {'vs ref-compile':>14s}"
    lines = [head, "-" * len(head)]

    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"

    for r in rows:
        if r.ms is None:
            lines.append(f"{r.shape:34s} {r.provider:14s} {r.note}")
            continue
        band = f"{r.p20:.3f}-{r.p80:.3f}"
        lines.append(f"{r.shape:34s} {r.provider:14s} {r.ms:10.3f} {band:>17s} {f(r.tflops, '8.2f')} "
                     f"{f(r.gbps, '8.1f')} {f(r.pct_peak, '6.1f')} {f(r.speedup, '13.2f')}x")
    return "\n".join(lines)


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", help="write the rows as JSON to this path")
    p.add_argument("--csv", help="write the rows as CSV to this path")
    p.add_argument("--quick", action="store_true", help="smallest shapes only (smoke run)")
    return p


def report(rows: list[Row], args: argparse.Namespace, title: str, notes: list[str] = ()) -> None:
    print(env_header())
    print(f"# {title}")
    for n in notes:
        print(f"# {n}")
    print(format_table(rows))
    data = [dataclasses.asdict(r) for r in rows]
    if getattr(args, "json", None):
        with open(args.json, "w") as fh:
            json.dump({"title": title, "env": env_header(), "rows": data}, fh, indent=1)
    if getattr(args, "csv", None):
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(data[0]) if data else ["shape"])
            w.writeheader()
            w.writerows(data)
