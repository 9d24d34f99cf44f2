"""`python -m wan_model demo | run | convert | cost`.

demo     builds a small random Wan checkpoint (diffusers format) in a temp dir, loads it through our
         loader, runs a few CFG Euler steps on the `wan` ops and compares with diffusers on the same steps
run      the same sampling loop on a real checkpoint (any supported format)
convert  converts a checkpoint between the diffusers / original / comfyui formats (--quantize nvfp4:
         streamed NVFP4 quantization)
cost     analytic FLOPs / bytes / memory per op, layer and forward, roofline per GPU (wan_model/cost.py)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

import wan_kernels
from wan_model.checkpoint import FORMATS, convert_checkpoint, load_model, WanExperts
from wan_model.config import PRESETS, WanConfig
from wan_model.model import WanModel
from wan_model.sampling import flow_sigmas, sample

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _print_routes() -> None:
    table = wan_kernels.route_table()
    classes = list(next(iter(table.values())))
    w = max(map(len, table)) + 2
    print("routing (impl='auto'):")
    print("  " + "op".ljust(w) + "".join(c.ljust(20) for c in classes))
    for op, row in table.items():
        print("  " + op.ljust(w) + "".join(row[c].ljust(20) for c in classes))


def _print_steps(res) -> None:
    for i, (dt, ex) in enumerate(zip(res.step_times, res.experts)):
        print(f"  step {i}: {dt * 1e3:8.1f} ms  ({ex})")
    print(f"  mean {sum(res.step_times) / len(res.step_times) * 1e3:.1f} ms/step")


def random_model(cfg: WanConfig, seed: int = 0) -> WanModel:
    """A WanModel with random weights of a trained-like scale (fp32)."""
    torch.manual_seed(seed)
    model = WanModel(cfg, impl="ref")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
            elif "scale_shift_table" in name or "pos_embed" in name:
                p.normal_(0.0, 0.5)
            else:  # weights: unit-variance outputs
                p.normal_(0.0, p[0].numel() ** -0.5)
    return model


@torch.no_grad()
def diffusers_euler(ref, latents, text, neg, num_steps, guidance, shift, image=None):
    """The same Euler CFG loop with a diffusers WanTransformer3DModel, cond and uncond as two forwards
    (what diffusers' WanPipeline does)."""
    sigmas = flow_sigmas(num_steps, shift)
    x = latents.float()
    dtype = ref.proj_out.weight.dtype
    for i in range(num_steps):
        t = torch.full((x.shape[0],), float(sigmas[i] * 1000))
        v_c = ref(x.to(dtype), t, text.to(dtype), image, return_dict=False)[0].float()
        v_u = ref(x.to(dtype), t, neg.to(dtype), image, return_dict=False)[0].float()
        v = v_u + guidance * (v_c - v_u)
        x = x + float(sigmas[i + 1] - sigmas[i]) * v
    return x


def cmd_demo(args) -> int:
    dtype = DTYPES[args.dtype]
    cfg = WanConfig.from_preset(args.preset)
    if cfg.has_image or cfg.expand_timesteps or cfg.num_experts > 1:
        print(f"demo runs text-to-video presets only; got {args.preset}")
        return 2
    _print_routes()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "wan-demo")
        t0 = time.perf_counter()
        random_model(cfg, args.seed).save_pretrained(path, format="diffusers")
        model = WanModel.from_pretrained(path, dtype=dtype, impl=args.impl)
        print(f"built + saved + loaded a random {args.preset} checkpoint (diffusers format, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) in {time.perf_counter() - t0:.2f} s")
    g = torch.Generator().manual_seed(args.seed)
    f, h, w = args.frames, args.height, args.width
    latents = torch.randn(args.batch, cfg.in_channels, f, h, w, generator=g)
    text = torch.randn(args.batch, args.text_len, cfg.text_dim, generator=g).to(dtype)
    neg = torch.randn(args.batch, args.text_len, cfg.text_dim, generator=g).to(dtype)
    print(f"sampling: latents {tuple(latents.shape)}, {args.steps} steps, CFG {args.guidance} batched, "
          f"dtype {args.dtype}, impl={args.impl!r}")
    res = sample(model, latents, text, neg, args.steps, args.guidance, args.shift, progress=not args.no_progress)
    _print_steps(res)
    try:
        from wan_model.integrations.diffusers import to_diffusers_model
    except ImportError as e:
        print(f"diffusers comparison skipped: {e}")
        return 0
    ref = to_diffusers_model(model)
    t0 = time.perf_counter()
    out_ref = diffusers_euler(ref, latents, text, neg, args.steps, args.guidance, args.shift)
    t_ref = (time.perf_counter() - t0) / args.steps
    diff = (res.latents - out_ref).abs().max().item()
    print(f"diffusers WanTransformer3DModel, same weights and steps: {t_ref * 1e3:.1f} ms/step")
    print(f"max |ours - diffusers| over the final latents: {diff:.3e} (latent max {out_ref.abs().max().item():.2f})")
    return 0


def _load_embeds(path: str | None, key: str, shape, dtype, gen):
    if path is None:
        return torch.randn(*shape, generator=gen).to(dtype)
    from safetensors.torch import load_file
    tensors = load_file(path)
    if key not in tensors:
        raise SystemExit(f"{path}: no tensor {key!r} (has {sorted(tensors)})")
    return tensors[key].to(dtype)


def cmd_run(args) -> int:
    dtype = DTYPES[args.dtype]
    _print_routes()
    t0 = time.perf_counter()
    model = load_model(args.checkpoint, dtype=dtype, device=args.device, impl=args.impl)
    first = model.high if isinstance(model, WanExperts) else model
    cfg = first.config
    print(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f} s: dim {cfg.dim}, {cfg.num_layers} layers, "
          f"{'two experts' if isinstance(model, WanExperts) else 'one expert'}")
    g = torch.Generator().manual_seed(args.seed)
    f = (args.frames - 1) // 4 + 1  # VAE: 4x temporal, 8x spatial (16x for TI2V's VAE)
    down = 16 if cfg.in_channels == 48 else 8
    latents = torch.randn(args.batch, cfg.out_channels, f, args.height // down, args.width // down, generator=g)
    text = _load_embeds(args.embeds, "prompt_embeds", (args.batch, 512, cfg.text_dim), dtype, g)
    neg = _load_embeds(args.embeds, "negative_prompt_embeds", (args.batch, 512, cfg.text_dim), dtype, g)
    cond = None
    if cfg.in_channels > cfg.out_channels:
        cond = torch.zeros(args.batch, cfg.in_channels - cfg.out_channels, *latents.shape[2:])
    img = None
    if cfg.has_image:
        n = 2 * args.batch if cfg.pos_embed_seq_len else args.batch
        img = _load_embeds(args.embeds, "image_embeds", (n, 257, cfg.image_dim), dtype, g)
    res = sample(model, latents.to(args.device), text.to(args.device), neg.to(args.device), args.steps,
                 args.guidance, args.shift, image_embeds=None if img is None else img.to(args.device),
                 condition=None if cond is None else cond.to(args.device))
    _print_steps(res)
    if args.output:
        from safetensors.torch import save_file
        save_file({"latents": res.latents.cpu().contiguous()}, args.output)
        print(f"latents written to {args.output}")
    return 0


def cmd_convert(args) -> int:
    dtype = DTYPES[args.dtype] if args.dtype else None
    nvfp4_config = None
    if args.quantize == "nvfp4":
        from wan_model.quantize import DEFAULT_KEEP, NVFP4Config
        nvfp4_config = NVFP4Config(keep=tuple(args.keep) if args.keep is not None else DEFAULT_KEEP)
    elif args.keep is not None:
        raise SystemExit("--keep needs --quantize nvfp4")
    cfg = convert_checkpoint(args.src, args.dst, args.format, dtype=dtype, max_shard_size=args.max_shard_size,
                             quantize=args.quantize, nvfp4_config=nvfp4_config, progress=not args.no_progress)
    what = ", NVFP4 weights" if args.quantize else ""
    print(f"converted {args.src} -> {args.dst} ({args.format}{what}): dim {cfg.dim}, {cfg.num_layers} layers")
    print(json.dumps(cfg.to_diffusers_config(), sort_keys=True))
    return 0


def cmd_cost(args) -> int:
    from wan_model import cost

    if args.targets:
        print(cost.format_targets(args.target_presets, args.frames))
        return 0
    width, height = (int(v) for v in args.size.lower().split("x"))
    c = cost.model_cost(args.preset, width, height, args.frames, batch=args.batch, impl=args.impl,
                        weight_format=args.weights)
    print(cost.format_report(c, args.steps, not args.no_cfg))
    if args.plot:
        try:
            cost.plot(c, args.plot, args.frames)
        except RuntimeError as e:
            print(f"error: {e}")
            return 2
        print(f"plot written to {args.plot}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wan_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="random tiny checkpoint -> load -> CFG steps on the wan ops vs diffusers")
    d.add_argument("--preset", default="tiny-t2v", choices=[n for n in PRESETS if n.startswith("tiny")])
    d.add_argument("--dtype", default="float32", choices=DTYPES)
    d.add_argument("--impl", default="auto", choices=wan_kernels.IMPLS)
    d.add_argument("--steps", type=int, default=4)
    d.add_argument("--guidance", type=float, default=5.0)
    d.add_argument("--shift", type=float, default=5.0)
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--frames", type=int, default=3, help="latent frames")
    d.add_argument("--height", type=int, default=16, help="latent height")
    d.add_argument("--width", type=int, default=24, help="latent width")
    d.add_argument("--text-len", type=int, default=512)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(fn=cmd_demo)

    r = sub.add_parser("run", help="sample latents with a real checkpoint (no text encoder/VAE: embeddings "
                                   "from --embeds or random)")
    r.add_argument("--checkpoint", required=True, help="diffusers dir, pipeline dir, original or ComfyUI file")
    r.add_argument("--embeds", help="safetensors with prompt_embeds / negative_prompt_embeds [/ image_embeds]")
    r.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--impl", default="auto", choices=wan_kernels.IMPLS)
    r.add_argument("--frames", type=int, default=81)
    r.add_argument("--height", type=int, default=480)
    r.add_argument("--width", type=int, default=832)
    r.add_argument("--steps", type=int, default=40)
    r.add_argument("--guidance", type=float, default=5.0)
    r.add_argument("--shift", type=float, default=5.0)
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--output", help="write the final latents to this safetensors file")
    r.set_defaults(fn=cmd_run)

    c = sub.add_parser("convert", help="convert a checkpoint between formats")
    c.add_argument("src")
    c.add_argument("dst", help="a directory for --format diffusers, else a .safetensors file")
    c.add_argument("--format", required=True, choices=FORMATS)
    c.add_argument("--dtype", choices=DTYPES, help="cast (fp32 modules stay fp32); default: keep")
    c.add_argument("--max-shard-size", default="5GB")
    c.add_argument("--quantize", choices=["nvfp4"], help="quantize the weights on the fly (streamed, one tensor at "
                                                         "a time; see wan_model/quantize.py)")
    c.add_argument("--keep", action="append", metavar="PATTERN",
                   help="with --quantize: fnmatch pattern of diffusers layer names kept in bf16 (repeatable; "
                        "default: the time/text/image embedders and proj_out)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(fn=cmd_convert)

    k = sub.add_parser("cost", help="analytic cost model: FLOPs, bytes, memory, roofline per GPU")
    k.add_argument("--preset", default="wan2.1-t2v-14b", choices=list(PRESETS))
    k.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT in pixels")
    k.add_argument("--frames", type=int, default=81)
    k.add_argument("--steps", type=int, default=40)
    k.add_argument("--batch", type=int, default=1, help="batch of one forward (the table); CFG doubles it "
                                                        "in the end-to-end line")
    k.add_argument("--no-cfg", action="store_true", help="end to end without classifier-free guidance")
    k.add_argument("--impl", default="fused", choices=("fused", "ref"))
    k.add_argument("--weights", default="bf16", choices=("bf16", "fp8", "nvfp4"))
    k.add_argument("--plot", help="PNG path: time share per op per GPU + FLOPs vs resolution (needs matplotlib)")
    k.add_argument("--targets", action="store_true", help="lower bounds on H100/B200 vs the design targets")
    k.add_argument("--target-presets", nargs="*", help="presets of the --targets table (default: all real ones)")
    k.set_defaults(fn=cmd_cost)

    args = p.parse_args(argv)
    return args.fn(args)
