"""Model benchmark: multi-step CFG generation, our WanModel vs diffusers' WanTransformer3DModel.

Same weights, same process, bf16 on CPU by default: dim 512 (4 heads of 128), 4 layers, 1280 latent
tokens (5 x 32 x 32 latents), batch 1 with CFG. Ours: cond+uncond batched in one forward per step,
cross-attention K/V computed once (prepare_context). diffusers: what WanPipeline does, two forwards
per step. Correctness (final latents) is checked before timing is reported. Then a per-op time breakdown
of one of our steps (torch profiler, self CPU time grouped into GEMM / attention / qk_norm_rope / elementwise
and layout), `--profile` adds the top-20 aten ops. With a GPU, `--gpu` (default on when CUDA is available)
times one CFG step (batch 2, context cached) of Wan 1.3B and 14B at 480p and 720p, 81 frames, random bf16
weights, next to the analytic roofline of the same step (wan_model/cost.py) on that GPU.

`--train`: one training step (forward + backward to the input and every weight) instead, ours vs diffusers with the
same weights, without and with gradient checkpointing: time and peak memory (see `train_step_bench`).

    python bench/bench_model.py [--steps 4] [--dtype bfloat16] [--profile] [--gpu | --no-gpu] [--train]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import env_header, quantiles  # noqa: E402
from wan_model.testing import diffusers_euler, random_model  # noqa: E402
from wan_model.core.config import WanConfig  # noqa: E402
from wan_model.core.sampling import sample  # noqa: E402

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
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                   help="per-step latency of Wan 1.3B / 14B at 480p / 720p on the GPU")
    p.add_argument("--train", action="store_true",
                   help="one training step (fwd + bwd) instead: time and peak memory, with and without gradient "
                        "checkpointing, ours vs diffusers (on the GPU with --gpu)")
    args = p.parse_args()

    dtype = DTYPES[args.dtype]
    f, h, w = (int(v) for v in args.grid.split("x"))
    cfg = WanConfig(num_attention_heads=args.dim // 128, ffn_dim=4 * args.dim, num_layers=args.layers)
    if args.train:
        return train_step_bench(cfg, dtype, (f, h, w), args.impl, args.repeats, "cuda" if args.gpu else "cpu")
    from wan_model.compat.diffusers import to_diffusers_model  # needs diffusers

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

    from torch.profiler import ProfilerActivity, profile
    ctx = ours.prepare_context(torch.cat([text, neg]))
    x2 = torch.cat([latents, latents]).to(dtype)
    t = torch.full((2,), 500.0)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        ours(x2, t, context=ctx)
    print(breakdown(prof.key_averages()))
    if args.profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    if args.gpu:
        gpu_step_latency()
    return 0


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created under the mode (CPU has no allocator statistics): every op
    output's storage counts from its creation until it is freed (a weak reference per storage). Covers the
    forward, autograd's backward (it runs under the caller's dispatch modes) and checkpoint's recomputation;
    not the scratch a kernel allocates and frees inside one op (ours and diffusers' alike)."""

    def __init__(self):
        super().__init__()
        self.live = weakref.WeakKeyDictionary()
        self.current = self.peak = 0

    def _freed(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                if st not in self.live:
                    self.live[st] = n = st.nbytes()
                    weakref.finalize(st, self._freed, n)
                    self.current += n
                    self.peak = max(self.peak, self.current)
        return out


def train_step_bench(cfg: WanConfig, dtype: torch.dtype, grid, impl: str, repeats: int, device: str) -> int:
    """One training step, loss = <output, fixed cotangent>, backward to the inputs and every weight: our WanModel
    vs diffusers' WanTransformer3DModel with the same weights, without and with gradient checkpointing (per block,
    non-reentrant, on both). Gradients are compared before timing; runs interleave ours / diffusers per repeat.
    Peak memory: CUDA `max_memory_allocated` above the step's start; CPU `LiveTensorBytes` (one extra run)."""
    from wan_model.compat.diffusers import to_diffusers_model  # needs diffusers

    f, h, w = grid
    ours = random_model(cfg, seed=0).to_dtype(dtype).to(device).set_impl(impl).train()
    ref = to_diffusers_model(ours).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, f, h, w, generator=g).to(device, dtype)
    text = torch.randn(1, 512, cfg.text_dim, generator=g).to(device, dtype)
    t = torch.full((1,), 500.0, device=device)
    cot = torch.randn(x.shape[0], cfg.out_channels, f, h, w, generator=g).to(device)
    print(env_header())
    print(f"# training step: Wan dim {cfg.dim}, {cfg.num_layers} layers, {f * (h // 2) * (w // 2)} tokens, text 512 x "
          f"{cfg.text_dim}, batch 1, {str(dtype)[6:]}, impl={impl!r}, {device}, {torch.get_num_threads()} threads; "
          f"{repeats} interleaved runs per row (median)")

    def step(model):
        model.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        out = model(xi, t, text, return_dict=False)[0]
        (out.float() * cot).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return xi.grad

    def peak(model) -> int:
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(model)
            return torch.cuda.max_memory_allocated() - base
        with LiveTensorBytes() as mode:
            step(model)
        return mode.peak

    print(f"{'checkpointing':<15}{'model':<11}{'ms / step':>11}{'p20':>9}{'p80':>9}{'peak MiB':>10}{'speedup':>9}"
          f"{'memory vs diffusers':>21}")
    for checkpointing in (False, True):
        for m in (ours, ref):
            (m.enable_gradient_checkpointing if checkpointing else m.disable_gradient_checkpointing)()
        got, want = step(ours), step(ref)                           # warm-up + correctness of the input gradient
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        if not err <= (1e-4 if dtype == torch.float32 else 5e-2):
            raise SystemExit(f"input gradients differ: relative error {err:.3e}")
        times = {"ours": [], "diffusers": []}
        for _ in range(repeats):
            for name, m in (("ours", ours), ("diffusers", ref)):
                t0 = time.perf_counter()
                step(m)
                times[name].append((time.perf_counter() - t0) * 1e3)
        peaks = {"ours": peak(ours), "diffusers": peak(ref)}
        q = {name: quantiles(ts) for name, ts in times.items()}
        for name in ("ours", "diffusers"):
            speed = q["diffusers"][0] / q[name][0]
            print(f"{'on' if checkpointing else 'off':<15}{name:<11}{q[name][0]:>11.1f}{q[name][1]:>9.1f}"
                  f"{q[name][2]:>9.1f}{peaks[name] / 2**20:>10.1f}{speed:>8.2f}x"
                  f"{peaks[name] / peaks['diffusers']:>20.2f}x")
        print(f"#   input-gradient relative error ours vs diffusers: {err:.2e}")
    return 0


# aten / wan op name -> breakdown group (first matching prefix wins; the rest is elementwise and layout work)
GROUPS = (("GEMM", ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "aten::convolution",
                    "aten::mkldnn_convolution")),
          ("attention", ("wan::attention", "aten::_softmax", "aten::softmax", "aten::_scaled_dot_product")),
          ("qk_norm_rope", ("wan::qk_norm_rope",)))


def breakdown(events) -> str:
    """Self CPU time of one step grouped by kind of op (leaf ops: self time, so nothing is counted twice)."""
    totals: dict[str, float] = {}
    for e in events:
        group = next((g for g, prefixes in GROUPS if e.key.startswith(prefixes)), "elementwise/layout")
        totals[group] = totals.get(group, 0.0) + e.self_cpu_time_total
    all_us = sum(totals.values()) or 1.0
    lines = ["# per-op time breakdown of one of our steps (batch 2, torch profiler, self CPU time)",
             f"{'group':<20}{'ms':>10}{'share':>8}"]
    for g, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"{g:<20}{us / 1e3:>10.1f}{100 * us / all_us:>7.1f}%")
    return "\n".join(lines)


def gpu_random_model(cfg: WanConfig, device="cuda"):
    """Our WanModel of `cfg` in bf16 on `device`, impl="auto", eval: built on meta and materialized there without a
    default init (a 14B model), then random weights of unit-variance outputs, as random_model does."""
    from wan_model.model import WanModel

    with torch.device("meta"):
        model = WanModel(cfg, impl="auto", device="meta").to_dtype(torch.bfloat16)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for pname, prm in model.named_parameters():
            prm.normal_(1.0 if "norm" in pname else 0.0, 0.02 if prm.ndim < 2 else prm.shape[-1] ** -0.5)
    return model.eval()


def gpu_step_inputs(cfg: WanConfig, latent, device="cuda", batch: int = 2):
    """(x, t, text) of one CFG step: bf16 latents of size `latent` (frames, height, width) and 512
    text tokens, batch 2 (cond + uncond), t = 500."""
    f, lh, lw = latent
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, f, lh, lw, device=device, generator=g, dtype=torch.bfloat16)
    text = torch.randn(batch, 512, cfg.text_dim, device=device, generator=g, dtype=torch.bfloat16)
    t = torch.full((batch,), 500.0, device=device)
    return x, t, text


def gpu_step_latency(presets=("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"), sizes=((832, 480), (1280, 720))) -> None:
    """One CFG step (batch 2, cross-attention K/V cached) per preset and size, bf16 random weights, CUDA events
    (triton.testing.do_bench: median of a few reps). Printed next to the roofline of the step on this GPU."""
    import triton.testing

    from bench.harness import gpu_peak
    from wan_model import cost

    peak = gpu_peak()
    print(f"# GPU per-step latency (CFG batch 2, bf16, 81 frames, impl='auto'); roofline from wan_model/cost.py "
          f"on {peak[0] if peak else 'an unknown GPU'}")
    print(f"{'preset':<18}{'size':>10}{'tokens':>8}{'ms / step':>11}{'roofline ms':>13}{'% of roofline':>15}")
    for name in presets:
        cfg = WanConfig.from_preset(name)
        model = gpu_random_model(cfg)
        for w, h in sizes:
            c = cost.model_cost(cfg, w, h, 81, batch=2)
            x, t, text = gpu_step_inputs(cfg, c.shape.latent)
            with torch.no_grad():
                ctx = model.prepare_context(text)
                ms = triton.testing.do_bench(lambda: model(x, t, context=ctx), warmup=1, rep=1, return_mode="median")
            roof = c.roofline(peak[1], include_context=False) * 1e3 if peak else float("nan")
            print(f"{name:<18}{f'{w}x{h}':>10}{c.shape.tokens:>8}{ms:>11.1f}{roof:>13.1f}{100 * roof / ms:>14.1f}%")
            del x, text, ctx
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
