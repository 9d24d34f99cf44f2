"""`python -m tools.format_hashes OUTDIR`: write every checkpoint format this package writes, from seeded tiny
models, and print a sha256 prefix per file: run it on two commits and diff the lists to prove a refactor changed no
byte of any file written (diffusers / original / ComfyUI; NVFP4 in diffusers, ComfyUI, ModelOpt; fp8 in ComfyUI
(both flavours) and per channel; GGUF F16 / BF16 / Q8_0 / Q4_0; a bf16 cast; in-memory NVFP4 / fp8 quantization)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys


def write_all(out: str) -> None:
    import torch

    from wan_model import WanConfig
    from wan_model.cli import main as cli
    from wan_model.testing import random_model

    torch.manual_seed(0)
    for preset in ("tiny-t2v", "tiny-i2v"):
        m = random_model(WanConfig.from_preset(preset), seed=1)
        base = os.path.join(out, preset)
        m.save_pretrained(base + "-diffusers", format="diffusers")
        for fmt in ("original", "comfyui"):
            m.save_pretrained(base + f"-{fmt}.safetensors", format=fmt)
        src = base + "-original.safetensors"
        runs = [[dst, "--format", fmt, "--quantize", q] for fmt, q, dst in (
            ("diffusers", "nvfp4", base + "-nvfp4-diffusers"), ("comfyui", "nvfp4", base + "-nvfp4-comfyui.safetensors"),
            ("modelopt", "nvfp4", base + "-nvfp4-modelopt"), ("comfyui", "fp8", base + "-fp8-comfyui.safetensors"),
            ("comfyui-scaled-fp8", "fp8", base + "-fp8-scaled.safetensors"),
            ("original", "fp8-per-channel", base + "-fp8-rows.safetensors"))]
        runs += [[base + f"-{t}.gguf", "--format", "gguf", "--gguf-type", t] for t in ("F16", "BF16", "Q8_0", "Q4_0")]
        runs += [[base + "-bf16.safetensors", "--format", "original", "--dtype", "bfloat16"]]
        for argv in runs:
            if cli(["convert", src, *argv, "--no-progress"]) != 0:
                raise SystemExit(f"format_hashes: convert {argv} failed")
        (m.quantize("nvfp4") if preset == "tiny-t2v" else m.quantize("fp8")).save_pretrained(
            base + "-quantized.safetensors", format="original")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tools.format_hashes OUTDIR (an absent or empty directory)", file=sys.stderr)
        return 2
    out = argv[0]
    if os.path.exists(out) and os.listdir(out):
        print(f"format_hashes: {out} is not empty", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the CLI's "converted ..." lines
        write_all(out)
    for root, _, files in sorted(os.walk(out)):
        for f in sorted(files):
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                print(os.path.relpath(path, out), hashlib.sha256(fh.read()).hexdigest()[:16])
    return 0


if __name__ == "__main__":
    sys.exit(main())
