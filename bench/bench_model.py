"""Model benchmark: multi-step CFG generation, our WanModel vs diffusers' WanTransformer3DModel.

Same weights, same process, bf16 on CPU by default: dim 512 (4 heads of 128), 4 layers, 1280 latent
tokens (5 x 32 x 32 latents), batch 1 with CFG. Ours: cond+uncond batched in one forward per step,
cross-attention K/V computed once (prepare_context). diffusers: what WanPipeline does, two forwards
per step. Correctness (final latents) is checked before timing is reported; `--profile` prints the
top ops of one of our steps (torch profiler) to show what is left to fuse.

    python bench/bench_model.py [--steps 4] [--dtype bfloat16] [--profile]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import env_header  # noqa: E402
from wan_model.cli import diffusers_euler, random_model  # noqa: E402
from wan_model.config import WanConfig  # noqa: E402
from wan_model.integrations.diffusers import to_diffusers_model  # noqa: E402
from wan_model.sampling import sample  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per model (median reported)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--impl", default="auto")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--grid", default="5x32x32", help="latent frames x height x width (tokens = f*h*w/4)")
    p.add_argument("--profile", action="store_true", help="print the top ops of one of our steps")
    args = p.parse_args()

    dtype = DTYPES[args.dtype]
    f, h, w = (int(v) for v in args.grid.split("x"))
    cfg = WanConfig(num_attention_heads=args.dim // 128, ffn_dim=4 * args.dim, num_layers=args.layers)
    ours = random_model(cfg, seed=0).to_dtype(dtype).set_impl(args.impl).eval()
    ref = to_diffusers_model(ours)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, cfg.in_channels, f, h, w, generator=g)
    text = torch.randn(1, 512, cfg.text_dim, generator=g).to(dtype)
    neg = torch.randn(1, 512, cfg.text_dim, generator=g).to(dtype)
    print(env_header())
    print(f"# Wan dim {cfg.dim}, {cfg.num_layers} layers, {f * (h // 2) * (w // 2)} tokens, text 512 x {cfg.text_dim}, "
          f"{args.steps} steps, CFG 5.0, {args.dtype}, impl={args.impl!r}, {torch.get_num_threads()} threads")

    def run_ours():
        return sample(ours, latents, text, neg, args.steps, 5.0, 5.0, progress=False).latents

    def run_ref():
        return diffusers_euler(ref, latents, text, neg, args.steps, 5.0, 5.0)

    out, out_ref = run_ours(), run_ref()  # warm-up + correctness
    err = (out - out_ref).abs().max().item()
    print(f"# final latents max |ours - diffusers| = {err:.3e} (latent max {out_ref.abs().max().item():.2f})")

    times = {"ours": [], "diffusers": []}
    for _ in range(args.repeats):
        for name, fn in (("ours", run_ours), ("diffusers", run_ref)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    t_ours, t_ref = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    print(f"{'model':<12}{'s / generation':>16}{'ms / step':>12}")
    for name, t in (("ours", t_ours), ("diffusers", t_ref)):
        print(f"{name:<12}{t:>16.3f}{t / args.steps * 1e3:>12.1f}")
    print(f"speedup (diffusers / ours): {t_ref / t_ours:.3f}x")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        ctx = ours.prepare_context(torch.cat([text, neg]))
        x2 = torch.cat([latents, latents]).to(dtype)
        t = torch.full((2,), 500.0)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            ours(x2, t, context=ctx)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
