"""GPU-readiness report without a GPU: `python -m wan_kernels.readiness [--kernels ...] [--archs ...]`.

Compiles ahead of time (wan_kernels/triton/aot.py) every launch config the Triton kernels' own heuristics can
pick, for sm_80 / sm_90 / sm_100, and prints per kernel / config / arch: the tensor-core instruction family in
the PTX, registers, spill bytes (cuobjdump STACK + LOCAL, STL/LDL count) and shared memory. Then lists the CUDA
objects built into `wan_kernels._C` per arch (cuobjdump --list-elf / --dump-resource-usage, the copy bundled
with Triton). Exit status 1 on any spill, or when a GEMM-like kernel (attention, NVFP4 GEMM) lacks its arch's
tensor-core family (mma.sync / wgmma / tcgen05); 0 otherwise.

Configs enumerated (the same as the AOT tests):
  qk_norm_rope  `launch_config(H, D)` over the Wan head counts, the test shapes and one shape per head-tile
                size (tests/test_triton_aot.py), deduplicated; fp32 / fp16 / bf16
  attention     every entry of `CONFIGS` (arch x head_dim x kind; kinds sharing a config share the compile),
                fp16, bf16, and bf16 with the LSE output (tests/test_attention_aot.py)
  nvfp4         `config_space()` (arch x W4A16/W4A4 x tile), fp16 and bf16 for W4A16, fp16 for W4A4; the
                quantize / dequantize kernels in fp32 and bf16 (tests/test_nvfp4_triton_aot.py)
  modulate      layer_norm_modulate / gated_residual at the Wan widths 1536 / 3072 / 5120, fp32 and bf16
                (`modulate.aot_jobs`, tests/test_modulate.py)
`--maxnreg N` caps the registers of every compile (a forced-spill check of the report itself).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import tempfile
import time

import torch

KERNELS = ("qk_norm_rope", "attention", "nvfp4", "modulate", "cuda")
_WORKDIR = [None]  # where cubins go during a run (a temporary directory set by main)
MMA = {80: "mma.sync", 90: "wgmma", 100: "tcgen05"}


@dataclasses.dataclass
class Job:
    kernel: str
    config: str
    arch: int
    gemm_like: bool
    compile: object            # () -> AotResult


def _qk_norm_rope_jobs(archs, options):
    from wan_kernels.triton import aot
    from wan_kernels.triton import qk_norm_rope as tqk

    shapes = [(12, 128), (24, 128), (40, 128), (2, 64), (2, 128), (40, 64), (80, 128), (200, 64)]
    shapes += [(max(1, hb - 1), d) for d in (64, 128) for hb in (1, 2, 4, 8, 16, 32, 64, 128)
               if hb * d <= tqk.MAX_TILE]
    configs = []
    for h, d in shapes:
        cfg = tqk.launch_config(h, d)
        if cfg not in configs:
            configs.append(cfg)
    jobs = []
    for arch in archs:
        for cfg in configs:
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                label = f"H={cfg.H} D={cfg.D} H_BLOCK={cfg.H_BLOCK} chunks={cfg.NUM_CHUNKS} w{cfg.num_warps} " \
                        f"{str(dtype)[6:]}"
                jobs.append(Job("qk_norm_rope", label, arch, False, lambda cfg=cfg, dtype=dtype, arch=arch: aot.compile_aot(
                    tqk.qk_norm_rope_kernel, tqk.aot_signature(dtype), cfg.constexprs(), arch=arch,
                    num_warps=cfg.num_warps, aligned=tqk.AOT_ALIGNED, options=options, workdir=_WORKDIR[0])))
    return jobs


def _attention_jobs(archs, options):
    from wan_kernels.triton import aot
    from wan_kernels.triton import attention as ta

    kinds: dict[tuple, list[str]] = {}
    for (arch, d, kind), cfg in ta.CONFIGS.items():
        kinds.setdefault((arch, d, cfg, kind == "i2v"), []).append(kind)
    jobs = []
    for (arch, d, cfg, img), names in sorted(kinds.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2]))):
        if arch not in archs:
            continue
        for dtype, lse in ((torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)):
            label = f"{'+'.join(names)} hd{d} {cfg} {str(dtype)[6:]}{' lse' if lse else ''}"
            jobs.append(Job("attention", label, arch, True, lambda arch=arch, d=d, cfg=cfg, img=img, dtype=dtype,
                            lse=lse: aot.compile_aot(
                                ta.attention_kernel, ta.aot_signature(dtype),
                                ta.aot_constexprs(d, cfg, img, lse, dtype), arch=arch, num_warps=cfg.num_warps,
                                num_stages=cfg.num_stages, aligned=ta.AOT_ALIGNED, options=options, workdir=_WORKDIR[0])))
    return jobs


def _nvfp4_jobs(archs, options):
    import triton.language as tl

    from wan_kernels.triton import aot
    from wan_kernels.triton import nvfp4 as tnv

    jobs = []
    for arch, a_fp4, cfg in tnv.config_space():
        if arch not in archs:
            continue
        for dt in (("fp16",) if a_fp4 else ("fp16", "bf16")):
            c = dict(cfg)
            warps, stages = c.pop("num_warps"), c.pop("num_stages")
            constexprs = dict(c, A_FP4=a_fp4, HAS_BIAS=True, DOT_DTYPE=tl.float16 if dt == "fp16" else tl.bfloat16)
            label = f"gemm {'w4a4' if a_fp4 else 'w4a16'} {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{warps} " \
                    f"s{stages} {dt}"
            jobs.append(Job("nvfp4", label, arch, True, lambda arch=arch, a_fp4=a_fp4, dt=dt, cx=constexprs, w=warps,
                            s=stages: aot.compile_aot(
                                tnv._nvfp4_gemm_kernel, tnv.aot_gemm_signature(a_fp4, dt), cx, arch=arch, num_warps=w,
                                num_stages=s, options=options, workdir=_WORKDIR[0],
                                aligned=tnv.AOT_GEMM_ALIGNED)))
    blocks = {"BLOCK_M": tnv._QUANT_BLOCK_M, "BLOCK_K": tnv._QUANT_BLOCK_K}
    for arch in archs:
        for dt in ("fp32", "bf16"):
            jobs.append(Job("nvfp4", f"quantize {dt}", arch, False, lambda arch=arch, dt=dt: aot.compile_aot(
                tnv._nvfp4_quantize_kernel,
                {"x_ptr": f"*{dt}", "packed_ptr": "*u8", "scale_ptr": "*u8", "gs_ptr": "*fp32", "M": "i32",
                 "K": "i32", "stride_m": "i32", "stride_k": "i32", "ks_padded": "i32", "BLOCK_M": "constexpr",
                 "BLOCK_K": "constexpr"}, blocks, arch=arch, num_warps=4, options=options, workdir=_WORKDIR[0],
                aligned=("x_ptr", "packed_ptr", "K", "stride_m"))))
            jobs.append(Job("nvfp4", f"dequantize {dt}", arch, False, lambda arch=arch, dt=dt: aot.compile_aot(
                tnv._nvfp4_dequantize_kernel,
                {"packed_ptr": "*u8", "scale_ptr": "*u8", "gs_ptr": "*fp32", "out_ptr": f"*{dt}", "M": "i32",
                 "K": "i32", "ks_padded": "i32", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr"}, blocks, arch=arch,
                num_warps=4, options=options, workdir=_WORKDIR[0], aligned=("packed_ptr", "out_ptr", "K"))))
    return jobs


def _modulate_jobs(archs, options):
    from wan_kernels.triton import aot, modulate

    return [Job("modulate", name, arch, False, lambda arch=arch, k=kernel, sig=sig, cx=cx, w=warps, al=aligned:
                aot.compile_aot(k, sig, cx, arch=arch, num_warps=w, aligned=al, options=options, workdir=_WORKDIR[0]))
            for arch in archs for dtype in ("fp32", "bf16")
            for name, kernel, sig, cx, warps, aligned in modulate.aot_jobs(dtype)]


def problems(job: Job, r) -> list[str]:
    """Why a compiled config is not ready: spills, or no tensor-core path for a GEMM-like kernel."""
    out = []
    if r.spills:
        out.append(f"SPILL (STACK {r.stack_bytes} LOCAL {r.local_bytes} STL/LDL {r.spill_stores}/{r.spill_loads})")
    if job.gemm_like and MMA[job.arch] not in r.mma_families:
        out.append(f"NO TENSOR CORES ({MMA[job.arch]} missing)")
    return out


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
    from wan_kernels.triton.aot import tool

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
    p = argparse.ArgumentParser(prog="python -m wan_kernels.readiness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}")
    p.add_argument("--archs", default="80,90,100", help="comma-separated compute capabilities")
    p.add_argument("--quick", action="store_true", help="the first config of each kernel per arch only")
    p.add_argument("--maxnreg", type=int, help="cap registers of every Triton compile (forces spills when low)")
    args = p.parse_args(argv)
    kernels = [k for k in args.kernels.split(",") if k]
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        p.error(f"unknown kernels {unknown}; choose from {KERNELS}")
    archs = tuple(int(a) for a in args.archs.split(","))
    bad_arch = [a for a in archs if a not in MMA]
    if bad_arch:
        p.error(f"unsupported archs {bad_arch}; choose from {tuple(MMA)}")
    options = {"maxnreg": args.maxnreg} if args.maxnreg else None

    builders = {"qk_norm_rope": _qk_norm_rope_jobs, "attention": _attention_jobs, "nvfp4": _nvfp4_jobs,
                "modulate": _modulate_jobs}
    jobs = [j for k in kernels if k in builders for j in builders[k](archs, options)]
    if args.quick:
        seen, quick = set(), []
        for j in jobs:
            if (j.kernel, j.arch, j.gemm_like) not in seen:
                seen.add((j.kernel, j.arch, j.gemm_like))
                quick.append(j)
        jobs = quick
    t0 = time.perf_counter()
    failures = []
    print(f"{'kernel':13s} {'arch':6s} {'config':52s} {'MMA':9s} {'REG':>4s} {'spill B':>8s} {'STL/LDL':>8s} "
          f"{'shared B':>9s}  status")
    with tempfile.TemporaryDirectory(prefix="wan_readiness_") as tmp:
        _WORKDIR[0] = tmp
        for j in jobs:
            try:
                r = j.compile()
            except Exception as e:  # a config that does not compile is not ready either
                failures.append(f"{j.kernel} sm_{j.arch} {j.config}: compile error {type(e).__name__}: {e}")
                print(f"{j.kernel:13s} sm_{j.arch:<3d} {j.config:52s} COMPILE ERROR {type(e).__name__}")
                continue
            why = problems(j, r)
            failures += [f"{j.kernel} sm_{j.arch} {j.config}: {w}" for w in why]
            mma = ",".join(sorted(r.mma_families)) or "-"
            print(f"{j.kernel:13s} sm_{j.arch:<3d} {j.config:52s} {mma:9s} {r.registers:4d} "
                  f"{r.stack_bytes + r.local_bytes:8d} {r.spill_stores:>3d}/{r.spill_loads:<4d} {r.shared_bytes:9d}  "
                  f"{'; '.join(why) or 'ok'}")
        _WORKDIR[0] = None
    if "cuda" in kernels:
        lines, bad = cuda_objects(archs)
        print("\n".join(lines))
        failures += bad
    print(f"# {len(jobs)} Triton compiles in {time.perf_counter() - t0:.1f} s; "
          f"{len(failures)} problem(s)")
    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
