"""Argument-check helpers shared by the ops' checks (each op's own check is in its spec,
wan_kernels/ops/<op>.py). The compiled kernels check the same conditions with TORCH_CHECK (RuntimeError).
Every message names the argument and quotes its shape or dtype.
"""

import torch

from wan_kernels.nvfp4 import BLOCK, scale_shape

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


def check_global_scale(op: str, name: str, gs: torch.Tensor, like: torch.Tensor) -> None:
    if gs.numel() != 1 or gs.dtype != torch.float32:
        raise ValueError(f"{op}: {name} must be a 1-element float32 tensor, got shape {shape_of(gs)} dtype {gs.dtype}")
    same_device(op, like, **{name: gs})


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
