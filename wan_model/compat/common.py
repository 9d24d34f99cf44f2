"""What checkpoints' layers share across the compatibility layer and the quantization methods: the error a
checkpoint raises, ComfyUI's per-layer quantization marker (`<layer>.comfy_quant`: the NVFP4 and FP8 file layouts
of wan_model/quant write and read it), and row concatenation that keeps float8 bytes. wan_model.compat.layouts
re-exports them (its users import them from there); the methods import them from here, below layouts, so that
layouts can call the methods' hooks."""

from __future__ import annotations

import json

import torch

__all__ = ["CheckpointError", "MARKER_KEY", "cat_rows", "marker_tensor", "parse_marker"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not match the model."""


MARKER_KEY = "comfy_quant"


def marker_tensor(spec: dict) -> torch.Tensor:
    """The uint8 tensor ComfyUI stores as `<layer>.comfy_quant`: the UTF-8 bytes of json.dumps(spec)."""
    return torch.tensor(list(json.dumps(spec).encode()), dtype=torch.uint8)


def parse_marker(t: torch.Tensor, key: str):
    """The JSON value of a `<layer>.comfy_quant` tensor (CheckpointError naming `key` when not JSON)."""
    try:
        spec = json.loads(bytes(t.flatten().to(torch.uint8).tolist()).decode())
    except (ValueError, RecursionError, RuntimeError) as e:
        raise CheckpointError(f"{key}: cannot parse the ComfyUI quantization spec: {e}") from e
    return spec


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along rows, also for float8 tensors (concatenated as their bytes)."""
    if parts[0].dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.cat([p.view(torch.uint8) for p in parts]).view(parts[0].dtype)
    return torch.cat(parts)
