"""Argument-check helpers shared by the ops' checks (each op's own check is in its spec,
wan_kernels/ops/<op>.py). The compiled kernels check the same conditions with TORCH_CHECK (RuntimeError).
Every message names the argument and quotes its shape or dtype.

Scale VALUES (`check_scale_values`, `check_global_scale`, `check_block_scale_values`) are read only where that is
free: Python floats always, tensors when `readable` (a CPU tensor outside tracing). Reading a CUDA tensor's values
forces a device sync and breaks CUDA graph capture and torch.compile; those tensors are checked where they are read
from disk, once (wan_model.io.formats.check_scales), not per call.
"""

import math

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from wan_kernels.nvfp4 import BLOCK, E4M3_NAN, bad_block_scale_bytes, codes_all_zero, scale_shape

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def shape_of(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def same_device(op: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but the inputs are on {ref.device}")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float32/float16/bfloat16, got {t.dtype}")


def check_norm_rope(op: str, qkv_name: str, S: int, C3: int, norm_q_weight, norm_k_weight, rope_cos, rope_sin,
                     num_heads: int) -> None:
    """The operands of qk_norm_rope for a qkv of shape [B, S, C3] (`qkv_name` quotes where it comes from)."""
    C = C3 // 3
    if num_heads <= 0 or C % num_heads:
        raise ValueError(f"{op}: num_heads={num_heads} does not divide C={C} ({qkv_name})")
    D = C // num_heads
    if D % 2:
        raise ValueError(f"{op}: head_dim must be even, got {D}")
    for name, w in (("norm_q_weight", norm_q_weight), ("norm_k_weight", norm_k_weight)):
        if w.dim() != 1 or w.shape[0] != C:
            raise ValueError(f"{op}: {name} must be [{C}], got shape {shape_of(w)}")
        check_float(op, name, w)
    for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        if t.shape != (S, D // 2) or t.dtype != torch.float32:
            raise ValueError(f"{op}: {name} must be float32 [S, D/2] = [{S}, {D // 2}], "
                             f"got shape {shape_of(t)} dtype {t.dtype}")


def readable(t: torch.Tensor) -> bool:
    """Whether reading `t`'s values costs no device sync and breaks no trace: a real CPU tensor, outside
    torch.compile / jit tracing (no fake, meta, functional or other wrapper tensor)."""
    return (t.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not isinstance(t, FakeTensor) and not is_traceable_wrapper_subclass(t)
            and not torch._is_functional_tensor(t))


def first_bad(t: torch.Tensor, bad: torch.Tensor) -> str:
    """"<value>" of the first True of `bad` (a per-tensor scale) or "<value> at [i, j]" (a larger one)."""
    idx = bad.nonzero()[0]
    v = t[tuple(idx.tolist())].item()
    return f"{v}" if t.numel() == 1 else f"{v} at {idx.tolist()}"


def check_scale_values(op: str, name: str, s: torch.Tensor | None) -> None:
    """A decode scale (fp8 w_scale / input_scale) must be finite and > 0: 0 zeroes the layer, a negative one flips
    its sign, NaN / inf poison it. Checked where `readable` (see the module docstring), never with a sync."""
    if s is None or not readable(s):
        return
    f = s.detach().float()
    bad = ~(torch.isfinite(f) & (f > 0))
    if bad.any():
        raise ValueError(f"{op}: {name} must be finite and > 0, got {first_bad(f, bad)}")


def check_global_scale(op: str, name: str, gs: torch.Tensor, like: torch.Tensor, scaled=None) -> None:
    """An NVFP4 per-tensor scale: a 1-element float32 tensor on `like`'s device whose value (where `readable`)
    is finite and > 0, or 0 where that loses nothing: `scaled` (the tensor it scales: x to quantize, or packed
    codes) is all zero, as `nvfp4.global_scale` of an all-zero (or empty) tensor gives 0."""
    if gs.numel() != 1 or gs.dtype != torch.float32:
        raise ValueError(f"{op}: {name} must be a 1-element float32 tensor, got shape {shape_of(gs)} dtype {gs.dtype}")
    same_device(op, like, **{name: gs})
    if not readable(gs):
        return
    v = gs.detach().reshape(()).item()
    if v == 0 and scaled is not None and readable(scaled) and (
            codes_all_zero(scaled) if scaled.dtype == torch.uint8 else not scaled.detach().any()):
        return
    if not (math.isfinite(v) and v > 0):
        what = "" if scaled is None else " (0 only for an all-zero operand)"
        raise ValueError(f"{op}: {name} must be finite and > 0{what}, got {v}")


def as_scale(op: str, name: str, s, like: torch.Tensor):
    """A scale given as a Python float (or int) -> the float32 0-dim tensor on `like`'s device the ops take
    (ValueError naming `name` unless finite and > 0, always: a literal 0 is a mistake, the 0 of an all-zero
    tensor comes from `nvfp4.global_scale` as a tensor); a tensor or None passes unchanged (the op checks it)."""
    if s is None or isinstance(s, torch.Tensor):
        return s
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise ValueError(f"{op}: {name} must be a float32 tensor or a Python float, got {type(s).__name__}")
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"{op}: {name} must be finite and > 0, got {s}")
    return torch.tensor(float(s), dtype=torch.float32, device=like.device)


def check_block_scale_values(op: str, name: str, bs: torch.Tensor) -> None:
    """NVFP4 block scales hold no NaN code (0x7F, 0xFF) and no negative value (see `bad_block_scale_bytes`);
    checked where `readable` (module docstring)."""
    if not readable(bs):
        return
    b = bs.detach().view(torch.uint8)
    bad = bad_block_scale_bytes(b)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        v = b[tuple(idx)].item()
        raise ValueError(f"{op}: {name} holds {'NaN' if v in E4M3_NAN else 'negative'} e4m3 byte 0x{v:02X} at "
                         f"{idx} (block scales are non-negative, NaN codes 0x7F/0xFF refused)")


def check_packed(op: str, name: str, packed, scale_name: str, block_scale) -> tuple[int, int]:
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"{op}: {name} must be 2-D uint8 [M, K/2], got shape {shape_of(packed)} dtype {packed.dtype}")
    m, k = packed.shape[0], packed.shape[1] * 2
    if k % BLOCK:
        raise ValueError(f"{op}: K = 2 * {name}.shape[1] must be a multiple of 16, got {name} shape {shape_of(packed)}")
    if block_scale.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{op}: {scale_name} must be float8_e4m3fn, got {block_scale.dtype}")
    if tuple(block_scale.shape) != scale_shape(m, k):
        raise ValueError(f"{op}: {scale_name} must have shape {list(scale_shape(m, k))} (swizzled, padded) "
                         f"for {name} shape {shape_of(packed)}, got {shape_of(block_scale)}")
    same_device(op, packed, **{scale_name: block_scale})
    check_block_scale_values(op, scale_name, block_scale)
    return m, k


def check_out_dtype(op: str, name: str, dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float32/float16/bfloat16, got {dtype}")


def check_bias(op: str, bias, n: int) -> None:
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"{op}: bias must be [{n}], got shape {shape_of(bias)}")
        check_float(op, "bias", bias)


def check_bsc(op: str, name: str, x) -> None:
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must be [B, S, C], got shape {shape_of(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float32/float16/bfloat16, got {x.dtype}")


def check_modulation(op: str, name: str, t, x) -> None:
    B, S, C = x.shape
    if (t.dtype != torch.float32 or t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] not in (1, S)
            or t.shape[2] != C):
        raise ValueError(f"{op}: {name} must be float32 [{B} or 1, {S} or 1, {C}] for x of shape {shape_of(x)}, "
                         f"got shape {shape_of(t)} dtype {t.dtype}")
    same_device(op, x, **{name: t})
