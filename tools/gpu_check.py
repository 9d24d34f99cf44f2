"""`python -m tools.gpu_check OUTDIR`: the whole GPU truth of this package from one command.

Made for the GPU machines we can borrow: bare (torch + triton + nvcc, no package registry), minutes long.
  1. build    `_C` in place for the local arch only (a child `setup.py build_ext --inplace`, then this
              script re-executes itself so that the fresh extension is the one imported)
  2. ops      every public op x backend (auto, cuda, triton, ref) x dtype (fp32, fp16, bf16) on the GPU
              against the reference on the same inputs (the bf16 paths the CPU interpreter never runs)
     attention_accuracy  today's attention kernel and attention_ws (not yet routed) vs the fp64 reference with
              the 2x-SDPA rule of the tests, tails, I2V, packed views, LSE: the sharp check before any timing
  3. big_gemm the Wan-14B 720p CFG `to_qkv` W4A16 GEMM at M = 151,200 (offsets past 2^31), slices checked
  4. model    tiny random models (T2V, I2V) and a 1.3B-shaped 2-layer model, impl="auto" vs "ref";
              torch.compile(fullgraph=True); CUDA graph capture + replay of a denoising step
  5. bench_*  attention TFLOP/s at Wan-14B self-attention over 17k / 33k / 76k tokens: today's kernel ("wan"),
              the TMA / warp-specialised path ("wan-ws", attention_ws, checked against "wan" first) vs SDPA's
              flash and cuDNN backends, also 1.3B self, T2V cross and I2V (one launch, both paths, vs two
              calls), attention_ws's SWEEP tiles; then the verdict on routing attention_ws (`ws_verdict`:
              accurate and never slower than "wan"); qk_norm_rope / modulate / residual GB/s vs
              HBM peak; W4A16 GEMM vs bf16 cuBLAS, W4A4 CUTLASS (sm_100); one CFG step of 1.3B and 14B at
              480p vs the cost model, peak memory
Sections run in SECTIONS' order: build, ops, attention_accuracy, bench_attention (issue 17's open question
first), big_gemm, model, bench_memory, bench_gemm, model_step.
Every case is one row appended (and flushed) to OUTDIR/results.jsonl as it finishes; OUTDIR/summary.md is
rewritten after each section; OUTDIR/env.json and OUTDIR/build.log complete the set (4 files). Each section has
a time box: once spent, its remaining cases are recorded as "timeout" and the next section starts; the whole
run has one too (`--deadline-s`, build included, default DEADLINE_S), so a run cut short still returns
everything measured so far and a command limit a minute above the deadline never kills it mid-case.

`--dry-run` (any machine) walks every section and records what each case would do, running nothing;
`--device cpu` runs the sections that make sense on CPU tensors at their toy sizes (the test suite uses both,
so the script cannot rot without a GPU).

Verdict (`verdict`: the first line of summary.md after the title, the last line printed, the exit status):
  FAIL        (exit 1) a case failed or errored: a wrong result, an exception, a section that could not list its
              cases, a build that failed, or (on CUDA) a `_C` that does not load after the build
  INCOMPLETE  (exit 3) none failed, but a selected case did not run for want of time: its section's time box or
              `--deadline-s` was spent ("timeout"), or the build timed out; also a summary written before the
              run finished (a run cut off keeps that verdict)
  NOTHING RAN (exit 3) none failed or timed out, but no case ran (every selected case skipped)
  PASS        (exit 0) every selected case ran ("ok") or was skipped for a stated reason, none failed, none
              left unrun, at least one ran
  DRY RUN     (exit 0 unless a section cannot list its cases) `--dry-run`: the plan only, never a pass
A skip is allowed, listed with its reason: the case cannot apply to this device (a CUDA case under
`--device cpu`, a backend or feature the arch lacks: routing's `unavailable_reason`), so it is no missing
evidence; a timeout is. An empty `--sections` is a usage error (exit 2), as are an OUTDIR that cannot be
created or written and one that holds a previous run's results.jsonl (unless `--overwrite`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

import wan_kernels
from wan_kernels import routing, samples
from wan_kernels.hardware import gpu_peak
from wan_kernels.testing import TOLERANCE, fp32_rounding_floor, sdpa_per_set

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# |backend - ref| <= atol + rtol * |ref| (wan_kernels/testing.py's TOLERANCE), both computed from the same inputs.
# NVFP4 codes and scales are compared as bytes.
# Tokens per sample of Wan at 81 frames (patched latent grids 21 x 30 x 52 and 21 x 45 x 80).
TOKENS = {"480p": 32760, "720p": 75600}
# Self-attention benchmark lengths: 480p at 41 frames (11 x 30 x 52), then 81 frames at 480p and 720p (issue 17
# asks for 16k-76k tokens).
ATTENTION_SHAPES = {"480p-41f": 17160, **TOKENS}
SIZES = {"480p": (832, 480), "720p": (1280, 720)}


@dataclasses.dataclass
class Case:
    name: str
    run: Callable[[], dict]      # returns the row's fields; {"status": "fail", ...} on a wrong result
    plan: str                    # what it does, for --dry-run and the summary
    needs_cuda: bool = True
    always: bool = False         # runs even once the section's time box is spent (cheap summaries of its rows)


@dataclasses.dataclass
class Section:
    name: str
    budget_s: float
    cases: Callable[["Check"], list[Case]]


class Check:
    """Run state: device, output files, time boxes."""

    def __init__(self, outdir: Path, device: str, dry_run: bool, deadline: float | None = None):
        self.outdir, self.dry_run = outdir, dry_run
        self.deadline = deadline     # time.time() past which no case starts (the run's whole budget), None: none
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        present = not self.on_cuda or torch.cuda.is_available()
        self.device_name = _device_name(self.device) if present else "cuda (none present: dry run)"
        path = outdir / "results.jsonl"
        self.rows: list[dict] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        self._results = open(path, "a")
        self.finished = False        # set by main once every selected section ran: until then no verdict is final

    def record(self, section: str, case: str, **fields) -> dict:
        row = {"section": section, "case": case, **fields}
        self.rows.append(row)
        self._results.write(json.dumps(row, default=str) + "\n")
        self._results.flush()
        os.fsync(self._results.fileno())
        status = row.get("status", "")
        detail = " ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("section", "case", "status"))
        print(f"[{section}] {case}: {status} {detail}", flush=True)
        return row

    def run_section(self, section: Section) -> None:
        start = time.monotonic()
        try:
            cases = section.cases(self)
        except Exception as e:  # a section that cannot even list its cases is a result too
            self.record(section.name, "(setup)", status="error", error=_last_line(e))
            return
        for case in cases:
            if self.dry_run:
                self.record(section.name, case.name, status="dry-run", plan=case.plan)
                continue
            if case.needs_cuda and not self.on_cuda:
                self.record(section.name, case.name, status="skip", reason="needs a CUDA device")
                continue
            if time.monotonic() - start > section.budget_s and not case.always:
                self.record(section.name, case.name, status="timeout", budget_s=section.budget_s)
                continue
            if self.deadline is not None and time.time() > self.deadline and not case.always:
                self.record(section.name, case.name, status="timeout", reason="the run's --deadline-s is spent")
                continue
            t0 = time.monotonic()
            try:
                fields = case.run()
            except routing.BackendUnavailableError as e:
                fields = {"status": "skip", "reason": str(e)}
            except Exception as e:
                fields = {"status": "error", "error": _last_line(e), "where": _where(e)}
            finally:
                if self.on_cuda:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
            fields.setdefault("status", "ok")
            self.record(section.name, case.name, **fields, wall_s=round(time.monotonic() - t0, 3))
        self.write_summary()

    def write_summary(self) -> None:
        word, code, why = verdict(self.rows, self.dry_run, self.finished)
        lines = ["# wan-kernels GPU check", "", f"verdict: {word} (exit {code}): {why}", "", f"rule: {RULE}", "",
                 f"device: {self.device_name}", ""]
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        lines += ["totals: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), ""]
        section = None
        for r in self.rows:
            if r["section"] != section:
                section = r["section"]
                lines += ["", f"## {section}", "", "| case | status | figures |", "|---|---|---|"]
            figures = ", ".join(f"{k} {_fmt(v)}" for k, v in r.items() if k not in ("section", "case", "status"))
            lines.append(f"| {r['case']} | {r['status']} | {figures} |")
        tmp = self.outdir / ".summary.md.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.outdir / "summary.md")


RULE = ("PASS = every selected case ran or was skipped for its stated reason, none failed, at least one ran; "
        "a failed build (or, on CUDA, a _C that does not load) is a FAIL; a timeout (section time box, --deadline-s, "
        "the build) makes the run INCOMPLETE; a dry run is never a pass")


def verdict(rows: list[dict], dry_run: bool = False, finished: bool = True) -> tuple[str, int, str]:
    """(verdict, exit status, why) of a run from its rows, by the rule of the module docstring (a pure function:
    tests/test_gpu_check.py runs it on made-up rows). Build rows count: a failed build is a failure, a build
    that timed out leaves the run incomplete."""
    def names(rs):
        return ", ".join(f"{r['section']}/{r['case']}" for r in rs[:3]) + (f", ... ({len(rs)} in all)"
                                                                          if len(rs) > 3 else "")
    failed = [r for r in rows if r.get("status") in ("fail", "error")]
    unrun = [r for r in rows if r.get("status") == "timeout"]
    ran = [r for r in rows if r.get("status") == "ok" and r.get("section") != "build"]
    skipped = sum(r.get("status") == "skip" for r in rows)
    if failed:
        return "FAIL", 1, f"{len(failed)} case(s) failed or errored: {names(failed)}" + (
            f"; {len(unrun)} did not run (timeout)" if unrun else "")
    if dry_run:
        return "DRY RUN", 0, f"nothing ran: {len(rows)} cases planned (not a pass)"
    if not finished:
        return "INCOMPLETE", 3, "the run has not finished (a summary of the sections so far, or a run cut off)"
    if unrun:
        return "INCOMPLETE", 3, f"{len(unrun)} selected case(s) did not run (timeout: section time box, " \
                                f"--deadline-s or the build): {names(unrun)}"
    if not ran:
        return "NOTHING RAN", 3, f"no case ran ({skipped} skipped, none ok)"
    return "PASS", 0, f"{len(ran)} case(s) ran ok, {skipped} skipped with their reasons (listed below)"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _last_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:400] if text else type(e).__name__


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    return f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    cap = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]})"


def _sync(check: Check) -> None:
    if check.on_cuda:
        torch.cuda.synchronize()


def _time_ms(check: Check, fn: Callable[[], object], reps: int = 10) -> float:
    """Median ms of `fn` (triton's do_bench on CUDA: CUDA events, L2 flushed; perf_counter on CPU)."""
    if check.on_cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=3, rep=max(reps * 5, 25), return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _error(got, want) -> tuple[float, bool]:
    """(max abs error or mismatching bytes, within TOLERANCE) over tensors / tuples of tensors."""
    if isinstance(got, (tuple, list)):
        errs = [_error(g, w) for g, w in zip(got, want)]
        return max(e for e, _ in errs), all(ok for _, ok in errs)
    if got.dtype in (torch.uint8, torch.int8, torch.float8_e4m3fn):  # codes: mismatching bytes
        bad = float((got.view(torch.uint8) != want.view(torch.uint8)).sum())
        return bad, bad == 0
    atol, rtol = TOLERANCE[got.dtype].atol, TOLERANCE[got.dtype].rtol
    g, w = got.float(), want.float()
    both_nan = g.isnan() & w.isnan()
    err = (g - w).abs().masked_fill(both_nan, 0)
    return float(err.max()), bool((err <= atol + rtol * w.abs()).all())


# ---------------------------------------------------------------------------------------------
# Sections

def _local_arch() -> str:
    """WAN_CUDA_ARCHS for this GPU: the arch-specific `a` target where we have one (sm_90a, sm_100a)."""
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}" + ("a" if (major, minor) in ((9, 0), (10, 0)) else "")


def build(outdir: Path, timeout_s: float) -> dict:
    """Build `_C` in place for the local arch (child process, log in build.log)."""
    env = dict(os.environ, WAN_CUDA_ARCHS=_local_arch(), WAN_BUILD_JOBS=str(os.cpu_count() or 4),
               WAN_NVCC_THREADS="1")
    cmd = [sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"]
    t0 = time.monotonic()
    with open(outdir / "build.log", "w") as log:
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
            status = "ok" if r.returncode == 0 else "error"
        except subprocess.TimeoutExpired:
            status = "timeout"
    return {"status": status, "archs": env["WAN_CUDA_ARCHS"], "wall_s": round(time.monotonic() - t0, 1)}


def env_fields(check: Check) -> dict:
    info = wan_kernels.EXTENSION.build_info
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": _version("triton"), "device": check.device_name,
           "extension": "loaded" if wan_kernels.EXTENSION.loaded else f"missing ({wan_kernels.EXTENSION.error})",
           "cuda_archs": info.get("cuda_archs"), "ext_torch": info.get("torch_version"),
           "routes": routing.route_table()}
    if check.on_cuda and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(check.device)
        out |= {"sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
                "peak": gpu_peak()}
    return out


def _version(pkg: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def ops_cases(check: Check) -> list[Case]:
    """Every public op x backend x dtype vs the reference on the same inputs, on the check's device."""
    impls = ("auto", "cuda", "triton", "ref") if check.on_cuda else ("auto", "cpu", "ref")
    cases = []
    for dname, dtype in DTYPES.items():
        for op in routing.public_ops():
            for impl in impls[:-1]:
                def run(op=op, impl=impl, dtype=dtype):
                    reason = None if impl == "auto" else routing.unavailable_reason(op, impl, check.device)
                    if reason is not None:
                        return {"status": "skip", "reason": reason}
                    args = samples.op_inputs(dtype, check.device)[op]
                    with torch.no_grad():
                        want = routing.resolve(op, "ref", check.device)(*args)
                        got = routing.resolve(op, impl, check.device)(*args)
                    err, ok = _error(got, want)
                    return {"status": "ok" if ok else "fail", "max_err": err}
                cases.append(Case(f"{op} {impl} {dname}", run, f"wan::{op} impl={impl} {dname} vs ref",
                                  needs_cuda=False))
    return cases


# (B, Sq, Sk, Si, H, D, packed): query and key tails (no length a multiple of 64 or 128), Wan's I2V cross shape
# (512 text + 257 image keys), a long key loop (33 tiles of 128), head_dim 64, and q / k / v as strided views of
# one [B, S, 3, H, D] tensor (the model's layout). Small enough for an fp64 reference on the GPU.
ACCURACY_SHAPES = [(1, 300, 512, 257, 2, 128, False), (2, 1000, 1100, 0, 2, 128, False),
                   (1, 4097, 4097, 0, 4, 128, False), (1, 129, 77, 0, 3, 64, False), (2, 777, 777, 0, 2, 128, True)]


def attention_accuracy_cases(check: Check) -> list[Case]:
    """Today's attention kernel ("wan") and attention_ws ("wan-ws") on the GPU against the fp64 reference with
    the rule of tests/test_attention.py: max error <= 2 x that of SDPA at the inputs' precision (I2V: two SDPA
    calls summed) + one fp32 rounding of the scores (`fp32_rounding_floor`). The sharp check before any timing: the
    benchmarks' big shapes only compare the two kernels with each other. attention_ws's fp32 log-sum-exp too
    (its rule: 2 x today's kernel's error vs fp64 + 16 fp32 ulps, both fp32 statistics of the same scores)."""
    from wan_kernels import ref
    from wan_kernels.triton import attention as fa2
    from wan_kernels.triton import attention_ws

    def run_case(shape, provider, dtype):
        def run():
            B, Sq, Sk, Si, H, D, packed = shape
            g = torch.Generator(device=check.device).manual_seed(Sq + Sk)
            r = lambda *sh: torch.randn(*sh, device=check.device, generator=g).to(dtype)  # noqa: E731
            if packed:
                q, k, v = r(B, Sq, 3, H, D).unbind(2)
            else:
                q, k, v = r(B, Sq, H, D), r(B, Sk, H, D), r(B, Sk, H, D)
            ki, vi = (r(B, Si, H, D), r(B, Si, H, D)) if Si else (None, None)
            inputs = (q, k, v, ki, vi)
            if provider == "wan-ws" and not attention_ws.supports(*inputs):
                return {"status": "skip", "reason": "attention_ws does not serve this device"}
            want = ref.attention(*(None if t is None else t.double() for t in inputs))
            launcher = attention_ws if provider == "wan-ws" else fa2
            got, lse, lse_img = launcher.attention_with_lse(*inputs)
            err = float((got.double() - want).abs().max())
            err_sdpa = float((sdpa_per_set(*inputs).double() - want).abs().max())
            floor = fp32_rounding_floor(*inputs)
            row = {"max_err": err, "sdpa_err": err_sdpa, "floor": floor, "ok_out": err <= 2 * err_sdpa + floor}
            if provider == "wan-ws":
                _, lse_fa2, lse_img_fa2 = fa2.attention_with_lse(*inputs)
                s = 1.0 / D ** 0.5
                for name, kk, mine, today in (("lse", k, lse, lse_fa2), ("lse_img", ki, lse_img, lse_img_fa2)):
                    if kk is None:
                        continue
                    exact = torch.logsumexp(s * torch.einsum("bqhd,bkhd->bhqk", q.double(), kk.double()), -1)
                    e, e_today = (float((t.double() - exact).abs().max()) for t in (mine, today))
                    row[f"{name}_err"], row[f"{name}_err_today"] = e, e_today
                    # + 16 fp32 ulps of the largest |lse|: the two kernels sum the same fp32 terms in different
                    # orders (tiles of 128 vs 64 keys); a lost key tile costs >= log(1 + 1/33) ~ 3e-2 here
                    row[f"ok_{name}"] = e <= 2 * e_today + 16 * 2.0**-23 * float(exact.abs().max())
            row["status"] = "ok" if all(v for k_, v in row.items() if k_.startswith("ok_")) else "fail"
            return row
        return run

    cases = []
    for shape in ACCURACY_SHAPES:
        B, Sq, Sk, Si, H, D, packed = shape
        label = f"B{B} q{Sq} k{Sk}{f'+i{Si}' if Si else ''} H{H} d{D}{' packed' if packed else ''}"
        for provider in ("wan", "wan-ws"):
            for name in ("bf16", "fp16"):
                cases.append(Case(f"{provider} {label} {name}", run_case(shape, provider, DTYPES[name]),
                                  f"{provider} vs fp64 (2x SDPA rule)"))
    return cases


def big_gemm_cases(check: Check) -> list[Case]:
    """The 14B 720p CFG fused to_qkv W4A16 GEMM: M = 2 x 75,600 rows, N = 3 x 5120, K = 5120; the output's
    flat offsets reach 2.32e9 > 2^31. First, middle and last 64 rows checked against the reference."""
    M, N, K = 2 * TOKENS["720p"], 3 * 5120, 5120

    def run():
        g = torch.Generator(device=check.device).manual_seed(0)
        w = torch.randn(N, K, device=check.device, generator=g) * K ** -0.5
        gw = wan_kernels.nvfp4.global_scale(w)
        wp, ws = wan_kernels.nvfp4_quantize(w, gw, impl="ref")
        del w
        x = torch.randn(M, K, device=check.device, dtype=torch.bfloat16, generator=g)
        out = wan_kernels.nvfp4_linear(x, wp, ws, gw)
        worst, ok = 0.0, True
        for r0 in (0, M // 2, M - 64):
            want = wan_kernels.nvfp4_linear(x[r0:r0 + 64], wp, ws, gw, impl="ref")
            err, good = _error(out[r0:r0 + 64], want)
            worst, ok = max(worst, err), ok and good
        return {"status": "ok" if ok else "fail", "max_err": worst, "M": M, "N": N, "K": K,
                "ms": _time_ms(check, lambda: wan_kernels.nvfp4_linear(x, wp, ws, gw), reps=3)}

    return [Case("to_qkv W4A16 M=151200", run, f"nvfp4_linear [{M}, {K}] x [{N}, {K}] bf16, 3 slices vs ref")]


def model_cases(check: Check) -> list[Case]:
    from wan_model.core.config import WanConfig
    from wan_model.testing import make_inputs, random_model

    def compare(preset: str, dtype, layers: int | None = None, grid=(2, 6, 10)):
        def run():
            cfg = WanConfig.from_preset(preset)
            if layers is not None:
                cfg = cfg.replace(num_layers=layers)
            model = random_model(cfg).to(check.device)
            model.to_dtype(dtype)
            x, t, text, img = make_inputs(cfg, dtype, grid=grid, device=check.device)
            with torch.no_grad():
                want = model.set_impl("ref")(x, t, text, img).float()
                got = model.set_impl("auto")(x, t, text, img).float()
            err = float((got - want).abs().max())
            rel = err / float(want.abs().max())
            # relative to max |ref| over one forward: fp32 differs only in accumulation order (seen ~5e-7);
            # in bf16/fp16 the fused ops round once where the reference rounds per op, a few output ulps
            # (bf16 ulp 2^-8 = 3.9e-3: 2e-2 is ~5 ulps; tiny-i2v measured 4.1e-3 on CPU)
            limit = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
            return {"status": "ok" if rel <= limit else "fail", "max_err": err, "rel_err": rel, "limit": limit}
        return run

    def compiled():
        cfg = WanConfig.from_preset("tiny-t2v")
        model = random_model(cfg).to(check.device).set_impl("auto")
        x, t, text, _ = make_inputs(cfg, torch.float32, device=check.device)
        with torch.no_grad():
            want = model(x, t, text)
            got = torch.compile(model, fullgraph=True)(x, t, text)
        err = float((got - want).abs().max())
        return {"status": "ok" if err <= 1e-4 else "fail", "max_err": err}

    def cuda_graph():
        cfg = WanConfig.from_preset("tiny-i2v")
        model = random_model(cfg).to(check.device).set_impl("auto")
        model.to_dtype(torch.bfloat16)
        x, t, text, img = make_inputs(cfg, torch.bfloat16, device=check.device)
        with torch.no_grad():
            ctx = model.prepare_context(text, img)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    eager = model(x, t, context=ctx)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = model(x, t, context=ctx)
            x.copy_(torch.randn_like(x))
            graph.replay()
            eager = model(x, t, context=ctx)
        err = float((out.float() - eager.float()).abs().max())
        return {"status": "ok" if err == 0.0 else "fail", "max_err": err}

    return [
        Case("tiny-t2v fp32 auto vs ref", compare("tiny-t2v", torch.float32), "forward", needs_cuda=False),
        Case("tiny-i2v fp32 auto vs ref", compare("tiny-i2v", torch.float32), "forward", needs_cuda=False),
        Case("tiny-i2v bf16 auto vs ref", compare("tiny-i2v", torch.bfloat16), "forward", needs_cuda=False),
        Case("1.3B-shaped 2 layers bf16 auto vs ref", compare("wan2.1-t2v-1.3b", torch.bfloat16, 2, (3, 30, 52)),
             "1.3B dims, 2 layers, 3 x 15 x 26 tokens x 2"),
        Case("tiny-t2v torch.compile(fullgraph)", compiled, "compiled forward == eager", needs_cuda=False),
        Case("tiny-i2v CUDA graph replay", cuda_graph, "capture one step, replay on new latents == eager"),
    ]


def _attention_flops(b, sq, sk, h, d):
    return 4 * b * h * sq * sk * d


def bench_attention_cases(check: Check) -> list[Case]:
    """bf16 head_dim 128 attention: today's kernel ("wan", wan_kernels/triton/attention.py, called directly so
    that the comparison stays one whatever the route), attention_ws ("wan-ws", checked against "wan" before it is
    timed) and SDPA's flash / cuDNN backends, at every Wan shape class; attention_ws's SWEEP tiles at 720p; then
    the route verdict (`ws_verdict`). Case names: "<shape> <provider>[ <config>]"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from wan_kernels.triton import attention as fa2
    from wan_kernels.triton import attention_ws

    D = 128

    def timed(Sq: int, Sk: int, Si: int, H: int, provider: str, config=None, sweep_arch=None):
        def run():
            g = torch.Generator(device=check.device).manual_seed(0)
            r = lambda n: torch.randn(1, n, H, D, device=check.device, dtype=torch.bfloat16, generator=g)  # noqa: E731
            q, k, v = r(Sq), r(Sk), r(Sk)
            ki, vi = (r(Si), r(Si)) if Si else (None, None)
            if provider == "wan":
                fn = lambda: fa2.attention(q, k, v, ki, vi)  # noqa: E731
            elif provider == "two calls":  # what the one I2V launch replaces
                fn = lambda: fa2.attention(q, k, v) + fa2.attention(q, ki, vi)  # noqa: E731
            elif provider == "wan-ws":
                cap = torch.cuda.get_device_capability(check.device)
                if not attention_ws.supports(q, k, v, ki, vi):
                    return {"status": "skip", "reason": "attention_ws does not serve this device"}
                if sweep_arch is not None and attention_ws.arch_class(cap) != sweep_arch:
                    return {"status": "skip", "reason": f"a tile of the sm_{sweep_arch} sweep"}
                # correctness before timing: the same softmax as today's kernel, bf16 outputs (TOLERANCE)
                err = float((attention_ws.attention(q, k, v, ki, vi, config=config).float()
                             - fa2.attention(q, k, v, ki, vi).float()).abs().max())
                if err > TOLERANCE[torch.bfloat16].atol:
                    return {"status": "fail", "max_err_vs_wan": err}
                fn = lambda: attention_ws.attention(q, k, v, ki, vi, config=config)  # noqa: E731
            else:
                backend = SDPBackend.FLASH_ATTENTION if provider == "sdpa-flash" else SDPBackend.CUDNN_ATTENTION
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

                def fn():
                    with sdpa_kernel(backend):
                        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
            ms = _time_ms(check, fn, reps=3)
            return {"ms": ms, "tflops": _attention_flops(1, Sq, Sk + Si, H, D) / ms / 1e9}
        return run

    cases = []
    for res, S in ATTENTION_SHAPES.items():
        for provider in ("wan", "wan-ws", "sdpa-flash", "sdpa-cudnn"):
            cases.append(Case(f"self-attn 14B {res} {provider}", timed(S, S, 0, 40, provider),
                              f"[1, {S}, 40, {D}] bf16 {provider}"))
    for provider in ("wan", "wan-ws"):
        cases.append(Case(f"self-attn 1.3B 480p {provider}", timed(TOKENS["480p"], TOKENS["480p"], 0, 12, provider),
                          f"[1, {TOKENS['480p']}, 12, {D}] bf16 {provider}"))
        cases.append(Case(f"T2V cross-attn 14B 720p {provider}", timed(TOKENS["720p"], 512, 0, 40, provider),
                          f"q [1, {TOKENS['720p']}, 40, {D}], 512 text keys, {provider}"))
    for provider in ("wan", "wan-ws", "two calls"):
        cases.append(Case(f"I2V cross-attn 14B 480p {provider}", timed(TOKENS["480p"], 512, 257, 40, provider),
                          f"q [1, {TOKENS['480p']}, 40, {D}], 512 text + 257 image keys, {provider}"))
    for arch, configs in attention_ws.SWEEP.items():
        for cfg in configs:
            cases.append(Case(f"self-attn 14B 720p wan-ws {cfg}",
                              timed(TOKENS["720p"], TOKENS["720p"], 0, 40, "wan-ws", cfg, arch),
                              f"attention_ws tile {cfg} (sm_{arch} sweep) vs the table's"))
    cases.append(Case("attention_ws route verdict",
                      lambda: ws_verdict(check.rows, torch.cuda.get_device_capability(check.device)),
                      "wan-ws vs wan at every shape above: route it (attention_ws.ROUTED_ARCH_CLASSES)?",
                      always=True))
    return cases


# Issue 17's targets for the TMA / warp-specialised path, bf16 head_dim 128 self-attention at 16k-76k tokens:
# FA3 class on H100/H200 (>= 95% of FlashAttention-3's ~650 TFLOP/s), FA4 class on B200.
WS_TARGET_TFLOPS = {90: 620.0, 100: 1500.0}


def ws_verdict(rows: list[dict], capability: tuple[int, int]) -> dict:
    """Whether the measurements of this run justify routing attention_ws on this arch (`route`): every
    attention_accuracy row of it passed (`accurate`), and it is at least as fast as today's kernel at every shape
    its bench rows cover ("<shape> wan" vs "<shape> wan-ws"), none failed or missing. Also reported: I2V one
    launch vs two calls, the 14B self-attention TFLOP/s against the issue's target, and the SWEEP tiles relative
    to the table's (> 1: faster, a candidate for CONFIGS). Reads the rows the cases recorded (a pure function:
    tests/test_gpu_check.py runs it on made-up rows)."""
    from wan_kernels.triton.attention_ws import arch_class

    bench = {r["case"]: r for r in rows if r.get("section") == "bench_attention"}
    ms = {c: r["ms"] for c, r in bench.items() if r.get("status") == "ok" and "ms" in r}
    shapes = [c.removesuffix(" wan") for c in bench if c.endswith(" wan")]
    speedup = {sh: ms[f"{sh} wan"] / ms[f"{sh} wan-ws"] for sh in shapes if f"{sh} wan" in ms and f"{sh} wan-ws" in ms}
    if not speedup:
        return {"status": "skip", "reason": "no wan-ws timings (not an sm_90 / sm_100 device, or they failed)"}
    missing = sorted(sh for sh in shapes if sh not in speedup)
    tflops = {c.split()[2]: bench[c]["tflops"] for c in ms
              if c.startswith("self-attn 14B ") and c.endswith(" wan-ws")}
    i2v = "I2V cross-attn 14B 480p"
    two_calls = ms.get(f"{i2v} two calls")
    table = ms.get("self-attn 14B 720p wan-ws")
    sweep = {c.split(" wan-ws ")[1]: round(table / t, 3) for c, t in ms.items()
             if c.startswith("self-attn 14B 720p wan-ws ") and table}
    target = WS_TARGET_TFLOPS.get(arch_class(tuple(capability)))
    accuracy = [r for r in rows if r.get("section") == "attention_accuracy" and r["case"].startswith("wan-ws ")]
    accurate = bool(accuracy) and all(r.get("status") == "ok" for r in accuracy)
    return {"speedup_vs_wan": {k: round(v, 3) for k, v in speedup.items()}, "missing": missing,
            "accurate": accurate, "route": accurate and not missing and min(speedup.values()) >= 1.0,
            "i2v_one_launch_vs_two_calls": round(two_calls / ms[f"{i2v} wan-ws"], 3)
            if two_calls and f"{i2v} wan-ws" in ms else None,
            "ws_tflops": {k: round(v, 1) for k, v in tflops.items()}, "target_tflops": target,
            "meets_target": bool(target and tflops and min(tflops.values()) >= target),
            "sweep_vs_table": sweep}


def bench_memory_cases(check: Check) -> list[Case]:
    """The memory-bound fused ops at 14B 720p (one sample), GB/s vs the HBM peak."""
    S, C, H = TOKENS["720p"], 5120, 40
    peak = gpu_peak()
    gbps_peak = peak[1]["gbps"] if peak else None

    def result(ms, nbytes):
        gbps = nbytes / ms / 1e6
        return {"ms": ms, "gbps": gbps, "pct_hbm": 100 * gbps / gbps_peak if gbps_peak else None}

    def qk_norm_rope():
        qkv = torch.randn(1, S, 3 * C, device=check.device, dtype=torch.bfloat16)
        w = torch.ones(C, device=check.device, dtype=torch.bfloat16)
        ang = torch.rand(S, C // H // 2, device=check.device)
        cos, sin = ang.cos(), ang.sin()
        ms = _time_ms(check, lambda: wan_kernels.qk_norm_rope(qkv, w, w, cos, sin, H))
        return result(ms, 2 * qkv.numel() * 2 + 2 * cos.numel() * 4)

    def modulate():
        x = torch.randn(1, S, C, device=check.device, dtype=torch.bfloat16)
        sc = torch.randn(1, 1, C, device=check.device)
        return result(_time_ms(check, lambda: wan_kernels.layer_norm_modulate(x, sc, sc)), 2 * x.numel() * 2)

    def residual():
        x = torch.randn(1, S, C, device=check.device, dtype=torch.bfloat16)
        gate = torch.randn(1, 1, C, device=check.device)
        return result(_time_ms(check, lambda: wan_kernels.gated_residual(x, x, gate)), 3 * x.numel() * 2)

    return [Case("qk_norm_rope 14B 720p", qk_norm_rope, f"qkv [1, {S}, {3 * C}] bf16"),
            Case("layer_norm_modulate 14B 720p", modulate, f"x [1, {S}, {C}] bf16"),
            Case("gated_residual 14B 720p", residual, f"x, y [1, {S}, {C}] bf16")]


def bench_gemm_cases(check: Check) -> list[Case]:
    """NVFP4 GEMMs at the 14B linears (480p, one sample: M = 32,760) vs bf16 cuBLAS."""
    M = TOKENS["480p"]
    shapes = {"to_qkv": (3 * 5120, 5120), "ffn_in": (13824, 5120), "ffn_out": (5120, 13824)}
    cases = []
    for name, (N, K) in shapes.items():
        def run(N=N, K=K):
            g = torch.Generator(device=check.device).manual_seed(0)
            w = torch.randn(N, K, device=check.device, generator=g) * K ** -0.5
            x = torch.randn(M, K, device=check.device, dtype=torch.bfloat16, generator=g)
            gw = wan_kernels.nvfp4.global_scale(w)
            wp, ws = wan_kernels.nvfp4_quantize(w, gw, impl="ref")
            wb = w.to(torch.bfloat16)
            flops = 2 * M * N * K
            out = {"cublas_ms": _time_ms(check, lambda: torch.nn.functional.linear(x, wb))}
            out["w4a16_ms"] = _time_ms(check, lambda: wan_kernels.nvfp4_linear(x, wp, ws, gw))
            if routing.unavailable_reason("nvfp4_gemm", "cuda", check.device) is None:
                out["w4a4_ms"] = _time_ms(check, lambda: wan_kernels.nvfp4_linear_w4a4(x, wp, ws, gw, impl="cuda"))
            else:
                out["w4a4"] = "skip: " + routing.unavailable_reason("nvfp4_gemm", "cuda", check.device)[:120]
            out |= {f"{k[:-3]}_tflops": flops / v / 1e9 for k, v in list(out.items()) if k.endswith("_ms")}
            return out
        cases.append(Case(f"{name} [{M}, {K}] x [{N}, {K}]", run, "cuBLAS bf16 vs W4A16 (vs W4A4 on sm_100)"))
    return cases


def model_step_cases(check: Check) -> list[Case]:
    """One CFG step (batch 2) at 480p / 81 frames: measured vs the cost model's roofline; peak memory. The model and
    its inputs are bench/bench_model.py's (`gpu_random_model`, `gpu_step_inputs`)."""
    from bench.bench_model import gpu_random_model, gpu_step_inputs
    from wan_model import cost
    from wan_model.core.config import WanConfig

    def step(preset: str):
        def run():
            cfg = WanConfig.from_preset(preset)
            c = cost.model_cost(cfg, *SIZES["480p"], 81, batch=2)
            torch.cuda.reset_peak_memory_stats()
            model = gpu_random_model(cfg, check.device)
            x, t, text = gpu_step_inputs(cfg, c.shape.latent, check.device)
            with torch.no_grad():
                ctx = model.prepare_context(text)
                model(x, t, context=ctx)
                _sync(check)
                t0 = time.perf_counter()
                model(x, t, context=ctx)
                _sync(check)
                ms = (time.perf_counter() - t0) * 1e3
            peak = gpu_peak()
            roof = c.roofline(peak[1], include_context=False) * 1e3 if peak else None
            return {"ms": ms, "roofline_ms": roof, "pct_of_roofline": 100 * roof / ms if roof else None,
                    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
        return run

    return [Case(f"{p} CFG step 480p", step(p), f"{p}, batch 2, 32760 tokens, bf16")
            for p in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b")]


# 8-bit attention (issue 23): accuracy first, then a length past 160k, then speed, then a 14B CFG step.
# (name, B, Sq, Sk, Si, H, D, generator): Wan-like inputs and comfy-kitchen's recipes (wan_kernels/testing.py) at
# lengths no block divides; the CPU run (--device cpu: the reference emulation is the backend) uses the same
# cases at a tenth of the length.
INT8_ACCURACY = [("wan-hd128-self", 1, 4133, 4133, 0, 4, 128, "wan_like"),
                 ("wan-hd128-i2v", 1, 4133, 512, 257, 4, 128, "wan_like"),
                 ("wan-hd64-i2v", 1, 4133, 512, 257, 4, 64, "wan_like"),
                 ("comfy-bias", 1, 4096, 4096, 0, 4, 128, "comfy_bias"),
                 ("comfy-channel", 1, 4096, 4096, 0, 4, 128, "comfy_channel")]
INT8_LONG_TOKENS = 163_840   # > 160k: where SageAttention's fp8 P.V turned to noise on sm_120
INT8_SPEEDUP_TARGET = 2.0    # the bar for routing int8 as the model's default: >= 2x our bf16 kernel


def attention_int8_cases(check: Check) -> list[Case]:
    """wan::attention_int8 on this device: (0) with fp8, the kernels' e4m3 cast bit for bit vs torch's on a dense
    sweep (the inline PTX's operand order); (1) accuracy vs fp64 attention, worst head, for each P.V precision the
    device has (fp8 from sm_89 on): NRMSE at most 1.05x that of the op's reference emulation on the same inputs (the
    emulation is what met the bars against sageattention on CPU, tests/test_attention_int8.py) + 1e-4, cosine as
    measured, and the NRMSE without the quantizer's channel balance (recorded); (2) one self-attention of 163,840
    Wan-like tokens (fp64 out of reach: vs our bf16 kernel, NRMSE <= 0.1: noise is ~1.4); (3) TOPS of int8
    (quantization included) vs our bf16 kernel at 14B 480p / 720p, and the quantizer alone (its GB/s and share of
    the int8 call, the cost model's 6 % / 3 % to confirm); (4) a 14B
    CFG step at 480p with int8 vs bf16 attention, and the latent difference; (5) the verdict row: route int8 as
    the default only if every accuracy row passed and int8 is >= 2x bf16 at every timed shape."""
    from wan_kernels import ref, testing
    from wan_kernels.hardware import pv_acc16
    from wan_kernels.triton import attention as fa2
    from wan_kernels.triton import attention_int8 as tri8

    ref8 = importlib.import_module("wan_kernels.ref.attention_int8")  # the module (the package attribute is the op)

    dev = check.device
    scale_len = 1 if check.on_cuda else 10
    cap = torch.cuda.get_device_capability(dev) if check.on_cuda and torch.cuda.is_available() else None
    pvs = ("fp16", "fp8") if cap is None or cap >= (8, 9) else ("fp16",)

    def accuracy(name, B, Sq, Sk, Si, H, D, gen, pv):
        def run():
            Sq_, Sk_ = Sq // scale_len, Sk // scale_len if Si == 0 else Sk
            make = getattr(testing, gen)
            kw = {"Si": Si} if gen == "wan_like" else {}
            inputs = tuple(None if t is None else t.to(dev) for t in make(B, Sq_, Sk_, H, D, seed=0, **kw))
            before = [None if t is None else t.clone() for t in inputs]
            got = wan_kernels.attention_int8(*inputs, pv=pv)
            emul = wan_kernels.attention_int8(*inputs, pv=pv, impl="ref")
            want = ref.attention(*(None if t is None else t.double() for t in inputs))
            nrmse, cos = testing.stats_per_head(got, want)
            nrmse_emul, _ = testing.stats_per_head(emul, want)
            # the same backend without the quantizer's channel balance (what the fused q gets): the balance's gain
            unbalanced = (tri8.attention_int8 if check.on_cuda else ref8.attention_int8)(*inputs, pv=pv, balance=False)
            untouched = all(a is None or torch.equal(a, b) for a, b in zip(inputs, before))
            ok = math.isfinite(nrmse) and nrmse <= 1.05 * nrmse_emul + 1e-4 and untouched
            return {"nrmse": nrmse, "cos": cos, "nrmse_emulation": nrmse_emul,
                    "nrmse_without_balance": testing.stats_per_head(unbalanced, want)[0],
                    "inputs_untouched": untouched, "status": "ok" if ok else "fail"}
        return run

    def long(pv):
        def run():
            S = INT8_LONG_TOKENS // (1 if check.on_cuda else 256)
            q, k, v, _, _ = testing.wan_like(1, S, S, 2, 128, seed=1, dtype=torch.bfloat16, device=dev)
            got = wan_kernels.attention_int8(q, k, v, pv=pv)
            want = wan_kernels.attention(q, k, v)
            nrmse, cos = testing.stats_per_head(got, want.float())
            ok = math.isfinite(nrmse) and nrmse <= 0.1
            return {"tokens": S, "nrmse_vs_bf16_kernel": nrmse, "cos": cos, "status": "ok" if ok else "fail"}
        return run

    def speed(S, H, provider):
        def run():
            g = torch.Generator(device=dev).manual_seed(0)
            q, k, v = (torch.randn(1, S, H, 128, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
            fn = ((lambda: fa2.attention(q, k, v)) if provider == "bf16" else
                  (lambda: wan_kernels.attention_int8(q, k, v, pv=provider.split("-")[1])))
            ms = _time_ms(check, fn, reps=3)
            out = {"ms": ms, "tops": _attention_flops(1, S, S, H, 128) / ms / 1e9}
            if provider != "bf16":  # the key tile's P.V accumulator on this device (hardware.pv_acc16)
                out["pv_accumulator"] = "fp16" if pv_acc16(cap) else "fp32"
            return out
        return run

    def e4m3_cast():
        from wan_kernels.triton.attention_int8 import e4m3_encode

        x = testing.e4m3_sweep().to(dev)
        got, want = e4m3_encode(x), x.clamp(-448, 448).to(torch.float8_e4m3fn)
        bad = int((got.view(torch.uint8) != want.view(torch.uint8)).sum())
        return {"values": x.numel(), "mismatches": bad, "status": "ok" if bad == 0 else "fail"}

    def quantizer(S, H):
        def run():
            from wan_kernels.triton.attention_int8_quant import quantize
            from wan_model.cost import int8_quantization_bytes

            g = torch.Generator(device=dev).manual_seed(0)
            q, k, v = (torch.randn(1, S, H, 128, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
            pv = pvs[-1]
            ms = _time_ms(check, lambda: quantize(q, k, v, None, None, 128 ** -0.5, pv, False,
                                                  torch.cuda.get_device_capability(dev)), reps=3)
            nbytes = int8_quantization_bytes(1, S, [S], H, 128, pv)
            int8 = next((r for r in check.rows if r["case"] == f"self-attn 14B {res_of[S]} int8-{pv}"
                         and r.get("status") == "ok"), None)
            share = ms / int8["ms"] if int8 else None
            return {"ms": ms, "gbps": nbytes / ms / 1e6, "pv": pv, "share_of_int8": share,
                    "status": "ok" if share is None or share <= 0.10 else "over the 10 % bar"}
        return run

    def fused_q(S, H):
        def run():
            from wan_kernels.triton._launch import interpreter_enabled, run as launch_run
            from wan_kernels.triton.attention_int8_quant import _int8

            nonlocal S
            impl = "auto" if check.on_cuda else "triton"  # CPU: the kernels under the interpreter, 64 tokens
            if not check.on_cuda:
                if not interpreter_enabled():
                    return {"status": "skip", "reason": "CPU without TRITON_INTERPRET=1"}
                S = 64
            g = torch.Generator(device=dev).manual_seed(0)
            C = H * 128
            qkv = torch.randn(1, S, 3 * C, device=dev, dtype=torch.bfloat16, generator=g)
            wq, wk = (torch.rand(C, device=dev, generator=g).bfloat16() + 0.5 for _ in range(2))
            ang = torch.rand(S, 64, device=dev, generator=g) * 6.0
            args = (qkv, wq, wk, ang.cos(), ang.sin(), H)

            def unfused():
                q, k, v = wan_kernels.qk_norm_rope(*args, impl=impl)
                return (*_int8(q, None, 1.0, (), 0.0, launch_run)[:2], k, v)

            fused = wan_kernels.qk_norm_rope_int8(*args, impl=impl)
            identical = all(torch.equal(a, b) for a, b in zip(fused, unfused()))
            fused_ms = _time_ms(check, lambda: wan_kernels.qk_norm_rope_int8(*args, impl=impl), reps=3)
            unfused_ms = _time_ms(check, unfused, reps=3)
            return {"tokens": S, "identical": identical, "fused_ms": fused_ms, "unfused_ms": unfused_ms,
                    "saved": 1 - fused_ms / unfused_ms, "status": "ok" if identical else "fail"}
        return run

    def ring_block(pv):
        def run():
            # a ring's block: K/V quantized once (quantize_kv_int8), attended on the fused q
            # (attention_int8_quantized_lse) = attention_int8_q8_lse bit for bit; its fp32 output and LSE vs fp64
            # attention of the dequantized q (the scores it computes): NRMSE within 1.05x the emulation's + 1e-4,
            # LSE within the int8 score error (0.05, tests/test_attention_int8.py)
            from wan_kernels.ref.attention_int8 import quantize_int8

            S = 4096 // scale_len
            q, k, v = (t.to(dev) for t in testing.comfy_bias(1, S, S, 4, 128, seed=0)[:3])
            q8, qs = quantize_int8(q, 1)
            kv = wan_kernels.quantize_kv_int8(k, v, pv=pv)
            out, lse = wan_kernels.attention_int8_quantized_lse(q8, qs, *kv)
            same = all(torch.equal(a, b) for a, b in zip(
                wan_kernels.attention_int8_quantized_lse(q8, qs, *kv, out_dtype=k.dtype),
                wan_kernels.attention_int8_q8_lse(q8, qs, k, v, pv=pv)))
            emul = wan_kernels.attention_int8_quantized_lse(q8, qs, *kv, impl="ref")[0]
            q_hat = q8.double() * qs.double().transpose(1, 2)[..., None]
            want, want_lse = ref.attention_lse(q_hat, k.double(), v.double())
            nrmse, cos = testing.stats_per_head(out, want)
            nrmse_emul, _ = testing.stats_per_head(emul, want)
            lse_err = (lse.double() - want_lse).abs().max().item()
            ok = same and math.isfinite(nrmse) and nrmse <= 1.05 * nrmse_emul + 1e-4 and lse_err < 0.05
            return {"tokens": S, "same_as_q8_lse": same, "nrmse": nrmse, "cos": cos, "nrmse_emulation": nrmse_emul,
                    "lse_max_err": lse_err, "status": "ok" if ok else "fail"}
        return run

    def step():
        from bench.bench_model import gpu_random_model, gpu_step_inputs
        from wan_model import cost
        from wan_model.core.config import WanConfig

        cfg = WanConfig.from_preset("wan2.1-t2v-14b")
        c = cost.model_cost(cfg, *SIZES["480p"], 81, batch=2)
        model = gpu_random_model(cfg, dev)
        x, t, text = gpu_step_inputs(cfg, c.shape.latent, dev)
        out, ms = {}, {}
        with torch.no_grad():
            ctx = model.prepare_context(text)
            for kind in ("bf16", "int8"):
                model.set_attention(kind)
                model(x, t, context=ctx)
                _sync(check)
                t0 = time.perf_counter()
                out[kind] = model(x, t, context=ctx)
                _sync(check)
                ms[kind] = (time.perf_counter() - t0) * 1e3
        diff = float((out["int8"].float() - out["bf16"].float()).norm() / out["bf16"].float().norm())
        return {"bf16_ms": ms["bf16"], "int8_ms": ms["int8"], "speedup": ms["bf16"] / ms["int8"],
                "rel_diff_latent": diff}

    def verdict_row():
        rows = [r for r in check.rows if r.get("section") == "attention_int8"]
        accurate = bool(rows) and all(r.get("status") == "ok" for r in rows
                                      if r["case"].startswith(("accuracy", "long")))
        speedups = {}
        for r in rows:
            if r["case"].startswith("self-attn") and r.get("status") == "ok" and not r["case"].endswith(" bf16"):
                shape = r["case"].rsplit(" ", 1)[0]
                base = next((b for b in rows if b["case"] == f"{shape} bf16" and b.get("status") == "ok"), None)
                if base is not None:
                    speedups[r["case"]] = base["ms"] / r["ms"]
        fast = bool(speedups) and min(speedups.values()) >= INT8_SPEEDUP_TARGET
        return {"accurate": accurate, "speedups": speedups, "route_int8_default": accurate and fast}

    res_of = {n: r for r, n in TOKENS.items()}
    cases = [Case(f"accuracy {n} pv={pv}", accuracy(n, *rest, pv), f"{n} vs fp64, worst head, vs the emulation",
                  needs_cuda=False)
             for n, *rest in INT8_ACCURACY for pv in pvs]
    if "fp8" in pvs:
        cases.insert(0, Case("e4m3 cast", e4m3_cast, "the kernels' fp32 -> e4m3 (inline cvt.rn.satfinite.e4m3x2.f32) "
                             "vs torch's cast, 1.26 M values, bit for bit"))
    cases += [Case(f"long {INT8_LONG_TOKENS} tokens pv={pv}", long(pv), "163,840 Wan-like tokens vs the bf16 kernel",
                   needs_cuda=False) for pv in pvs]
    cases += [Case(f"accuracy ring block pv={pv}", ring_block(pv), "quantize_kv_int8 + attention_int8_quantized_lse: "
                   "= attention_int8_q8_lse, vs fp64 of q^ and the emulation", needs_cuda=False) for pv in pvs]
    for res in ("480p", "720p"):
        for provider in ("bf16", *(f"int8-{pv}" for pv in pvs)):
            cases.append(Case(f"self-attn 14B {res} {provider}", speed(TOKENS[res], 40, provider),
                              f"[1, {TOKENS[res]}, 40, 128] {provider} (int8: quantization included)"))
        cases.append(Case(f"quantizer 14B {res}", quantizer(TOKENS[res], 40),
                          "the Q/K/V quantizer alone: GB/s of its counted bytes, share of the int8 call (bar 10 %)"))
        cases.append(Case(f"q fused in qk_norm_rope 14B {res}", fused_q(TOKENS[res], 40),
                          "qk_norm_rope_int8 vs qk_norm_rope + the quantizer's q pass: bit-identical, ms of each",
                          needs_cuda=False))
    cases.append(Case("14B CFG step 480p int8 vs bf16", step, "wan2.1-t2v-14b, batch 2, set_attention int8 vs bf16"))
    cases.append(Case("int8 route verdict", verdict_row, "accurate everywhere and >= 2x bf16 at every shape?",
                      needs_cuda=False, always=True))
    return cases


# Block offload (issue 25): a 14B-shaped stack of OFFLOAD_LAYERS blocks at 480p, CFG batch 2, bf16.
OFFLOAD_LAYERS = 8


def offload_budget(c, blocks: int, prefetch: int = 1) -> int:
    """The VRAM budget for which wan_model.cost.offload_plan puts `blocks` blocks of the model of `c` on the device
    (its rule: N + prefetch = (budget - fixed - activations) // block, with the plan's own byte counts)."""
    from wan_model import cost

    p = cost.offload_plan(c, "H100", 1 << 60, prefetch=prefetch)
    return p["fixed_bytes"] + p["activation_bytes"] + (blocks + prefetch) * p["block_bytes"]


def offload_cases(check: Check) -> list[Case]:
    """Pinned host-to-device bandwidth, then the 14B-shaped stack with all blocks resident, half of them and 2 on
    the device (prefetch 1): output bit-identical to the resident run, peak `max_memory_allocated`, step time, and
    the cost model's prediction of both (wan_model.cost.offload_plan at the measured bandwidth) beside them."""
    from bench.bench_model import gpu_random_model, gpu_step_inputs
    from wan_model import cost
    from wan_model.core.config import WanConfig

    dev, state = check.device, {}
    cfg = WanConfig.from_preset("wan2.1-t2v-14b").replace(num_layers=OFFLOAD_LAYERS)

    def bandwidth():
        host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty_like(host, device=dev)
        dst.copy_(host, non_blocking=True)
        _sync(check)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            dst.copy_(host, non_blocking=True)
        end.record()
        _sync(check)
        state["gbps"] = 3 * host.numel() / (start.elapsed_time(end) * 1e6)
        return {"pinned_h2d_gbps": state["gbps"]}

    def run(blocks: int):
        def case():
            c = cost.model_cost(cfg, *SIZES["480p"], 81, batch=2)
            if "model" not in state:
                state["model"] = gpu_random_model(cfg, dev)
                state["inputs"] = gpu_step_inputs(cfg, c.shape.latent, dev)
            model, (x, t, text) = state["model"], state["inputs"]
            with torch.no_grad():
                ctx = model.prepare_context(text)
                if blocks < OFFLOAD_LAYERS:
                    model.enable_offload(blocks, prefetch=1)
                try:
                    model(x, t, context=ctx)                                   # warm: ring, compiles
                    _sync(check)
                    torch.cuda.reset_peak_memory_stats(dev)
                    t0 = time.perf_counter()
                    out = model(x, t, context=ctx)
                    _sync(check)
                    ms = (time.perf_counter() - t0) * 1e3
                    peak = torch.cuda.max_memory_allocated(dev)
                finally:
                    model.disable_offload()
            row = {"blocks_on_device": blocks, "ms": ms, "peak_gib": peak / 2**30}
            if blocks == OFFLOAD_LAYERS:
                state["resident"], state["resident_ms"] = out, ms
            elif "resident" in state:  # (the resident run timed out: nothing to compare with)
                row["bit_identical"] = bool(torch.equal(out, state["resident"]))
                row["overhead_pct"] = 100 * (ms / state["resident_ms"] - 1)
            found = gpu_peak()
            if found is not None and "gbps" in state:
                plan = cost.offload_plan(c, found[0], offload_budget(c, blocks), prefetch=1, pcie_gbps=state["gbps"])
                row |= {"predicted_ms": plan["step_s"] * 1e3 if plan["step_s"] else None,
                        "predicted_peak_gib": plan["peak_bytes"] / 2**30 if plan["peak_bytes"] else None,
                        "predicted_hides": plan["hides"]}
            if row.get("bit_identical") is False:
                row["status"] = "fail"
            return row
        return case

    cases = [Case("pinned H2D bandwidth", bandwidth, "1 GiB pinned -> device, 3 copies")]
    for blocks, label in ((OFFLOAD_LAYERS, "all"), (OFFLOAD_LAYERS // 2, "half"), (2, "2 blocks")):
        cases.append(Case(f"14B-shaped x{OFFLOAD_LAYERS} 480p CFG, {label} on device", run(blocks),
                          f"{blocks} of {OFFLOAD_LAYERS} blocks resident, prefetch 1: peak, step, vs the cost model"))
    cases.append(Case("offload cleanup", lambda: state.clear() or {}, "free the stack", always=True))
    return cases


SECTIONS = [
    Section("ops", 90, ops_cases),
    # issue 23 (8-bit attention, the most important open work) before the slower sections
    Section("attention_int8", 120, attention_int8_cases),
    # issue 17's evidence (the one open GPU question) before the slower whole-model sections
    Section("attention_accuracy", 60, attention_accuracy_cases),
    Section("bench_attention", 100, bench_attention_cases),
    Section("big_gemm", 60, big_gemm_cases),
    Section("model", 90, model_cases),
    Section("bench_memory", 30, bench_memory_cases),
    Section("bench_gemm", 45, bench_gemm_cases),
    Section("model_step", 75, model_step_cases),
    Section("offload", 90, offload_cases),
]
BUILD_TIMEOUT_S = 240
# One device command may run 600 s and a session has 900 s of device time in all, the machine's start (a minute
# or more) included: with a command limit of ~540 s the default ends the run inside it and leaves a few minutes
# of the session for a shorter rerun (--sections).
DEADLINE_S = 480.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", type=Path, metavar="OUTDIR",
                   help="directory for results.jsonl, summary.md, env.json, build.log")
    p.add_argument("--overwrite", action="store_true", help="replace the results of a previous run in OUTDIR")
    p.add_argument("--dry-run", action="store_true", help="record what every section would do; run nothing")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--skip-build", action="store_true", help="use the _C already built")
    p.add_argument("--sections", default=",".join(s.name for s in SECTIONS),
                   help="comma-separated subset of: " + ", ".join(s.name for s in SECTIONS))
    p.add_argument("--deadline-s", type=float, default=DEADLINE_S,
                   help=f"the whole run's budget in seconds, the build included (default {DEADLINE_S:.0f}): no case "
                        "starts after it (recorded as timeout), so a command limit of a little more never cuts the "
                        "run off mid-case; 0: none")
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)  # the re-executed run after a build
    p.add_argument("--deadline-at", type=float, help=argparse.SUPPRESS)     # its absolute deadline (time.time())
    args = p.parse_args(argv)
    deadline = args.deadline_at if args.deadline_at is not None else \
        (time.time() + args.deadline_s if args.deadline_s > 0 else None)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(names) - {s.name for s in SECTIONS})
    if unknown:
        p.error(f"argument --sections: unknown section(s) {unknown}")
    if not names:
        p.error(f"argument --sections: no section selected in {args.sections!r} (choose from: "
                + ", ".join(s.name for s in SECTIONS) + ")")
    if args.device == "cuda" and not args.dry_run and not torch.cuda.is_available():
        p.error("argument --device: cuda requested but torch sees no CUDA device (use --device cpu or --dry-run)")
    if not args.resume:
        _prepare_outdir(p, args.outdir, args.overwrite)

    if args.device == "cuda" and not args.dry_run and not args.skip_build:
        result = build(args.outdir, BUILD_TIMEOUT_S)
        with open(args.outdir / "results.jsonl", "a") as f:
            f.write(json.dumps({"section": "build", "case": "_C", **result}) + "\n")
        print(f"[build] _C: {result}", flush=True)
        # the package (and its _C, or the pure-torch fallback) is already imported: run the rest afresh
        os.execv(sys.executable, [sys.executable, "-m", "tools.gpu_check", str(args.outdir), "--skip-build",
                                  "--resume", "--sections", ",".join(names)]
                 + (["--deadline-at", repr(deadline)] if deadline is not None else []))
    check = Check(args.outdir, "cpu" if args.device == "cpu" else "cuda", args.dry_run, deadline)
    env = env_fields(check)
    (args.outdir / "env.json").write_text(json.dumps(env, indent=1, default=str))
    print(f"device: {env['device']}; _C: {env['extension']}", flush=True)
    if check.on_cuda and not args.dry_run and not wan_kernels.EXTENSION.loaded:
        # the CUDA backends would all be skipped as unavailable: a run that checks none of them is no pass
        check.record("build", "_C import", status="error", error=f"_C not loaded: {wan_kernels.EXTENSION.error}")
    for section in SECTIONS:
        if section.name in names:
            check.run_section(section)
    check.finished = True
    check.write_summary()
    word, code, why = verdict(check.rows, args.dry_run)
    print(f"gpu_check: {word}: {why}; {len(check.rows)} rows; summary in {args.outdir / 'summary.md'}")
    return code


OUTPUTS = ("results.jsonl", "summary.md", "env.json", "build.log")


def _prepare_outdir(p: argparse.ArgumentParser, outdir: Path, overwrite: bool) -> None:
    """OUTDIR created and writable with an empty results.jsonl, or a one-line usage error (exit 2): a path that is
    a file or lies under one, an unwritable directory, a previous run's results without --overwrite."""
    if outdir.exists() and not outdir.is_dir():
        p.error(f"argument OUTDIR: {outdir} exists and is not a directory")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"argument OUTDIR: cannot create directory {outdir}: {e.strerror or e}")
    results = outdir / "results.jsonl"
    if results.exists() and not overwrite:
        p.error(f"argument OUTDIR: {outdir} holds a previous run's results.jsonl (pass --overwrite to replace it, "
                "or choose another directory)")
    try:
        for name in OUTPUTS[1:] if overwrite else ():  # the replaced run's other files would describe another run
            (outdir / name).unlink(missing_ok=True)
        results.write_text("")
    except OSError as e:
        p.error(f"argument OUTDIR: cannot write to {outdir}: {e.strerror or e}")


if __name__ == "__main__":
    sys.exit(main())
