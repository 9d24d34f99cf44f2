"""3D rotary position tables of Wan (REFERENCE.md section 4), in the layout the `wan` ops take.

Head channels are split t/h/w = d - 4*(d//6), 2*(d//6), 2*(d//6) (44/42/42 for d = 128); each axis
has its own frequencies theta^(-2i/d_axis). One angle per interleaved pair (x[2i], x[2i+1]), so a
table is [S, d/2]: 22 t-angles, then 21 h-angles, then 21 w-angles. Angles are computed in fp64 and
cos/sin cast to fp32, exactly as diffusers' `WanRotaryPosEmbed`. Token order: frame-major, then
height, then width (the order of the patchified sequence).
"""

from __future__ import annotations

import functools

import torch


def axis_angles(dim: int, max_len: int, theta: float = 10000.0) -> torch.Tensor:
    """fp64 angles [max_len, dim/2]: position p times theta^(-2i/dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)  # [dim/2]
    pos = torch.arange(max_len, dtype=torch.float64)                                          # [max_len]
    return torch.outer(pos, inv_freq)


@functools.lru_cache(maxsize=32)
def _tables(head_dim: int, grid: tuple[int, int, int], max_len: int, theta: float):
    f, h, w = grid
    if max(grid) > max_len:
        raise ValueError(f"latent grid {grid} (after patching) exceeds rope_max_seq_len={max_len}")
    d = head_dim
    dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    # per axis: cos/sin in fp64 -> fp32, as diffusers builds its buffers
    cs = [(torch.cos(a).float(), torch.sin(a).float()) for a in (axis_angles(n, max_len, theta) for n in dims)]

    def grid_table(i: int) -> torch.Tensor:
        t, hh, ww = (c[i] for c in cs)
        t = t[:f, None, None, :].expand(f, h, w, -1)     # [f, h, w, dt/2]
        hh = hh[None, :h, None, :].expand(f, h, w, -1)   # [f, h, w, dh/2]
        ww = ww[None, None, :w, :].expand(f, h, w, -1)   # [f, h, w, dw/2]
        return torch.cat((t, hh, ww), dim=-1).reshape(f * h * w, d // 2).contiguous()  # [S, d/2]

    return grid_table(0), grid_table(1)


def rope_tables(head_dim: int, grid: tuple[int, int, int], max_len: int = 1024, theta: float = 10000.0,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """rope_cos, rope_sin: float32 [S, head_dim/2] for a latent grid (frames, height, width) after
    patching, S = frames*height*width. Cached per (head_dim, grid); do not modify the result in place."""
    cos, sin = _tables(int(head_dim), tuple(int(g) for g in grid), int(max_len), float(theta))
    return _to_device(cos, device), _to_device(sin, device)


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device)
    return t if t.device == device else _device_copy(t, device)


_DEVICE_CACHE: dict = {}


def _device_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    key = (id(t), str(device))
    if key not in _DEVICE_CACHE:
        _DEVICE_CACHE[key] = t.to(device)
    return _DEVICE_CACHE[key]
