"""Argument checks of the `wan` ops for the Python paths (reference, Triton, fake impls).

The compiled kernels check the same conditions with TORCH_CHECK (RuntimeError). Every message names
the argument and quotes its shape or dtype.
"""

import torch

from wan_kernels.nvfp4 import BLOCK, scale_shape

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _same_device(op: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but the inputs are on {ref.device}")


def check_qk_norm_rope(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps=None) -> None:
    op = "qk_norm_rope"
    if qkv.dim() != 3 or qkv.shape[2] % 3:
        raise ValueError(f"{op}: qkv must be [B, S, 3*C], got shape {_shape(qkv)}")
    if qkv.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: qkv must be float32/float16/bfloat16, got {qkv.dtype}")
    S, C = qkv.shape[1], qkv.shape[2] // 3
    if num_heads <= 0 or C % num_heads:
        raise ValueError(f"{op}: num_heads={num_heads} does not divide C={C} (qkv shape {_shape(qkv)})")
    D = C // num_heads
    if D % 2:
        raise ValueError(f"{op}: head_dim must be even, got {D}")
    for name, w in (("norm_q_weight", norm_q_weight), ("norm_k_weight", norm_k_weight)):
        if w.dim() != 1 or w.shape[0] != C:
            raise ValueError(f"{op}: {name} must be [{C}], got shape {_shape(w)}")
    for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        if t.shape != (S, D // 2) or t.dtype != torch.float32:
            raise ValueError(f"{op}: {name} must be float32 [S, D/2] = [{S}, {D // 2}], "
                             f"got shape {_shape(t)} dtype {t.dtype}")
    _same_device(op, qkv, norm_q_weight=norm_q_weight, norm_k_weight=norm_k_weight, rope_cos=rope_cos,
                 rope_sin=rope_sin)


def check_qkv_rope(x, w_qkv, b_qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps=None) -> None:
    op = "qkv_rope"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be [B, S, C], got shape {_shape(x)}")
    if w_qkv.dim() != 2 or w_qkv.shape[1] != x.shape[2] or w_qkv.shape[0] % 3:
        raise ValueError(f"{op}: w_qkv must be [3*C, {x.shape[2]}] for x of shape {_shape(x)}, "
                         f"got shape {_shape(w_qkv)}")
    if b_qkv is not None and b_qkv.shape != (w_qkv.shape[0],):
        raise ValueError(f"{op}: b_qkv must be [{w_qkv.shape[0]}], got shape {_shape(b_qkv)}")
    if x.dtype != w_qkv.dtype:
        raise ValueError(f"{op}: x ({x.dtype}) and w_qkv ({w_qkv.dtype}) must have one dtype")
    fake_qkv = torch.empty((x.shape[0], x.shape[1], w_qkv.shape[0]), dtype=x.dtype, device="meta")
    check_qk_norm_rope(fake_qkv, norm_q_weight.to("meta"), norm_k_weight.to("meta"), rope_cos.to("meta"),
                       rope_sin.to("meta"), num_heads)
    _same_device(op, x, w_qkv=w_qkv, b_qkv=b_qkv, norm_q_weight=norm_q_weight, rope_cos=rope_cos)


def check_attention(q, k, v, k_img=None, v_img=None, scale=None) -> None:
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be [B, S, H, D], got shape {_shape(t)}")
        if t.dtype not in FLOAT_DTYPES + (torch.float64,):
            raise ValueError(f"{op}: {name} must be a floating dtype, got {t.dtype}")
    B, _, H, D = q.shape
    pairs = [("k", k, "v", v)]
    if (k_img is None) != (v_img is None):
        raise ValueError(f"{op}: k_img and v_img must be given together "
                         f"(got k_img={None if k_img is None else _shape(k_img)}, "
                         f"v_img={None if v_img is None else _shape(v_img)})")
    if k_img is not None:
        pairs.append(("k_img", k_img, "v_img", v_img))
    for kn, kt, vn, vt in pairs:
        if kt.dim() != 4 or kt.shape[0] != B or kt.shape[2] != H or kt.shape[3] != D:
            raise ValueError(f"{op}: {kn} must be [{B}, Sk, {H}, {D}] for q of shape {_shape(q)}, "
                             f"got shape {_shape(kt)}")
        if vt.dim() != 4 or vt.shape[:3] != kt.shape[:3] or vt.shape[3] != v.shape[3]:
            raise ValueError(f"{op}: {vn} must be [{B}, {kt.shape[1]}, {H}, Dv] matching {kn} {_shape(kt)} "
                             f"and v, got shape {_shape(vt)}")
        if kt.shape[1] == 0:
            raise ValueError(f"{op}: {kn} has no keys (shape {_shape(kt)})")
        if kt.dtype != q.dtype or vt.dtype != q.dtype:
            raise ValueError(f"{op}: {kn}/{vn} dtypes ({kt.dtype}, {vt.dtype}) differ from q's ({q.dtype})")
    _same_device(op, q, k=k, v=v, k_img=k_img, v_img=v_img)


def _check_global_scale(op: str, name: str, gs: torch.Tensor, like: torch.Tensor) -> None:
    if gs.numel() != 1 or gs.dtype != torch.float32:
        raise ValueError(f"{op}: {name} must be a 1-element float32 tensor, got shape {_shape(gs)} dtype {gs.dtype}")
    _same_device(op, like, **{name: gs})


def check_nvfp4_quantize(x, global_scale) -> None:
    op = "nvfp4_quantize"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [M, K], got shape {_shape(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be float32/float16/bfloat16, got {x.dtype}")
    if x.shape[1] % BLOCK:
        raise ValueError(f"{op}: K (x.shape[1]) must be a multiple of 16, got shape {_shape(x)}")
    _check_global_scale(op, "global_scale", global_scale, x)


def _check_packed(op: str, name: str, packed, scale_name: str, block_scale) -> tuple[int, int]:
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"{op}: {name} must be 2-D uint8 [M, K/2], got shape {_shape(packed)} dtype {packed.dtype}")
    m, k = packed.shape[0], packed.shape[1] * 2
    if k % BLOCK:
        raise ValueError(f"{op}: K = 2 * {name}.shape[1] must be a multiple of 16, got {name} shape {_shape(packed)}")
    if block_scale.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{op}: {scale_name} must be float8_e4m3fn, got {block_scale.dtype}")
    if tuple(block_scale.shape) != scale_shape(m, k):
        raise ValueError(f"{op}: {scale_name} must have shape {list(scale_shape(m, k))} (swizzled, padded) "
                         f"for {name} shape {_shape(packed)}, got {_shape(block_scale)}")
    _same_device(op, packed, **{scale_name: block_scale})
    return m, k


def _check_out_dtype(op: str, name: str, dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float32/float16/bfloat16, got {dtype}")


def check_nvfp4_dequantize(packed, block_scale, global_scale, dtype) -> None:
    op = "nvfp4_dequantize"
    _check_packed(op, "packed", packed, "block_scale", block_scale)
    _check_global_scale(op, "global_scale", global_scale, packed)
    _check_out_dtype(op, "dtype", dtype)


def check_nvfp4_gemm(a, a_scale, a_global_scale, b, b_scale, b_global_scale, bias, out_dtype) -> None:
    op = "nvfp4_gemm"
    _, ka = _check_packed(op, "a", a, "a_scale", a_scale)
    n, kb = _check_packed(op, "b", b, "b_scale", b_scale)
    if ka != kb:
        raise ValueError(f"{op}: a {_shape(a)} and b {_shape(b)} disagree on K ({ka} vs {kb}); b is [N, K/2]")
    _check_global_scale(op, "a_global_scale", a_global_scale, a)
    _check_global_scale(op, "b_global_scale", b_global_scale, a)
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{op}: bias must be [{n}], got shape {_shape(bias)}")
    _same_device(op, a, b=b, bias=bias)
    _check_out_dtype(op, "out_dtype", out_dtype)


def check_nvfp4_linear(x, w, w_scale, w_global_scale, bias) -> None:
    op = "nvfp4_linear"
    n, k = _check_packed(op, "w", w, "w_scale", w_scale)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{op}: x must be [..., {k}] for w of shape {_shape(w)} (K = 2 * w.shape[1]), "
                         f"got shape {_shape(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be float32/float16/bfloat16, got {x.dtype}")
    _check_global_scale(op, "w_global_scale", w_global_scale, x)
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{op}: bias must be [{n}], got shape {_shape(bias)}")
    _same_device(op, x, w=w, bias=bias)


def _check_bsc(op: str, name: str, x) -> None:
    if x.dim() != 3:
        raise ValueError(f"{op}: {name} must be [B, S, C], got shape {_shape(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float32/float16/bfloat16, got {x.dtype}")


def _check_modulation(op: str, name: str, t, x) -> None:
    B, S, C = x.shape
    if (t.dtype != torch.float32 or t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] not in (1, S)
            or t.shape[2] != C):
        raise ValueError(f"{op}: {name} must be float32 [{B} or 1, {S} or 1, {C}] for x of shape {_shape(x)}, "
                         f"got shape {_shape(t)} dtype {t.dtype}")
    _same_device(op, x, **{name: t})


def check_layer_norm_modulate(x, scale, shift, eps=None) -> None:
    op = "layer_norm_modulate"
    _check_bsc(op, "x", x)
    _check_modulation(op, "scale", scale, x)
    _check_modulation(op, "shift", shift, x)


def check_gated_residual(x, y, gate) -> None:
    op = "gated_residual"
    _check_bsc(op, "x", x)
    _check_bsc(op, "y", y)
    if y.shape != x.shape:
        raise ValueError(f"{op}: y must have x's shape {_shape(x)}, got {_shape(y)}")
    _check_modulation(op, "gate", gate, x)


CHECKS = {
    "qk_norm_rope": check_qk_norm_rope,
    "qkv_rope": check_qkv_rope,
    "attention": check_attention,
    "nvfp4_quantize": check_nvfp4_quantize,
    "nvfp4_dequantize": check_nvfp4_dequantize,
    "nvfp4_gemm": check_nvfp4_gemm,
    "nvfp4_gemm_sm100": check_nvfp4_gemm,
    "nvfp4_linear": check_nvfp4_linear,
    "layer_norm_modulate": check_layer_norm_modulate,
    "gated_residual": check_gated_residual,
}
