"""GPU-readiness report without a GPU: `python -m tools.readiness [--kernels ...] [--archs ...]`.

Compiles ahead of time (tools/aot.py) every launch the Triton launchers can make, for sm_80, sm_86,
sm_89, sm_90, sm_100 and sm_120, and prints per kernel / launch / arch: the tensor-core instruction family in the
PTX, registers, spill bytes (cuobjdump STACK + LOCAL, STL/LDL count) and shared memory. Then lists the CUDA objects
built into `wan_kernels._C` per arch (cuobjdump --list-elf / --dump-resource-usage, the copy bundled with Triton).
Exit status 1 on any spill, shared memory over the arch's per-block limit, or a GEMM-like kernel (attention, NVFP4
GEMM) without its arch's tensor-core family (`_launch.mma_class`: mma.sync / wgmma / tcgen05); 0 otherwise.

What is compiled is what the runtime compiles: each launch is the launcher's own `prepare*` (same tensors'
layout, config pick for the arch's capability, output allocation) run on meta tensors of Wan-14B 720p shapes with
CFG (75,600 tokens x 2), and `aot.compile_launch` lets Triton's binder derive the specialisation from those
arguments (ints equal to 1 become constexprs, multiples of 16 and aligned pointers are tagged). Launches that
specialise identically are compiled once. Enumerated:
  qk_norm_rope  `launch_config(H, D)` over the Wan head counts, the test shapes and one shape per head-tile
                size, deduplicated; fp32 / fp16 / bf16; its backward at the Wan head counts and one chunked row,
                fp32 / bf16
  attention     per arch, head_dim 64 / 128 x self / cross / i2v (`pick_config`), fp16, bf16, and bf16 with the
                LSE output; the backward's dK/dV and dQ passes (fp16, bf16) and the I2V delta preprocess (bf16)
  attention_ws  the Hopper/Blackwell path (TMA, warp specialisation, persistent), sm_90 / sm_100 only: head_dim
                64 / 128 x self / i2v, fp16, bf16 (tests/test_attention_ws.py checks its TMA / setmaxnreg PTX)
  nvfp4         W4A16 (fp16, bf16), its dgrad (dX = dY @ dequant(W), fp16, bf16) and W4A4 (fp16) at M = 2 and
                M = 151,200 (to_qkv: N = 15,360, K = 5,120); quantize / dequantize in fp32 and bf16
  modulate      layer_norm_modulate / gated_residual and their backwards at the Wan widths 1536 / 3072 / 5120,
                fp32 and bf16, with the model's modulation layout (backward: broadcast bf16 at every width and
                fp32 at 5120, per-token bf16 at 3072)
Compiles run in a process pool (`--jobs`, default 2); Triton's own cache keeps repeated runs fast.
`--maxnreg N` caps the registers of every compile (a forced-spill check of the report itself).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import re
import subprocess
import sys
import tempfile
import time

import torch

KERNELS = ("qk_norm_rope", "attention", "attention_ws", "nvfp4", "modulate", "cuda")
ARCHS = (80, 86, 89, 90, 100, 120)
# Largest shared memory per block (bytes, opt-in): A100 163 KB; sm_86 / sm_89 / sm_120 99 KB; H100 / B200 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
TOKENS, CFG_BATCH = 75600, 2  # Wan 14B at 720p (81 frames): tokens per sample; conditional + unconditional


def mma(arch: int) -> str:
    """The tensor-core family a GEMM-like kernel must use on sm_`arch`."""
    from wan_kernels.triton._launch import mma_class

    return mma_class((arch // 10, arch % 10))


@dataclasses.dataclass
class Job:
    kernel: str
    config: str
    arch: int
    gemm_like: bool
    launch: object             # wan_kernels.triton._launch.Launch (meta tensors)


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def _cap(arch: int) -> tuple[int, int]:
    return arch // 10, arch % 10


def _qk_norm_rope_jobs(archs):
    from wan_kernels.triton import qk_norm_rope as tqk

    shapes = [(12, 128), (24, 128), (40, 128), (2, 64), (2, 128), (40, 64), (80, 128), (200, 64)]
    shapes += [(max(1, hb - 1), d) for d in (64, 128) for hb in (1, 2, 4, 8, 16, 32, 64, 128)
               if hb * d <= tqk.MAX_TILE]
    configs = {}
    for h, d in shapes:
        configs.setdefault(tqk.launch_config(h, d), (h, d))
    jobs = []
    for arch in archs:
        for cfg, (h, d) in configs.items():
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                label = f"H={cfg.H} D={cfg.D} H_BLOCK={cfg.H_BLOCK} chunks={cfg.NUM_CHUNKS} w{cfg.num_warps} " \
                        f"{str(dtype)[6:]}"
                c = h * d
                launch = tqk.prepare(_meta(CFG_BATCH, TOKENS, 3 * c, dtype=dtype), _meta(c, dtype=dtype),
                                     _meta(c, dtype=dtype), _meta(TOKENS, d // 2, dtype=torch.float32),
                                     _meta(TOKENS, d // 2, dtype=torch.float32), h, 1e-6, _cap(arch))[0]
                jobs.append(Job("qk_norm_rope", label, arch, False, launch))
                # q quantized in the kernel for 8-bit attention (wan::qk_norm_rope_int8; its own chunk size), with
                # norm weights in qkv's dtype (the op's users, diffusers' processor) and in fp32 (WanModel's, the
                # channel balance folded in: wan_model/core/balance.py)
                for w in dict.fromkeys((dtype, torch.float32)):
                    launch = tqk.prepare(_meta(CFG_BATCH, TOKENS, 3 * c, dtype=dtype), _meta(c, dtype=w),
                                         _meta(c, dtype=w), _meta(TOKENS, d // 2, dtype=torch.float32),
                                         _meta(TOKENS, d // 2, dtype=torch.float32), h, 1e-6, _cap(arch),
                                         quant_q=True)[0]
                    k = launch.kwargs
                    jobs.append(Job("qk_norm_rope", f"int8 q H={k['H']} D={k['D']} H_BLOCK={k['H_BLOCK']} "
                                    f"chunks={k['NUM_CHUNKS']} w{k['num_warps']} {str(dtype)[6:]}"
                                    f"{' w fp32' if w != dtype else ''}", arch, False, launch))
        # backward: the Wan head counts (1.3B / 5B / 14B) and one chunked row, bf16 and fp32 (q and k launches)
        for h, d in ((12, 128), (24, 128), (40, 128), (80, 128)):
            cfg, c = tqk.launch_config(h, d), h * d
            for dtype in (torch.float32, torch.bfloat16):
                grads = [_meta(CFG_BATCH, TOKENS, h, d, dtype=dtype) for _ in range(3)]
                launches = tqk.prepare_backward(*grads, _meta(CFG_BATCH, TOKENS, 3 * c, dtype=dtype),
                                                _meta(c, dtype=dtype), _meta(c, dtype=dtype),
                                                _meta(TOKENS, d // 2, dtype=torch.float32),
                                                _meta(TOKENS, d // 2, dtype=torch.float32), h, 1e-6, _cap(arch))[0]
                for part, launch in zip("qk", launches):
                    jobs.append(Job("qk_norm_rope", f"backward {part} H={h} D={d} H_BLOCK={cfg.H_BLOCK} "
                                    f"chunks={cfg.NUM_CHUNKS} w{cfg.num_warps} {str(dtype)[6:]}", arch, False, launch))
    return jobs


def _attention_jobs(archs):
    from wan_kernels.triton import attention as ta

    cases = {64: (12, 1560), 128: (40, TOKENS)}  # head_dim -> (heads, tokens): a test-size hd64, Wan 14B hd128
    jobs = []
    for arch in archs:
        for d, (h, s) in cases.items():
            for kind, (sk, si) in {"self": (s, 0), "cross": (512, 0), "i2v": (512, 257)}.items():
                for dtype, lse in ((torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)):
                    kv = [_meta(CFG_BATCH, n, h, d, dtype=dtype) for n in (sk, sk, si, si) if n]
                    q = _meta(CFG_BATCH, s, h, d, dtype=dtype)
                    img = kv[2:] if si else (None, None)
                    launch = ta.prepare(q, kv[0], kv[1], *img, None, lse, None, _cap(arch))[0]
                    cfg = ta.pick_config(_cap(arch), d, max(sk, si), bool(si))
                    label = f"{kind} hd{d} {cfg} {str(dtype)[6:]}{' lse' if lse else ''}"
                    jobs.append(Job("attention", label, arch, True, launch))
    return jobs + _attention_backward_jobs(archs, cases)


def _attention_backward_jobs(archs, cases):
    """The backward's launches (wan_kernels/triton/attention_bwd.py): per arch and head_dim, the dK/dV and dQ
    passes in fp16 and bf16 at the self-attention shape (their tiles do not depend on the kind) and the delta
    preprocess with the image set (I2V cross-attention: 512 text, 257 image keys) in bf16."""
    from wan_kernels.triton import attention_bwd as tb

    jobs = []
    for arch in archs:
        for d, (h, s) in cases.items():
            for dtype in (torch.float16, torch.bfloat16):
                q, k, v, dout = (_meta(CFG_BATCH, s, h, d, dtype=dtype) for _ in range(4))
                stat = _meta(CFG_BATCH, h, s, dtype=torch.float32)
                launches = tb.prepare_backward(dout, q, k, v, stat, stat, None, _cap(arch))[0]
                for which, launch in zip(("dkdv", "dq"), launches):
                    cfg = tb.pick_config(_cap(arch), d, which)
                    jobs.append(Job("attention", f"bwd {which} hd{d} {cfg} {str(dtype)[6:]}", arch, True, launch))
            ki, vi = _meta(CFG_BATCH, 257, h, d), _meta(CFG_BATCH, 257, h, d)
            q = _meta(CFG_BATCH, s, h, d)
            launch = tb.prepare_delta(q, q, q, ki, vi, _meta(CFG_BATCH, h, s, dtype=torch.float32), None,
                                      _cap(arch))[0]
            jobs.append(Job("attention", f"bwd delta i2v hd{d} {tb.pick_config(_cap(arch), d, 'delta')} bfloat16",
                            arch, True, launch))
    return jobs


def _attention_ws_jobs(archs):
    """The Hopper/Blackwell attention path (wan_kernels/triton/attention_ws.py), on sm_90 and sm_100 only: head_dim
    64 / 128 x self (Wan 14B 720p) / i2v (512 text + 257 image keys), fp16 and bf16."""
    from wan_kernels.triton import attention_ws as tw

    jobs = []
    for arch in archs:
        if tw.arch_class(_cap(arch)) is None:
            continue
        for d in (64, 128):
            for kind, (sk, si) in {"self": (TOKENS, 0), "i2v": (512, 257)}.items():
                for dtype in (torch.float16, torch.bfloat16):
                    kv = [_meta(CFG_BATCH, n, 40, d, dtype=dtype) for n in (sk, sk, si, si) if n]
                    img = kv[2:] if si else (None, None)
                    q = _meta(CFG_BATCH, TOKENS, 40, d, dtype=dtype)
                    launch = tw.prepare(q, kv[0], kv[1], *img, None, False, None, _cap(arch))[0]
                    cfg = tw.pick_config(_cap(arch), d, max(sk, si), bool(si))
                    jobs.append(Job("attention_ws", f"{kind} hd{d} {cfg} {str(dtype)[6:]}", arch, True, launch))
    return jobs


def _nvfp4_jobs(archs):
    from wan_kernels.nvfp4 import round_up
    from wan_kernels.triton import nvfp4 as tnv

    n, k = 15360, 5120                      # Wan 14B to_qkv
    w, ws = _meta(n, k // 2, dtype=torch.uint8), _meta(round_up(n, 128), k // 16, dtype=torch.float8_e4m3fn)
    gs = _meta(dtype=torch.float32)
    jobs = []
    for arch in archs:
        for m in (CFG_BATCH, CFG_BATCH * TOKENS):
            for dt in (torch.float16, torch.bfloat16):
                launch = tnv.prepare_w4a16(_meta(m, k, dtype=dt), w, ws, gs, _meta(n, dtype=dt), _cap(arch))[0]
                jobs.append(Job("nvfp4", f"gemm w4a16 M={m} {_gemm_label(launch)} {str(dt)[6:]}", arch, True,
                                launch))
            a, sa = _meta(m, k // 2, dtype=torch.uint8), _meta(round_up(m, 128), k // 16, dtype=torch.float8_e4m3fn)
            launch = tnv.prepare_w4a4(a, sa, gs, w, ws, gs, _meta(n, dtype=torch.float16), torch.float16,
                                      _cap(arch))[0]
            jobs.append(Job("nvfp4", f"gemm w4a4 M={m} {_gemm_label(launch)} float16", arch, True, launch))
            for dt in (torch.float16, torch.bfloat16):  # dX = dY [M, N] @ dequant(W): the backward of w4a16
                launch = tnv.prepare_dgrad(_meta(m, n, dtype=dt), w, ws, gs, _cap(arch))[0]
                jobs.append(Job("nvfp4", f"dgrad w4a16 M={m} {_gemm_label(launch)} {str(dt)[6:]}", arch, True,
                                launch))
        for dt in (torch.float32, torch.bfloat16):
            m = CFG_BATCH * TOKENS
            launch = tnv.prepare_quantize(_meta(m, k, dtype=dt), gs, _cap(arch))[0]
            jobs.append(Job("nvfp4", f"quantize {str(dt)[6:]}", arch, False, launch))
            launch = tnv.prepare_dequantize(w, ws, gs, dt, _cap(arch))[0]
            jobs.append(Job("nvfp4", f"dequantize {str(dt)[6:]}", arch, False, launch))
    return jobs


def _gemm_label(launch) -> str:
    c = launch.kwargs
    return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"


def _modulate_jobs(archs):
    from wan_kernels.triton import modulate

    jobs = []
    for arch in archs:
        for dt in (torch.float32, torch.bfloat16):
            for c in modulate.AOT_C:
                x = _meta(CFG_BATCH, TOKENS, c, dtype=dt)
                shift, scale, gate = _meta(CFG_BATCH, 1, 6, c, dtype=torch.float32).unbind(2)[:3]  # the model's layout
                launch = modulate.prepare_layer_norm_modulate(x, scale, shift, 1e-6, _cap(arch))[0]
                warps = launch.kwargs["num_warps"]
                jobs.append(Job("modulate", f"layer_norm_modulate C={c} w{warps} {str(dt)[6:]}", arch, False, launch))
                launch = modulate.prepare_gated_residual(x, x, gate, _cap(arch))[0]
                warps = launch.kwargs["num_warps"]
                jobs.append(Job("modulate", f"gated_residual C={c} w{warps} {str(dt)[6:]}", arch, False, launch))
                # backward, the model's layouts: broadcast modulation (bf16 at every width, fp32 at 5120), per-token
                # (the 5B's, bf16 at 3072)
                for per_token in (False, True):
                    if (dt == torch.float32 and (per_token or c != 5120)) or (per_token and c != 3072):
                        continue
                    shift, scale, gate = _meta(CFG_BATCH, TOKENS if per_token else 1, 6, c,
                                               dtype=torch.float32).unbind(2)[:3]
                    kind = "per-token" if per_token else "broadcast"
                    # labels from each launch's own warps (the backward's may differ from the forward's)
                    launch = modulate.prepare_layer_norm_modulate_backward(x, x, scale, shift, 1e-6, _cap(arch))[0]
                    w = launch.kwargs["num_warps"]
                    jobs.append(Job("modulate", f"layer_norm_modulate_backward {kind} C={c} w{w} {str(dt)[6:]}",
                                    arch, False, launch))
                    launch = modulate.prepare_gated_residual_backward(x, x, gate, _cap(arch))[0]
                    w = launch.kwargs["num_warps"]
                    jobs.append(Job("modulate", f"gated_residual_backward {kind} C={c} w{w} {str(dt)[6:]}",
                                    arch, False, launch))
    return jobs


BUILDERS = {"qk_norm_rope": _qk_norm_rope_jobs, "attention": _attention_jobs, "attention_ws": _attention_ws_jobs,
            "nvfp4": _nvfp4_jobs,
            "modulate": _modulate_jobs}


def jobs_for(kernels, archs) -> list[Job]:
    """Every launch of `kernels` on `archs`, launches that Triton specialises identically listed once."""
    from tools import aot

    out, seen = [], set()
    for k in kernels:
        for j in BUILDERS.get(k, lambda _: [])(archs):
            spec = aot.specialize(j.launch, j.arch)
            key = (j.kernel, j.arch, j.launch.kernel.fn.__name__, repr(spec.signature), repr(spec.constexprs),
                   repr(spec.attrs), repr(sorted(spec.options.__dict__.items())))
            if key not in seen:
                seen.add(key)
                out.append(j)
    return out


def problems(job: Job, r) -> list[str]:
    """Why a compiled launch is not ready: spills, shared memory over the limit, no tensor cores for a GEMM."""
    out = []
    if r.spills:
        out.append(f"SPILL (STACK {r.stack_bytes} LOCAL {r.local_bytes} STL/LDL {r.spill_stores}/{r.spill_loads})")
    if r.shared_bytes > SHARED_LIMIT[job.arch]:
        out.append(f"SHARED {r.shared_bytes} > {SHARED_LIMIT[job.arch]}")
    if job.gemm_like and mma(job.arch) not in r.mma_families:
        out.append(f"NO TENSOR CORES ({mma(job.arch)} missing)")
    return out


@dataclasses.dataclass(frozen=True)
class Row:
    """What the report prints of one compile (picklable, no cubin)."""
    mma_families: frozenset
    registers: int
    stack_bytes: int
    local_bytes: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    spills: bool


_POOL_STATE: dict = {}  # jobs / options / workdir, inherited by forked workers


def _compile(i: int) -> Row | str:
    from tools import aot

    j = _POOL_STATE["jobs"][i]
    try:
        r = aot.compile_launch(j.launch, j.arch, options=_POOL_STATE["options"], workdir=_POOL_STATE["workdir"])
    except Exception as e:  # a launch that does not compile is not ready either
        return f"{type(e).__name__}: {e}"
    return Row(r.mma_families, r.registers, r.stack_bytes, r.local_bytes, r.spill_stores, r.spill_loads,
               r.shared_bytes, r.spills)


def compile_jobs(jobs: list[Job], options: dict | None, workers: int):
    """(job, Row or compile-error text) in order, compiled by `workers` forked processes (1: in this one)."""
    with tempfile.TemporaryDirectory(prefix="wan_readiness_") as tmp:
        _POOL_STATE.update(jobs=jobs, options=options, workdir=tmp)
        try:
            if workers <= 1:
                yield from zip(jobs, map(_compile, range(len(jobs))))
                return
            ctx = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                yield from zip(jobs, pool.map(_compile, range(len(jobs))))
        finally:
            _POOL_STATE.clear()


def _demangle(name: str) -> str:
    """Readable kernel name: c++filt (when installed) with template arguments and parameters dropped."""
    import shutil

    if shutil.which("c++filt") is None:
        return name
    out = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
    while True:  # drop innermost <...> / (...) groups until none are left
        stripped = re.sub(r"<[^<>]*>|\([^()]*\)", "", out)
        if stripped == out:
            return out
        out = stripped


def cuda_objects(archs) -> tuple[list[str], list[str]]:
    """(report lines, failures) for the CUDA objects in wan_kernels._C, per arch."""
    from wan_kernels import EXTENSION
    from tools.aot import tool

    if not EXTENSION.loaded:
        return ["_C: not built (" + str(EXTENSION.error) + ")"], []
    import wan_kernels._C as ext

    cuobjdump = str(tool("cuobjdump"))
    elves = subprocess.run([cuobjdump, "--list-elf", ext.__file__], capture_output=True, text=True).stdout
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", ext.__file__], capture_output=True, text=True).stdout
    lines = [f"_C: {ext.__file__}", "  cubins: " + ", ".join(sorted(set(re.findall(r"\.(sm_\w+)\.cubin", elves))))]
    failures = []
    arch, fn = None, None
    for line in usage.splitlines():
        m = re.search(r"arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function\s+(\S+):", line)
        if m:
            fn = m.group(1)
            continue
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", line)
        if m and fn is not None:
            if arch is not None and int(re.sub(r"\D", "", arch)) not in archs:
                continue
            reg, stack, shared, local = map(int, m.groups())
            bad = stack > 0 or local > 0
            name = _demangle(fn)
            short = name if len(name) <= 60 else name[:57] + "..."
            lines.append(f"  {arch or '?':8s} {short:60s} REG {reg:3d} spill {stack + local:5d} shared {shared:6d}"
                         f"{'  <- SPILL' if bad else ''}")
            if bad:
                failures.append(f"_C {arch} {fn}: STACK {stack} LOCAL {local}")
    return lines, failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.readiness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}")
    p.add_argument("--archs", default=",".join(map(str, ARCHS)), help="comma-separated compute capabilities")
    p.add_argument("--quick", action="store_true", help="the first launch of each kernel per arch only")
    p.add_argument("--maxnreg", type=int, help="cap registers of every Triton compile (forces spills when low)")
    p.add_argument("--jobs", type=int, default=2, help="parallel compile processes (default 2)")
    args = p.parse_args(argv)
    kernels = [k for k in args.kernels.split(",") if k]
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        p.error(f"unknown kernels {unknown}; choose from {KERNELS}")
    archs = tuple(int(a) for a in args.archs.split(","))
    bad_arch = [a for a in archs if a not in ARCHS]
    if bad_arch:
        p.error(f"unsupported archs {bad_arch}; choose from {ARCHS}")
    options = {"maxnreg": args.maxnreg} if args.maxnreg else None

    t0 = time.perf_counter()
    jobs = jobs_for(kernels, archs)
    if args.quick:
        seen, quick = set(), []
        for j in jobs:
            if (j.kernel, j.arch, j.gemm_like) not in seen:
                seen.add((j.kernel, j.arch, j.gemm_like))
                quick.append(j)
        jobs = quick
    failures = []
    print(f"{'kernel':13s} {'arch':6s} {'launch':52s} {'MMA':9s} {'REG':>4s} {'spill B':>8s} {'STL/LDL':>8s} "
          f"{'shared B':>9s}  status")
    for j, r in compile_jobs(jobs, options, args.jobs):
        if isinstance(r, str):
            failures.append(f"{j.kernel} sm_{j.arch} {j.config}: compile error {r}")
            print(f"{j.kernel:13s} sm_{j.arch:<3d} {j.config:52s} COMPILE ERROR {r.split(':')[0]}")
            continue
        why = problems(j, r)
        failures += [f"{j.kernel} sm_{j.arch} {j.config}: {w}" for w in why]
        mma_names = ",".join(sorted(r.mma_families)) or "-"
        print(f"{j.kernel:13s} sm_{j.arch:<3d} {j.config:52s} {mma_names:9s} {r.registers:4d} "
              f"{r.stack_bytes + r.local_bytes:8d} {r.spill_stores:>3d}/{r.spill_loads:<4d} {r.shared_bytes:9d}  "
              f"{'; '.join(why) or 'ok'}", flush=True)
    if "cuda" in kernels:
        lines, bad = cuda_objects(archs)
        print("\n".join(lines))
        failures += bad
    print(f"# {len(jobs)} Triton compiles for {', '.join(f'sm_{a}' for a in archs)} in "
          f"{time.perf_counter() - t0:.1f} s ({args.jobs} process(es)); {len(failures)} problem(s)")
    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
