"""Benchmark of NVFP4: quantize GB/s, GEMM TFLOP/s on Wan shapes, and the streaming checkpoint conversion.

1. wan::nvfp4_quantize (bf16 in): providers cpu (C++ kernel, CPU), cuda / triton (GPU), ref-eager,
   ref-compile. Bytes = read M*K*2 + write M*K/2 (codes) + M*K/16 (scales).
2. GEMMs of Wan 14B (QKV 5120->15360, FFN 5120->13824 and 13824->5120) at M = 32,760 (480p) and 75,600
   (720p) tokens: triton-w4a16 (bf16 activations x NVFP4 weights) and torch-bf16 (dense matmul of the
   dequantized weight, also the correctness reference) on GPU; cutlass-w4a4 (NVFP4 x NVFP4, activations
   quantized beforehand; reference: the W4A4 reference math) on sm100 only. Without a GPU these rows are
   listed as skipped and a small CPU shape of the reference path runs.
3. Streaming `convert --format F --quantize Q` of a SYNTHETIC checkpoint with the real key names and
   shapes of wan2.1-t2v-1.3b (random bf16, ~2.8 GB, written to a temp dir), for each format F of
   --convert-formats and method Q of --convert-quantize (nvfp4, fp8, fp8-per-channel): wall time, peak RSS
   of the converting subprocess (resource.getrusage(RUSAGE_CHILDREN).ru_maxrss), output size / bf16 size.
   Targets (issues 5, 13): peak RSS < 1.5 GiB for every method, size <= 0.29x for nvfp4.

    python bench/bench_nvfp4.py [--quick] [--skip-convert] [--convert-formats F ...] [--convert-quantize Q ...]
        [--json out.json]
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import wan_kernels  # noqa: E402
from bench.harness import Case, Provider, arg_parser, report, run  # noqa: E402
from wan_kernels import nvfp4 as fmt  # noqa: E402
from wan_kernels import ref  # noqa: E402

TOKENS = {"480p": 32760, "720p": 75600}
GEMMS = {"QKV 5120->15360": (15360, 5120), "FFN in 5120->13824": (13824, 5120), "FFN out 13824->5120": (5120, 13824)}


def quantize_bytes(m: int, k: int, elem: int = 2) -> int:
    return m * k * elem + m * k // 2 + m * k // 16


def quantize_cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        shapes = [("weight 5120x5120", 5120, 5120), ("weight 13824x5120", 13824, 5120),
                  ("act 480p 32760x5120", 32760, 5120)]
    else:
        shapes = [("weight 1536x1536", 1536, 1536)] + ([] if quick else [("weight 8960x1536", 8960, 1536)])
    ref_compiled = torch.compile(ref.nvfp4_quantize)
    cases = []
    for label, m, k in shapes:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=torch.bfloat16)
        gs = fmt.global_scale(x)
        providers = [Provider("ref-eager", lambda x=x, gs=gs: ref.nvfp4_quantize(x, gs)),
                     Provider("ref-compile", lambda x=x, gs=gs: ref_compiled(x, gs))]
        if device == "cpu":
            providers.insert(0, Provider("cpu", lambda x=x, gs=gs: wan_kernels.nvfp4_quantize(x, gs, impl="cpu")))
        providers += [Provider("cuda", lambda x=x, gs=gs: wan_kernels.nvfp4_quantize(x, gs, impl="cuda"),
                               gpu_only=True),
                      Provider("triton", lambda x=x, gs=gs: wan_kernels.nvfp4_quantize(x, gs, impl="triton"),
                               gpu_only=True)]
        cases.append(Case(f"quantize {label} bf16", flops=0.0, bytes=quantize_bytes(m, k), providers=providers))
    return cases


def _operands(m: int, n: int, k: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(device)
    wgs = fmt.global_scale(w)
    wq, ws = wan_kernels.nvfp4_quantize(w, wgs)
    return x, wq, ws, wgs


def _cost(op: str, m: int, n: int, k: int) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of one call of `op` ("nvfp4_linear": bf16 x [m, k] by an NVFP4 [n, k] weight;
    "nvfp4_gemm": both operands NVFP4) from its op spec on meta tensors: packed codes, the padded swizzled block
    scales and the global scales read once, the bf16 output written once."""
    from wan_kernels._spec import SPECS

    meta = torch.device("meta")
    w = (torch.empty(n, k // 2, dtype=torch.uint8, device=meta),
         torch.empty(fmt.scale_shape(n, k), dtype=torch.float8_e4m3fn, device=meta), torch.empty((), device=meta))
    if op == "nvfp4_linear":
        args = (torch.empty(m, k, dtype=torch.bfloat16, device=meta), *w, None)
    else:
        a = (torch.empty(m, k // 2, dtype=torch.uint8, device=meta),
             torch.empty(fmt.scale_shape(m, k), dtype=torch.float8_e4m3fn, device=meta), torch.empty((), device=meta))
        args = (*a, *w, None, torch.bfloat16)
    c = SPECS[op].cost(*args)
    return float(c["flops"]), float(c["read"] + c["write"])


def gemm_w4a16_cases(device: str) -> list[Case]:
    """triton-w4a16 and torch-bf16 (reference: dense bf16 matmul of the dequantized weight)."""
    cases = []
    for label, (n, k) in GEMMS.items():
        for res, m in TOKENS.items():
            shape = f"{label} M={m} ({res})"
            flops, nbytes = _cost("nvfp4_linear", m, n, k)
            if device != "cuda":  # GPU-only providers: the harness reports them skipped
                noop = lambda: None  # noqa: E731
                cases.append(Case(shape, flops, nbytes, [Provider("torch-bf16", noop, gpu_only=True),
                                                         Provider("triton-w4a16", noop, gpu_only=True)]))
                continue
            x, wq, ws, wgs = _operands(m, n, k, device)
            wd = wan_kernels.nvfp4_dequantize(wq, ws, wgs, torch.bfloat16)
            cases.append(Case(shape, flops, nbytes, [
                Provider("torch-bf16", lambda x=x, wd=wd: x @ wd.T, gpu_only=True),
                Provider("triton-w4a16", lambda x=x, wq=wq, ws=ws, wgs=wgs: wan_kernels.nvfp4_linear(
                    x, wq, ws, wgs, impl="triton"), gpu_only=True)]))
    return cases


def gemm_w4a4_cases(device: str) -> tuple[list[Case], list[str]]:
    """cutlass-w4a4 (GEMM of pre-quantized operands) vs the W4A4 reference math; sm100 only."""
    notes = []
    sm100 = device == "cuda" and torch.cuda.get_device_capability() == (10, 0)
    if device == "cuda" and not sm100:
        notes.append(f"cutlass-w4a4: needs sm100, this GPU is sm{''.join(map(str, torch.cuda.get_device_capability()))}"
                     " (not run)")
        return [], notes
    cases = []
    for label, (n, k) in GEMMS.items():
        for res, m in TOKENS.items():
            shape = f"{label} M={m} ({res}) w4a4"
            flops, nbytes = _cost("nvfp4_gemm", m, n, k)
            if not sm100:
                cases.append(Case(shape, flops, nbytes, [Provider("cutlass-w4a4", lambda: None, gpu_only=True)],
                                  peak_kind="fp4"))
                continue
            x, wq, ws, wgs = _operands(m, n, k, device)
            xgs = fmt.global_scale(x)
            xq, xs = wan_kernels.nvfp4_quantize(x, xgs)
            args = (xq, xs, xgs, wq, ws, wgs, None, torch.bfloat16)
            cases.append(Case(shape, flops, nbytes, [
                Provider("ref-eager", lambda a=args: ref.nvfp4_gemm(*a)),
                Provider("cutlass-w4a4", lambda a=args: wan_kernels.nvfp4_gemm(*a, impl="cuda"), gpu_only=True)],
                peak_kind="fp4"))
    return cases, notes


def cpu_gemm_cases() -> list[Case]:
    """A small shape of the reference W4A16 path (what the model's impl="ref"/CPU runs)."""
    m, n, k = 256, 1536, 1536
    x, wq, ws, wgs = _operands(m, n, k, "cpu")
    linear_compiled = torch.compile(ref.nvfp4_linear)
    return [Case(f"W4A16 ref M={m} N={n} K={k} (CPU)", *_cost("nvfp4_linear", m, n, k), [
        Provider("ref-eager", lambda: ref.nvfp4_linear(x, wq, ws, wgs, None)),
        Provider("ref-compile", lambda: linear_compiled(x, wq, ws, wgs, None))])]


# ---------------------------------------------------------------------------------------------
# streaming conversion

def write_synthetic_checkpoint(directory: str, preset: str = "wan2.1-t2v-1.3b", shard_bytes: int = 2 << 30) -> int:
    """Random bf16 tensors with the diffusers key names and shapes of `preset` (a diffusers dir with config.json
    and shards of `shard_bytes`), written tensor by tensor. Returns the bytes of the weights."""
    import json

    from wan_model.io.checkpoint import INDEX_NAME, native_to_diffusers
    from wan_model.core.config import WanConfig
    from wan_model.model import WanModel
    from wan_model.io.formats import SafetensorsStreamWriter

    cfg = WanConfig.from_preset(preset)
    meta = native_to_diffusers(dict(WanModel(cfg, impl="ref", device="meta").state_dict()), cfg)
    plan = [(k, torch.bfloat16, tuple(v.shape)) for k, v in sorted(meta.items())]
    shards, cur, size = [], [], 0
    for entry in plan:
        n = math.prod(entry[2]) * 2
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(entry)
        size += n
    shards.append(cur)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsStreamWriter(os.path.join(directory, name), shard, {"format": "pt"})
        for key, dtype, shape in shard:
            t = torch.randn(shape, generator=g).mul_(1.0 / math.sqrt(shape[-1]) if len(shape) == 2 else 1.0)
            w.write(key, t.to(dtype))
            weight_map[key] = name
            total += t.numel() * 2
        w.close()
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_diffusers_config(), f)
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def analytic_size_ratio(preset: str, keep) -> float:
    """NVFP4 bytes / bf16 bytes of the weights for a keep list (0.5625 bytes per quantized weight)."""
    from wan_model.io.checkpoint import native_to_diffusers
    from wan_model.core.config import WanConfig
    from wan_model.model import WanModel
    from wan_model.compat.quantize import NVFP4Config, quantized_groups

    cfg = WanConfig.from_preset(preset)
    meta = native_to_diffusers(dict(WanModel(cfg, impl="ref", device="meta").state_dict()), cfg)
    q = {m for _, ms in quantized_groups(cfg, NVFP4Config(keep=tuple(keep))) for m in ms}
    dense = sum(v.numel() * 2 for v in meta.values())
    out = 0
    for k, v in meta.items():
        if k.endswith(".weight") and k[:-7] in q:
            n, kk = v.shape
            out += n * kk // 2 + math.prod(fmt.scale_shape(n, kk)) + 4
        else:
            out += v.numel() * 2
    return out / dense


def convert_bench(preset: str = "wan2.1-t2v-1.3b", formats=("diffusers",), methods=("nvfp4",)) -> list[str]:
    """Stream-convert one synthetic bf16 checkpoint with each of `methods` in each of `formats`; peak RSS per
    conversion (each conversion is its own subprocess: RUSAGE_CHILDREN is the max over waited children, so the
    conversions run in rising order of that max, and a later one that stays below it is reported as "<= max")."""
    from wan_model.io.formats import REGISTRY
    from wan_model.compat.quantize import DEFAULT_KEEP

    lines = []
    with tempfile.TemporaryDirectory(prefix="wan-nvfp4-bench-") as tmp:
        src = os.path.join(tmp, "bf16")
        os.makedirs(src)
        t0 = time.perf_counter()
        dense = write_synthetic_checkpoint(src, preset)
        lines.append(f"synthetic {preset} checkpoint: {dense / 1e9:.2f} GB bf16 weights "
                     f"({_dir_bytes(src) / 1e9:.2f} GB on disk) written in {time.perf_counter() - t0:.1f} s")
        base = [sys.executable, "-c", "import wan_model.io.checkpoint"]
        subprocess.run(base, check=True)
        import_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        for name, method in ((n, m) for m in methods for n in formats):
            directory = REGISTRY[name].directory
            dst = os.path.join(tmp, name if directory else name + ".safetensors")
            cmd = [sys.executable, "-m", "wan_model", "convert", src, dst, "--format", name, "--quantize", method,
                   "--no-progress"]
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # max over waited children
            rss = f"{peak / 2**30:.2f} GiB" if peak > before else f"<= {peak / 2**30:.2f} GiB"
            out = _dir_bytes(dst) if directory else os.path.getsize(dst)
            ratio = out / _dir_bytes(src)
            size = (f" (target <= 0.29) -> {'PASS' if ratio <= 0.29 else 'FAIL'}" if method == "nvfp4" else "")
            lines.append(f"convert --format {name} --quantize {method}: {wall:.1f} s ({dense / wall / 1e9:.2f} GB/s "
                         f"of bf16 input), peak RSS {rss} (target < 1.5 GiB; `import wan_model.io.checkpoint` alone: "
                         f"{import_rss / 2**30:.2f} GiB) -> {'PASS' if peak < 1.5 * 2**30 else 'FAIL'}; output "
                         f"{out / 1e9:.3f} GB = {ratio:.4f}x of bf16{size}")
            if directory:
                import shutil
                shutil.rmtree(dst)
            else:
                os.unlink(dst)
        kept_time_proj = analytic_size_ratio(preset, DEFAULT_KEEP + ("condition_embedder.time_proj",))
        default = analytic_size_ratio(preset, DEFAULT_KEEP)
        lines.append(f"analytic size {default:.4f}x (default keep); {kept_time_proj:.4f}x if time_proj were kept too")
    return lines


def main() -> int:
    p = arg_parser(__doc__)
    p.add_argument("--skip-convert", action="store_true", help="skip the streaming-conversion benchmark")
    p.add_argument("--convert-formats", nargs="+", default=["diffusers"], metavar="FORMAT",
                   help="formats of the streaming conversion (wan_model.io.formats.FORMATS; e.g. diffusers comfyui "
                        "modelopt original)")
    p.add_argument("--convert-quantize", nargs="+", default=["nvfp4"], choices=("nvfp4", "fp8", "fp8-per-channel"),
                   metavar="METHOD", help="quantization methods of the streaming conversion")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run(quantize_cases(device, args.quick), reference="ref-eager", baseline="ref-compile")
    if device == "cuda":
        # W4A16 == matmul with the dequantized weight: bf16-output rounding (2^-8 relative) and fp32
        # accumulation order only; the harness's 2e-2 tolerance covers it
        rows += run(gemm_w4a16_cases(device), reference="torch-bf16", baseline="torch-bf16")
    else:
        rows += run(gemm_w4a16_cases(device) + cpu_gemm_cases(), reference="ref-eager", baseline="ref-compile")
    w4a4, notes = gemm_w4a4_cases(device)
    rows += run(w4a4, reference="ref-eager", baseline="ref-eager")
    if not args.skip_convert:
        notes += convert_bench(formats=tuple(args.convert_formats), methods=tuple(args.convert_quantize))
    report(rows, args, "NVFP4: quantize (GB/s), GEMM (TFLOP/s), streaming checkpoint conversion", notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
