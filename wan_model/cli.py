"""`python -m wan_model demo | run | convert | cost`.

demo     builds a small random Wan checkpoint (diffusers format) in a temp dir, loads it through our
         loader, runs a few CFG Euler steps on the `wan` ops and compares with diffusers on the same steps
run      the same sampling loop on a real checkpoint (any supported format)
convert  converts a checkpoint between the diffusers / original / comfyui formats (--quantize nvfp4:
         streamed NVFP4 quantization) and to GGUF (--format gguf --gguf-type TYPE, streamed)
cost     analytic FLOPs / bytes / memory per op, layer and forward, roofline per GPU (wan_model/cost.py)

run --ulysses U --ring R under torchrun: collectives time out after --dist-timeout seconds (default 300), and each
worker dies with its launcher. Only rank 0 writes --output, atomically (wan_model/io/_atomic.py).

Every argument is checked before any work starts: a bad one prints one line
`python -m wan_model CMD: error: argument --X: why` and exits 2; an unreadable checkpoint (CheckpointError,
ValueError) or a file error prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import math
import os
import re
import signal
import sys
import tempfile
import time

import torch

import wan_kernels
from wan_model.io._atomic import atomic_save
from wan_model.io.checkpoint import FORMATS, REGISTRY, WanExperts, parse_size
from wan_model.io.convert import convert_checkpoint
from wan_model.core.config import PRESETS, WanConfig
from wan_model.io.gguf import GGUF_TYPES
from wan_model.core.model import bind_ops
from wan_model.model import WanModel, load_model
from wan_model.core.sampling import sample
from wan_model.testing import diffusers_euler, random_model

DIST_TIMEOUT_S = 300.0  # run --dist-timeout: torch.distributed's own default is 30 min (gloo) or 10 min (NCCL)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEMO_PRESETS = [n for n, c in PRESETS.items()
                if n.startswith("tiny") and not (c.has_image or c.expand_timesteps or c.num_experts > 1 or c.has_vace)]


# ---------------------------------------------------------------------------------------------
# Argument types: checked at parse time, a bad value is `error: argument --X: why`

class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, `PROG: error: MESSAGE` (no usage block), exit 2.

    A token starting with '-' and a digit or '.' is a value, not an option (no option of ours looks like that):
    `--max-shard-size -5GB` reaches the argument's check ("must be positive") instead of argparse's "expected one
    argument" (whose own negative-number rule knows only plain numbers like -5 or -.5)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._negative_number_matcher = re.compile(r"-\.?\d")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends an option's help with '(default: X)', except where there is none (None, a store_true flag)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def gpu_name(text: str) -> str:
    """A GPU of the peak table (wan_kernels.hardware.PEAKS), case and spaces ignored ("rtx4090" = "RTX 4090")."""
    from wan_kernels.hardware import PEAKS

    key = text.replace(" ", "").lower()
    for name in PEAKS:
        if name.replace(" ", "").lower() == key:
            return name
    raise argparse.ArgumentTypeError(f"unknown GPU {text!r} (choose from {', '.join(PEAKS)})")


def positive_int(s: str) -> int:
    v = _int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def video_frames(s: str) -> int:
    """Frames of a video: 4k + 1 (the VAE's temporal stride is 4)."""
    v = positive_int(s)
    if (v - 1) % 4:
        raise argparse.ArgumentTypeError(f"must be 4k + 1 (e.g. 81; the VAE's temporal stride is 4), got {v}")
    return v


def pixels(s: str) -> int:
    """A video height/width in pixels: a multiple of 16 (VAE stride 8 x patch 2; 32 for TI2V-5B)."""
    v = positive_int(s)
    if v % 16:
        raise argparse.ArgumentTypeError(f"must be a multiple of 16 (VAE stride 8 x patch 2), got {v}")
    return v


def video_size(s: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' in pixels, or Wan's '480p' (832x480) / '720p' (1280x720) -> (width, height)."""
    named = {"480p": (832, 480), "720p": (1280, 720)}
    if s.strip().lower() in named:
        return named[s.strip().lower()]
    parts = s.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels (e.g. 1280x720), got {s!r}")
    return int(parts[0]), int(parts[1])


def finite_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {s!r}")
    return v


def positive_float(s: str) -> float:
    v = finite_float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v:g}")
    return v


def seed(s: str) -> int:
    v = _int(s)
    if not 0 <= v < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {v}")
    return v


def device(s: str) -> torch.device:
    try:
        d = torch.device(s)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected 'cpu', 'cuda' or 'cuda:N', got {s!r}") from None
    if d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected 'cpu', 'cuda' or 'cuda:N', got {s!r}")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{s!r}: CUDA is not available (torch.cuda.is_available() is False)")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{s!r}: there are {torch.cuda.device_count()} CUDA devices")
    return d


def existing_path(s: str) -> str:
    if not os.path.exists(s):
        raise argparse.ArgumentTypeError(f"{s}: no such file or directory")
    return s


def existing_file(s: str) -> str:
    if not os.path.isfile(existing_path(s)):
        raise argparse.ArgumentTypeError(f"{s}: not a regular file")
    return s


def lora_spec(s: str) -> tuple[str, float]:
    """PATH[:SCALE] -> (path, scale); the path exists (a .safetensors file or a diffusers LoRA dir). An
    existing path with a ':' in its name is taken whole (scale 1); otherwise the text after the last ':' is
    the scale: a finite number within fp32's range (the weights it scales are at most fp32)."""
    path, _, tail = s.rpartition(":")
    if not path or os.path.exists(s):
        return existing_path(s), 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s}: the scale after ':' is not a number, got {tail!r} "
                                         "(PATH[:SCALE])") from None
    if not math.isfinite(scale) or abs(scale) > torch.finfo(torch.float32).max:
        raise argparse.ArgumentTypeError(f"{s}: the scale after ':' must be finite in fp32 "
                                         f"(|scale| <= {torch.finfo(torch.float32).max:.4g}), got {tail}")
    return existing_path(path), scale


def output_path(s: str) -> str:
    """A path to write to: its directory exists and is writable."""
    parent = os.path.dirname(os.path.abspath(s))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{s}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{s}: directory {parent} is not writable")
    return s


def output_file(s: str) -> str:
    if os.path.isdir(output_path(s)):
        raise argparse.ArgumentTypeError(f"{s}: is a directory, expected a file path")
    return s


def vram_budget(s: str) -> int:
    """--vram-budget: bytes, or e.g. 12GB, 24GiB (wan_model.core.offload.parse_budget)."""
    from wan_model.core.offload import parse_budget

    try:
        return parse_budget(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def nonnegative_int(s: str) -> int:
    v = _int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {v}")
    return v


def shard_size(s: str) -> int:
    if s.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"must be positive, got {s!r} (bytes, or e.g. 5GB, 200MB)")
    try:
        return parse_size(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _check_impl(args, dev: torch.device) -> None:
    """The named backend runs every op of the model on `dev` (the routing's own check; with --attention int8,
    wan::attention_int8 too)."""
    try:
        bind_ops(args.impl, dev, int8=args.attention == "int8")
    except wan_kernels.BackendUnavailableError as e:
        args.error(f"argument --impl: {e}")


def _refuse_existing(args, path: str, name: str) -> None:
    if os.path.lexists(path) and not args.overwrite:
        args.error(f"argument {name}: {path} exists; pass --overwrite to replace it")


# ---------------------------------------------------------------------------------------------
# Commands

def _print_routes() -> None:
    table = wan_kernels.route_table()
    classes = list(next(iter(table.values())))
    w = max(map(len, table)) + 2
    print("routing (impl='auto'):")
    print("  " + "op".ljust(w) + "".join(c.ljust(20) for c in classes))
    for op, row in table.items():
        print("  " + op.ljust(w) + "".join(row[c].ljust(20) for c in classes))


def _describe_attention(model, kind: str) -> str:
    a = model.attention
    return f"{kind}: roles {'/'.join(a.roles)}, dense layers {list(a.dense_layers)} and each expert's first and the " \
        f"last step, pv {a.pv}"


def _set_attention(args, models) -> None:
    """--attention int8: every expert runs wan::attention_int8 (configured at load, never branched on)."""
    if args.attention != "int8":
        return
    for m in models:
        m.set_attention("int8")
    print(f"attention: {_describe_attention(models[0], 'int8')}")


def _print_steps(res) -> None:
    for i, (dt, ex) in enumerate(zip(res.step_times, res.experts)):
        print(f"  step {i}: {dt * 1e3:8.1f} ms  ({ex})")
    print(f"  mean {sum(res.step_times) / len(res.step_times) * 1e3:.1f} ms/step")


def _with_impl(model, impl: str):
    """Load with "auto", then bind `impl` on the real device: the loader builds its model on "meta",
    where a named backend does not resolve."""
    if impl != "auto":
        for m in (model.high, model.low) if isinstance(model, WanExperts) else (model,):
            m.set_impl(impl)
    return model


def cmd_demo(args) -> int:
    dtype = DTYPES[args.dtype]
    cfg = WanConfig.from_preset(args.preset)
    for name, n, p in zip(("--frames", "--height", "--width"), (args.frames, args.height, args.width), cfg.patch_size):
        if n % p:
            args.error(f"argument {name}: latent size must be a multiple of the patch size {p}, got {n}")
    int8 = args.attention == "int8"
    if int8 and args.impl != "auto":  # the comparison needs wan::attention_int8 on the named backend
        try:
            bind_ops(args.impl, torch.device("cpu"), int8=True)
        except wan_kernels.BackendUnavailableError as e:
            print(f"skipped: the int8 vs bf16 attention comparison ({str(e).splitlines()[0]})")
            int8 = False
    args.attention = "int8" if int8 else "bf16"
    _check_impl(args, torch.device("cpu"))
    _print_routes()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "wan-demo")
        t0 = time.perf_counter()
        random_model(cfg, args.seed).save_pretrained(path, format="diffusers")
        model = _with_impl(WanModel.from_pretrained(path, dtype=dtype, impl="auto"), args.impl)
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
    if args.attention == "int8":
        model.set_attention("int8")
        res8 = sample(model, latents, text, neg, args.steps, args.guidance, args.shift, progress=not args.no_progress)
        model.set_attention("bf16")
        _print_steps(res8)
        d = res8.latents - res.latents
        print(f"int8 attention ({_describe_attention(model, 'int8')}) vs bf16, same weights and steps: "
              f"max |int8 - bf16| over the final latents {d.abs().max().item():.3e}, relative RMS "
              f"{(d.norm() / res.latents.norm()).item():.3e} (latent max {res.latents.abs().max().item():.2f})")
    try:
        from wan_model.compat.diffusers import to_diffusers_model
    except ImportError as e:  # diffusers is the optional extra wan-kernels[diffusers]
        print(f"skipped: the comparison with diffusers' WanTransformer3DModel on the same weights and steps "
              f"(diffusers not importable: {e}; pip install 'wan-kernels[diffusers]')")
        return 0
    ref = to_diffusers_model(model)
    t0 = time.perf_counter()
    out_ref = diffusers_euler(ref, latents, text, neg, args.steps, args.guidance, args.shift)
    t_ref = (time.perf_counter() - t0) / args.steps
    diff = (res.latents - out_ref).abs().max().item()
    print(f"diffusers WanTransformer3DModel, same weights and steps: {t_ref * 1e3:.1f} ms/step")
    print(f"max |ours - diffusers| over the final latents: {diff:.3e} (latent max {out_ref.abs().max().item():.2f})")
    return 0


EMBED_KEYS = ("prompt_embeds", "negative_prompt_embeds")


def _read_embeds(args) -> dict[str, torch.Tensor]:
    """The tensors of --embeds (before the checkpoint loads): the text keys present, floating point."""
    if args.embeds is None:
        return {}
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(args.embeds)
    except (SafetensorError, OSError, RuntimeError) as e:
        args.error(f"argument --embeds: cannot read {args.embeds} as safetensors: {e}")
    missing = [k for k in EMBED_KEYS if k not in tensors]
    if missing:
        args.error(f"argument --embeds: {args.embeds} has no tensor {missing[0]!r} (has {sorted(tensors)})")
    for k, t in tensors.items():
        if k in EMBED_KEYS + ("image_embeds",) and not t.is_floating_point():
            args.error(f"argument --embeds: {k} must be floating point, got {t.dtype}")
    return tensors


def _embeds(args, tensors, key: str, shape, dtype, gen) -> torch.Tensor:
    """tensors[key] checked against `shape` [n, tokens, dim] (any token count), or random of `shape`."""
    if args.embeds is None:
        return torch.randn(*shape, generator=gen).to(dtype)
    if key not in tensors:
        args.error(f"argument --embeds: this checkpoint needs {key!r}; {args.embeds} has {sorted(tensors)}")
    t = tensors[key]
    if t.dim() != 3 or t.shape[0] != shape[0] or t.shape[2] != shape[2] or t.shape[1] == 0:
        args.error(f"argument --embeds: {key} has shape {tuple(t.shape)}, expected [{shape[0]}, tokens, "
                   f"{shape[2]}] (batch {args.batch}, the checkpoint's embedding width)")
    return t.to(dtype)


def _read_control(args) -> torch.Tensor | None:
    """The one tensor of --control (before the checkpoint loads): floating point, [B, C, F, H, W]."""
    if args.control is None:
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(args.control)
    except (SafetensorError, OSError, RuntimeError) as e:
        args.error(f"argument --control: cannot read {args.control} as safetensors: {e}")
    if len(tensors) != 1:
        args.error(f"argument --control: {args.control} must hold one tensor (the control latents), has "
                   f"{len(tensors)}: {sorted(tensors)[:8]}")
    (key, t), = tensors.items()
    if not t.is_floating_point() or t.dim() != 5:
        args.error(f"argument --control: {args.control} tensor {key!r} has shape {tuple(t.shape)} and dtype "
                   f"{t.dtype}, expected floating point [batch, channels, frames, height, width] latents")
    return t


def _check_control(args, control: torch.Tensor | None, cfg, latent_shape) -> torch.Tensor | None:
    """--control against the checkpoint: a VACE checkpoint needs it, another refuses it; its shape must be
    [batch (or 1), vace_in_channels, <= latent frames, latent height, latent width]."""
    if not cfg.has_vace:
        if control is not None:
            args.error(f"argument --control: {args.checkpoint} is not a VACE checkpoint (it has no vace_blocks)")
        return None
    if control is None:
        args.error(f"argument --control: {args.checkpoint} is a VACE checkpoint: pass its control latents "
                   f"(a safetensors file of one [{args.batch}, {cfg.vace_in_channels}, F, H, W] tensor)")
    if args.ulysses * args.ring > 1:
        args.error("argument --ulysses/--ring: sequence parallelism of a VACE checkpoint is not implemented")
    B, _, f, h, w = latent_shape
    c = control
    if c.shape[0] not in (1, B) or c.shape[1] != cfg.vace_in_channels or c.shape[3:] != (h, w) or \
            not 0 < c.shape[2] <= f or c.shape[2] % cfg.patch_size[0]:
        args.error(f"argument --control: {args.control} has shape {tuple(c.shape)}, expected [{B} (or 1), "
                   f"{cfg.vace_in_channels}, F <= {f}, {h}, {w}] (batch, vace_in_channels of the checkpoint, the "
                   "latent frames, height and width of --frames/--height/--width)")
    return c.expand(B, *c.shape[1:])


def _die_with_launcher() -> None:
    """Linux: have the kernel SIGKILL this process when its parent (torchrun's agent, which starts each worker in
    a session of its own, from its main thread: the signal follows the thread that forked) dies, so a killed
    launcher leaves no worker computing (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        raise OSError(ctypes.get_errno(), f"prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent:  # the parent died before the prctl
        os.kill(os.getpid(), signal.SIGKILL)


def _init_parallel(args) -> int:
    """--ulysses/--ring: join the torchrun process group (NCCL on CUDA, one GPU per LOCAL_RANK; gloo on CPU)
    with a timeout of --dist-timeout seconds on every collective, this process dying with its launcher.
    Returns this rank (0 without parallelism)."""
    world = args.ulysses * args.ring
    if world == 1:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # every rank would compute the same run and write --output
            args.error(f"argument --ulysses/--ring: the launcher started WORLD_SIZE={os.environ['WORLD_SIZE']} "
                       f"ranks, but --ulysses {args.ulysses} x --ring {args.ring} = 1: pass degrees whose product "
                       "is the number of ranks, or run one process")
        return 0
    from datetime import timedelta

    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ:
        args.error(f"argument --ulysses/--ring: {args.ulysses} x {args.ring} ranks need a launcher: "
                   f"torchrun --nproc-per-node {world} -m wan_model run ...")
    if int(os.environ["WORLD_SIZE"]) != world:
        args.error(f"argument --ulysses/--ring: {args.ulysses} x {args.ring} = {world} ranks, but torchrun started "
                   f"WORLD_SIZE={os.environ['WORLD_SIZE']}")
    if args.device.type == "cuda":
        args.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(args.device)
    _die_with_launcher()
    dist.init_process_group("nccl" if args.device.type == "cuda" else "gloo",
                            timeout=timedelta(seconds=args.dist_timeout))
    return dist.get_rank()


def _collective_error(e: RuntimeError) -> bool:
    """A failure of torch.distributed (gloo raises plain RuntimeErrors naming its sources)."""
    return isinstance(e, torch.distributed.DistError) or any(s in str(e) for s in ("gloo", "NCCL", "Timed out"))


def cmd_run(args) -> int:
    rank = int(os.environ.get("RANK", 0))
    try:
        rank = _init_parallel(args)
        if rank != 0:  # every rank computes the same full result; rank 0 alone prints and writes it
            import contextlib
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                return _run(args, rank)
        return _run(args, rank)
    except RuntimeError as e:  # a timeout, or a peer that died: one line, exit 1
        if args.ulysses * args.ring == 1 or not _collective_error(e):
            raise
        why = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(e).strip().split("\n")[0].split()))  # no source path
        raise ConnectionError(f"rank {rank}: torch.distributed failed: {why} (--dist-timeout "
                              f"{args.dist_timeout:g} s: another rank stopped, hung or died)") from None


def _run(args, rank: int) -> int:
    dtype = DTYPES[args.dtype]
    if args.output:  # on every rank (same files): all of them stop, none waits in a collective
        _refuse_existing(args, args.output, "--output")
    _check_impl(args, args.device)
    embeds = _read_embeds(args)
    control = _read_control(args)
    _print_routes()
    t0 = time.perf_counter()
    offload = args.blocks_on_device is not None or args.vram_budget is not None  # loaded on the host, see below
    model = load_model(args.checkpoint, dtype=dtype, device="cpu" if offload else args.device, impl="auto")
    model = model if offload else _with_impl(model, args.impl)
    first = model.high if isinstance(model, WanExperts) else model
    cfg = first.config
    print(f"loaded {args.checkpoint} in {time.perf_counter() - t0:.1f} s: dim {cfg.dim}, {cfg.num_layers} layers, "
          f"{'two experts' if isinstance(model, WanExperts) else 'one expert'}")
    down = 16 if cfg.in_channels == 48 else 8  # VAE: 4x temporal, 8x spatial (16x for TI2V's VAE)
    for name, n, p in (("--height", args.height, cfg.patch_size[1]), ("--width", args.width, cfg.patch_size[2])):
        if n % (down * p):
            args.error(f"argument {name}: this checkpoint needs a multiple of {down * p} (VAE stride {down} x patch "
                       f"{p}), got {n}")
    f = (args.frames - 1) // 4 + 1
    if f % cfg.patch_size[0]:
        args.error(f"argument --frames: {args.frames} video frames are {f} latent frames, not a multiple of this "
                   f"checkpoint's temporal patch {cfg.patch_size[0]}")
    control = _check_control(args, control, cfg, (args.batch, cfg.out_channels, f, args.height // down,
                                                  args.width // down))
    if args.lora and isinstance(model, WanExperts):
        args.error("argument --lora: this checkpoint has two experts (Wan2.2 A14B), whose LoRAs come per expert; "
                   "run loads LoRAs into one-expert checkpoints only")
    for path, scale in args.lora or ():
        model.load_lora(path, scale=scale)
        print(f"LoRA {path} fused at scale {scale}")
    _set_attention(args, (model.high, model.low) if isinstance(model, WanExperts) else (model,))
    _enable_offload(args, model)
    if args.ulysses * args.ring > 1:
        for m in (model.high, model.low) if isinstance(model, WanExperts) else (model,):
            m.enable_parallelism(ulysses_degree=args.ulysses, ring_degree=args.ring)
        print(f"sequence parallelism: ulysses {args.ulysses} x ring {args.ring} ranks")
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(args.batch, cfg.out_channels, f, args.height // down, args.width // down, generator=g)
    if args.embeds is None:
        print(f"no --embeds: using RANDOM prompt embeddings [{args.batch}, 512, {cfg.text_dim}] (the latents are "
              "noise, not a video of any prompt; this measures speed)")
    text = _embeds(args, embeds, "prompt_embeds", (args.batch, 512, cfg.text_dim), dtype, g)
    neg = _embeds(args, embeds, "negative_prompt_embeds", (args.batch, 512, cfg.text_dim), dtype, g)
    cond = None
    if cfg.in_channels > cfg.out_channels:
        cond = torch.zeros(args.batch, cfg.in_channels - cfg.out_channels, *latents.shape[2:])
    img = None
    if cfg.has_image:
        n = 2 * args.batch if cfg.pos_embed_seq_len else args.batch
        img = _embeds(args, embeds, "image_embeds", (n, 257, cfg.image_dim), dtype, g)
    vace = {}
    if control is not None:
        vace["control"] = control.to(args.device)
        print(f"control {args.control}: {list(control.shape)} into the VACE layers {list(cfg.vace_layers)}")
    res = sample(model, latents.to(args.device), text.to(args.device), neg.to(args.device), args.steps,
                 args.guidance, args.shift, image_embeds=None if img is None else img.to(args.device),
                 condition=None if cond is None else cond.to(args.device), **vace)
    _print_steps(res)
    if args.output and rank == 0:  # atomically: a kill leaves the old file (--overwrite) or none, never a part
        from safetensors.torch import save_file
        with atomic_save(args.output, None, args.overwrite) as tmp:
            save_file({"latents": res.latents.cpu().contiguous()}, tmp)
        print(f"latents written to {args.output}")
    if args.ulysses * args.ring > 1:
        torch.distributed.destroy_process_group()
    return 0


def _enable_offload(args, model) -> None:
    """--blocks-on-device N / --vram-budget SIZE (with --prefetch): block offload of every expert, and with two
    experts the idle one parked on the host (wan_model/core/offload.py); one line says what is where."""
    if args.blocks_on_device is None and args.vram_budget is None:
        if args.prefetch is not None:
            args.error("argument --prefetch: needs --blocks-on-device or --vram-budget")
        return
    prefetch = 1 if args.prefetch is None else args.prefetch
    try:  # the model was loaded on the host: what runs goes to --device, the streamed blocks never whole
        model.enable_offload(args.blocks_on_device, vram_budget=args.vram_budget, prefetch=prefetch,
                             device=args.device)
    except ValueError as e:
        args.error(f"argument {'--vram-budget' if args.vram_budget is not None else '--blocks-on-device'}: {e}")
    for m in (model.high, model.low) if isinstance(model, WanExperts) else (model,):
        if args.impl != "auto":  # bound on the device now; a parked expert binds it when it comes in
            if m._offload.parked:
                m.impl = args.impl
            else:
                m.set_impl(args.impl)
    first = model.high if isinstance(model, WanExperts) else model
    d = first._offload.describe()
    L = len(first.blocks)
    print(f"offload: {d['blocks_on_device']} of {L} blocks on the device + {prefetch} prefetched: "
          f"{len(d['resident'])} resident, {len(d['streamed'])} streamed from the host through "
          f"{d['slots']} slots of {d['slot_bytes'] / 1e6:.1f} MB; "
          f"{d['fixed_bytes'] / 1e6:.1f} MB outside the blocks"
          + ("; the idle expert parked on the host" if isinstance(model, WanExperts) else ""))


def cmd_convert(args) -> int:
    dtype = DTYPES[args.dtype] if args.dtype else None
    if os.path.exists(args.dst) and os.path.samefile(args.src, args.dst):
        args.error(f"argument dst: {args.dst} is the source checkpoint; convert into another path")
    if args.format == "gguf" or args.gguf_type is not None:
        return _convert_gguf(args, dtype)
    if args.dst.lower().endswith(".gguf"):
        args.error(f"argument dst: {args.dst} is a .gguf path; a GGUF file is written with --format gguf "
                   "--gguf-type TYPE")
    nvfp4_config = None
    if args.quantize is not None:
        from wan_model.compat.quantize import DEFAULT_KEEP, FP8Config, NVFP4Config
        _check_keep(args)
        keep = DEFAULT_KEEP + tuple(p for p in args.keep or () if p not in DEFAULT_KEEP)
        nvfp4_config = NVFP4Config(keep=keep) if args.quantize == "nvfp4" else FP8Config(
            keep=keep, per_channel=args.quantize == "fp8-per-channel")
    elif args.keep is not None:
        args.error("argument --keep: needs --quantize nvfp4 or fp8")
    cfg = convert_checkpoint(args.src, args.dst, args.format, dtype=dtype, max_shard_size=args.max_shard_size,
                             quantize=args.quantize and args.quantize.split("-")[0], nvfp4_config=nvfp4_config, progress=not args.no_progress,
                             overwrite=args.overwrite)
    what = f", {args.quantize.upper()} weights" if args.quantize else ""
    print(f"converted {args.src} -> {args.dst} ({args.format}{what}): dim {cfg.dim}, {cfg.num_layers} layers")
    print(json.dumps(cfg.to_diffusers_config(), sort_keys=True))
    return 0


def _check_keep(args) -> None:
    """Every --keep pattern matches a layer of the source checkpoint (diffusers names, read from its config or
    its safetensors headers): a typo would keep nothing and quantize what it meant to keep."""
    from wan_model.io.source import open_source
    from wan_model.compat.layouts import diffusers_keys

    if not args.keep:
        return
    cfg = open_source(args.src).config()
    layers = sorted({k.removesuffix(".weight") for k in diffusers_keys(cfg) if k.endswith(".weight")})
    for pattern in args.keep:
        if not fnmatch.filter(layers, pattern):
            args.error(f"argument --keep: {pattern!r} matches no layer of {args.src} (fnmatch over diffusers layer "
                       f"names, e.g. 'blocks.0.ffn.*', 'proj_out', 'condition_embedder.*')")


def _convert_gguf(args, dtype) -> int:
    """convert --format gguf --gguf-type TYPE (wan_model.io.convert.convert_gguf: streamed)."""
    from wan_model.io.convert import convert_gguf

    if args.format != "gguf":
        args.error(f"argument --gguf-type: needs --format gguf (got --format {args.format})")
    if args.gguf_type is None:
        args.error(f"argument --gguf-type: --format gguf needs the tensor type, one of {', '.join(GGUF_TYPES)}")
    if not args.dst.lower().endswith(".gguf"):
        args.error(f"argument dst: --format gguf writes one .gguf file, got {args.dst!r}")
    for flag, value in (("--quantize", args.quantize), ("--keep", args.keep)):
        if value is not None:
            args.error(f"argument {flag}: not with --format gguf (--gguf-type chooses the quantization)")
    cfg = convert_gguf(args.src, args.dst, args.gguf_type, dtype=dtype, progress=not args.no_progress,
                       overwrite=args.overwrite)
    print(f"converted {args.src} -> {args.dst} (gguf, {args.gguf_type}): dim {cfg.dim}, {cfg.num_layers} layers")
    print(json.dumps(cfg.to_diffusers_config(), sort_keys=True))
    return 0


def cmd_cost(args) -> int:
    from wan_model import cost

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        args.error("argument --plot: needs matplotlib (in requirements.txt), which is not installed")
    if args.target_presets is not None and not args.targets:
        args.error("argument --target-presets: needs --targets")
    if args.targets:
        print(cost.format_targets(args.target_presets, args.frames, args.ulysses, args.ring))
        return 0
    width, height = args.size
    try:
        cost.latent_shape(WanConfig.from_preset(args.preset), width, height, args.frames)
    except ValueError as e:
        args.error(f"argument --size: {e}")
    c = cost.model_cost(args.preset, width, height, args.frames, batch=args.batch, impl=args.impl,
                        weight_format=args.weights)
    print(cost.format_report(c, args.steps, not args.no_cfg))
    if args.int8:
        print(cost.format_int8(c, args.gpu or "H100"))
    if args.vram_budget is not None:  # the forwards of sampling: batch 2 with CFG
        args.gpu, args.pcie_gbps = args.gpu or "H100", args.pcie_gbps or 25.0
        fwd = c if args.no_cfg or args.batch == 2 else cost.model_cost(
            args.preset, width, height, args.frames, batch=2, impl=args.impl, weight_format=args.weights)
        print(cost.format_offload(cost.offload_plan(fwd, args.gpu, args.vram_budget, args.prefetch, args.pcie_gbps)))
    elif args.pcie_gbps is not None or args.gpu is not None and not args.int8:
        args.error("argument --gpu/--pcie-gbps: needs --vram-budget (--gpu: or --int8)")
    if args.ulysses * args.ring > 1:
        print(cost.format_parallel(c, args.ulysses, args.ring, args.int8))
    if args.plot:
        cost.plot(c, args.plot, args.frames)
        print(f"plot written to {args.plot}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m wan_model", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    fmt = _DefaultsFormatter
    d = sub.add_parser("demo", formatter_class=fmt,
                       help="random tiny checkpoint -> load -> CFG steps on the wan ops vs diffusers (if installed)",
                       description="Sizes are in LATENT units (no VAE runs): a latent frame is 4 video frames, "
                                   "a latent pixel 8x8 video pixels.")
    d.add_argument("--preset", default="tiny-t2v", choices=DEMO_PRESETS, help="model config")
    d.add_argument("--dtype", default="float32", choices=DTYPES, help="weight and activation dtype")
    d.add_argument("--impl", default="auto", choices=wan_kernels.IMPLS, help="backend of every wan op")
    d.add_argument("--attention", default="int8", choices=("bf16", "int8"),
                   help="int8 (default): sample again with 8-bit attention (wan::attention_int8) and print its latent "
                        "difference from bf16; bf16: skip that comparison")
    d.add_argument("--steps", type=positive_int, default=4, help="Euler denoising steps")
    d.add_argument("--guidance", type=finite_float, default=5.0, help="classifier-free guidance scale")
    d.add_argument("--shift", type=positive_float, default=5.0, help="flow-matching sigma shift")
    d.add_argument("--batch", type=positive_int, default=1, help="samples per step (CFG doubles the forward batch)")
    d.add_argument("--frames", type=positive_int, default=3, help="latent frames")
    d.add_argument("--height", type=positive_int, default=16, help="latent height, a multiple of the patch (2)")
    d.add_argument("--width", type=positive_int, default=24, help="latent width, a multiple of the patch (2)")
    d.add_argument("--text-len", type=positive_int, default=512, help="text tokens of the random prompt embeddings")
    d.add_argument("--seed", type=seed, default=0, help="seed of the weights, latents and embeddings")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(fn=cmd_demo, error=d.error, prog=d.prog)

    r = sub.add_parser("run", formatter_class=fmt,
                       help="sample latents with a real checkpoint (no text encoder/VAE: embeddings from --embeds "
                            "or random)",
                       description="Sizes are in VIDEO units (pixels, frames); the latents are 4x fewer frames and "
                                   "8x (TI2V-5B: 16x) smaller. Without --embeds the prompt embeddings are random.")
    r.add_argument("--checkpoint", required=True, type=existing_path,
                   help="diffusers dir, pipeline dir, original or ComfyUI file")
    r.add_argument("--lora", type=lora_spec, action="append", metavar="PATH[:SCALE]",
                   help="fuse a LoRA (diffusers, original/ComfyUI or kohya/musubi naming) into the weights at SCALE "
                        "(default 1); repeatable: the LoRAs stack")
    r.add_argument("--embeds", type=existing_file,
                   help="safetensors with prompt_embeds / negative_prompt_embeds [/ image_embeds]; "
                        "without it they are random (the output is noise, not a video of a prompt)")
    r.add_argument("--control", type=existing_file,
                   help="VACE checkpoints: a safetensors file of one tensor, the control latents [batch (or 1), "
                        "vace_in_channels, F, H, W] in latent units (WanVACEPipeline's conditioning latents: "
                        "video + mask), given to both CFG halves")
    r.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weight and activation dtype")
    r.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda if available, else cpu")
    r.add_argument("--impl", default="auto", choices=wan_kernels.IMPLS, help="backend of every wan op")
    r.add_argument("--attention", default="bf16", choices=("bf16", "int8"),
                   help="bf16: wan::attention; int8: wan::attention_int8 (SageAttention2-class, opt-in) except "
                        "layer 0, each expert's first step and the last step")
    r.add_argument("--frames", type=video_frames, default=81, help="video frames, 4k + 1")
    r.add_argument("--height", type=pixels, default=480, help="video height in pixels, a multiple of 16")
    r.add_argument("--width", type=pixels, default=832, help="video width in pixels, a multiple of 16")
    r.add_argument("--steps", type=positive_int, default=40, help="Euler denoising steps")
    r.add_argument("--guidance", type=finite_float, default=5.0, help="classifier-free guidance scale")
    r.add_argument("--shift", type=positive_float, default=5.0, help="flow-matching sigma shift")
    r.add_argument("--batch", type=positive_int, default=1, help="videos per step (CFG doubles the forward batch)")
    r.add_argument("--seed", type=seed, default=0, help="seed of the latents (and of random embeddings)")
    off = r.add_mutually_exclusive_group()
    off.add_argument("--blocks-on-device", type=positive_int, metavar="N",
                     help="block offload: at most N blocks' weights on the device (+ --prefetch in flight), the "
                          "others streamed from one host copy (bit-identical output; wan_model/core/offload.py)")
    off.add_argument("--vram-budget", type=vram_budget, metavar="SIZE",
                     help="block offload: N from a weight budget, e.g. 12GB (the tensors outside the blocks + "
                          "N + prefetch block slots; activations come on top)")
    r.add_argument("--prefetch", type=nonnegative_int, metavar="K",
                   help="with offload: blocks copied ahead while one runs (default 1)")
    r.add_argument("--output", type=output_file, help="write the final latents to this safetensors file")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    r.add_argument("--ulysses", type=positive_int, default=1,
                   help="sequence parallelism: Ulysses degree (launch U x R ranks with torchrun --nproc-per-node)")
    r.add_argument("--ring", type=positive_int, default=1, help="sequence parallelism: ring-attention degree")
    r.add_argument("--dist-timeout", type=positive_float, default=DIST_TIMEOUT_S, metavar="SECONDS",
                   help="with --ulysses/--ring: a collective (or the start-up rendezvous) waiting longer than this "
                        "for another rank fails the run (gloo: one line; NCCL: torch's watchdog ends the process); "
                        "it must exceed the difference between the ranks' checkpoint loading times. Workers also "
                        "die with their launcher (Linux)")
    r.set_defaults(fn=cmd_run, error=r.error, prog=r.prog)

    c = sub.add_parser("convert", help="convert a checkpoint between formats")
    c.add_argument("src", type=existing_path)
    c.add_argument("dst", type=output_path, help="a directory for --format " + "/".join(
        n for n in FORMATS if REGISTRY[n].directory) + ", a .gguf file for gguf, else a .safetensors file")
    c.add_argument("--format", required=True, choices=FORMATS + ("gguf",),
                   help="the formats written (wan_model.io.formats.REGISTRY, and gguf: wan_model/io/gguf.py); every one "
                        "of them and lightx2v is read")
    c.add_argument("--gguf-type", choices=GGUF_TYPES,
                   help="with --format gguf: the type of the linear weights (1-D, modulation, patch embedding and "
                        "time embedding stay F32; see wan_model/io/gguf.py)")
    c.add_argument("--dtype", choices=DTYPES, help="cast (fp32 modules stay fp32); default: keep")
    c.add_argument("--max-shard-size", type=shard_size, default="5GB", help="bytes, or e.g. 5GB, 200MB")
    c.add_argument("--quantize", choices=["nvfp4", "fp8", "fp8-per-channel"],
                   help="quantize the weights on the fly (streamed, one tensor at a time; see wan_model/io/checkpoint.py "
                        "convert_nvfp4); fp8: e4m3 with one scale per tensor (ComfyUI's), fp8-per-channel: per row")
    c.add_argument("--keep", action="append", metavar="PATTERN",
                   help="with --quantize: fnmatch pattern of diffusers layer names kept unquantized (repeatable), "
                        "ADDED to the default keep list (the time/text/image embedders and proj_out, which are "
                        "always kept); a pattern matching no layer of SRC is an error")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing destination (only a checkpoint's own files are replaced)")
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(fn=cmd_convert, error=c.error, prog=c.prog)

    from wan_kernels.hardware import PEAKS

    k = sub.add_parser("cost", help="analytic cost model: FLOPs, bytes, memory, roofline per GPU")
    k.add_argument("--preset", default="wan2.1-t2v-14b", choices=list(PRESETS))
    k.add_argument("--size", type=video_size, default="1280x720", help="WIDTHxHEIGHT in pixels, or 480p / 720p")
    k.add_argument("--frames", type=video_frames, default=81)
    k.add_argument("--steps", type=positive_int, default=40)
    k.add_argument("--batch", type=positive_int, default=1, help="batch of one forward (the table); CFG doubles it "
                                                                 "in the end-to-end line")
    k.add_argument("--no-cfg", action="store_true", help="end to end without classifier-free guidance")
    k.add_argument("--impl", default="fused", choices=("fused", "ref"))
    k.add_argument("--weights", default="bf16", choices=("bf16", "fp8", "nvfp4"))
    k.add_argument("--plot", type=output_file,
                   help="PNG path: time share per op per GPU + FLOPs vs resolution (needs matplotlib)")
    k.add_argument("--targets", action="store_true", help="lower bounds on H100/B200 vs the design targets")
    k.add_argument("--target-presets", nargs="*", choices=list(PRESETS),
                   help="presets of the --targets table (default: all real ones)")
    k.add_argument("--ulysses", type=positive_int, default=1,
                   help="also print sequence-parallel communication and predicted scaling (Ulysses degree)")
    k.add_argument("--ring", type=positive_int, default=1, help="ring-attention degree (with --ulysses)")
    k.add_argument("--vram-budget", type=vram_budget, metavar="SIZE",
                   help="also print the block-offload plan for this budget (e.g. 12GB): per block transfer vs "
                        "compute, whether prefetch hides it, step time, peak VRAM, the smallest hiding budget")
    k.add_argument("--gpu", type=gpu_name, metavar="GPU",
                   help=f"with --vram-budget: the GPU of the plan (default H100): {', '.join(PEAKS)} (case and "
                        "spaces ignored: rtx4090)")
    k.add_argument("--pcie-gbps", type=positive_float, metavar="GB/S",
                   help="with --vram-budget: pinned host-to-device bandwidth (default 25, PCIe 4 x16)")
    k.add_argument("--prefetch", type=nonnegative_int, default=1, help="with --vram-budget: blocks in flight")
    k.add_argument("--int8", action="store_true",
                   help="also print what 8-bit attention's Q/K/V quantization moves per role vs its attention time "
                        "(on --gpu, default H100)")
    k.set_defaults(fn=cmd_cost, error=k.error, prog=k.prog)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, wan_kernels.BackendUnavailableError, OSError) as e:  # CheckpointError is a ValueError
        print(f"{args.prog}: error: {e}", file=sys.stderr)
        return 1
