"""FLOP formulas of the `wan` ops for `torch.utils.flop_counter.FlopCounterMode`.

Importing this module registers them (once per process); `wan_model.cost` imports it lazily, so
`import wan_kernels` stays free of the flop counter. Counted as FlopCounterMode counts aten matmuls:
2 FLOPs per multiply-add of a matrix product, nothing for softmax, norms or elementwise work.

* wan::attention        4 * B * H * Sq * (Sk * D) (q k^T and p v; D = Dv), plus the same over the
                        image keys Si when k_img is given (two independent softmaxes)
* wan::qk_norm_rope     0 (RMSNorm + RoPE: no matrix product; registered so a count says so explicitly)
* wan::nvfp4_gemm(_sm100)  2 * M * N * K, K = 2 * a.shape[1] (two E2M1 values per byte)

`wan::qkv_rope` is a composite (CompositeImplicitAutograd): the counter sees its addmm and its
qk_norm_rope, so it gets no formula of its own (one would count the GEMM twice).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

import wan_kernels  # noqa: F401  (registers the wan namespace)


def attention_flops(q_shape, k_shape, v_shape, k_img_shape=None, v_img_shape=None) -> int:
    """Matmul FLOPs of wan::attention for [B, S, H, D] shapes."""
    B, Sq, H, D = q_shape
    dv = v_shape[-1]
    flops = 2 * B * H * Sq * k_shape[1] * (D + dv)
    if k_img_shape is not None:
        flops += 2 * B * H * Sq * k_img_shape[1] * (D + v_img_shape[-1])
    return flops


@register_flop_formula(torch.ops.wan.attention)
def _attention_formula(q_shape, k_shape, v_shape, k_img_shape=None, v_img_shape=None, *args, out_shape=None,
                       **kwargs) -> int:
    return attention_flops(q_shape, k_shape, v_shape, k_img_shape, v_img_shape)


@register_flop_formula(torch.ops.wan.qk_norm_rope)
def _qk_norm_rope_formula(*args, out_shape=None, **kwargs) -> int:
    return 0


@register_flop_formula([torch.ops.wan.nvfp4_gemm, torch.ops.wan.nvfp4_gemm_sm100])
def _nvfp4_gemm_formula(a_shape, a_scale_shape, a_gs_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    m, k_half = a_shape
    return 2 * m * b_shape[0] * 2 * k_half
