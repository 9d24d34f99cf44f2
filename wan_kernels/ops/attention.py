"""wan::attention: non-causal attention in [B, S, H, D] layout with an optional image key/value set (Wan I2V).
Kernels: wan_kernels/ref/attention.py, wan_kernels/triton/attention.py, csrc/attention/ (C++ CPU).
Backward: wan_kernels/ops/attention_backward.py (its forward saves each set's log-sum-exp)."""

from __future__ import annotations

import torch

from wan_kernels import _autograd, ref, routing
from wan_kernels._checks import FLOAT_DTYPES, same_device, shape_of
from wan_kernels._spec import OpSpec, register
from wan_kernels.triton import attention as triton_attention
from wan_kernels.triton import attention_ws

__all__ = ["attention"]


def check_attention(q, k, v, k_img=None, v_img=None, scale=None, *, op: str = "attention") -> None:
    """The [B, S, H, D] contract of every attention op (`op`: the name the messages quote)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be [B, S, H, D], got shape {shape_of(t)}")
        if t.dtype not in FLOAT_DTYPES + (torch.float64,):
            raise ValueError(f"{op}: {name} must be a floating dtype, got {t.dtype}")
    B, _, H, D = q.shape
    pairs = [("k", k, "v", v)]
    if (k_img is None) != (v_img is None):
        raise ValueError(f"{op}: k_img and v_img must be given together "
                         f"(got k_img={None if k_img is None else shape_of(k_img)}, "
                         f"v_img={None if v_img is None else shape_of(v_img)})")
    if k_img is not None:
        pairs.append(("k_img", k_img, "v_img", v_img))
    for kn, kt, vn, vt in pairs:
        if kt.dim() != 4 or kt.shape[0] != B or kt.shape[2] != H or kt.shape[3] != D:
            raise ValueError(f"{op}: {kn} must be [{B}, Sk, {H}, {D}] for q of shape {shape_of(q)}, "
                             f"got shape {shape_of(kt)}")
        if vt.dim() != 4 or vt.shape[:3] != kt.shape[:3] or vt.shape[3] != v.shape[3]:
            raise ValueError(f"{op}: {vn} must be [{B}, {kt.shape[1]}, {H}, Dv] matching {kn} {shape_of(kt)} "
                             f"and v, got shape {shape_of(vt)}")
        if kt.shape[1] == 0:
            raise ValueError(f"{op}: {kn} has no keys (shape {shape_of(kt)})")
        if kt.dtype != q.dtype or vt.dtype != q.dtype:
            raise ValueError(f"{op}: {kn}/{vn} dtypes ({kt.dtype}, {vt.dtype}) differ from q's ({q.dtype})")
    same_device(op, q, k=k, v=v, k_img=k_img, v_img=v_img)


def fake_attention(q, k, v, k_img, v_img, scale):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


def attention_set_flops(q_shape, k_shape, v_shape) -> int:
    """q k^T and p v over one key/value set: 2 * B * H * Sq * Sk * (D + Dv) (4 * B * H * Sq * Sk * D for Dv = D).
    The one attention FLOP formula: every attention op's `flops`, the cost model and the benchmarks use it."""
    B, Sq, H, D = q_shape
    return 2 * B * H * Sq * k_shape[1] * (D + v_shape[-1])


def attention_flops(q_shape, k_shape, v_shape, k_img_shape=None, v_img_shape=None, *args) -> int:
    """The text set plus the image set Si."""
    flops = attention_set_flops(q_shape, k_shape, v_shape)
    return flops if k_img_shape is None else flops + attention_set_flops(q_shape, k_img_shape, v_img_shape)


def samples_attention(s):
    B, S, H, D = 2, 17, 2, 64
    return (s.randn(B, S, H, D), s.randn(B, 7, H, D), s.randn(B, 7, H, D), s.randn(B, 5, H, D), s.randn(B, 5, H, D),
            None)


def backward_attention(inputs, grads, needs_input_grad, *, outputs, impl):
    """FlashAttention-2's backward from wan::attention_forward's saved (out, lse [S, B, H, Sq]): the deltas of both
    sets (wan::attention_delta), then wan::attention_backward per set with the same dout; dq = dq_text + dq_img.
    Under grad mode (double backward): the reference's vector-Jacobian product, which is differentiable."""
    if torch.is_grad_enabled():
        return _autograd._vjp("attention", inputs, grads, needs_input_grad)
    q, k, v, k_img, v_img, scale = inputs
    out, lse = outputs
    dout = grads[0]
    delta = routing.resolve("attention_delta", impl, q.device)(dout, out, q, k_img, v_img,
                                                               None if k_img is None else lse[1], scale)
    backward = routing.resolve("attention_backward", impl, q.device)
    dq, dk, dv = backward(dout, q, k, v, lse[0], delta[0], scale)
    if k_img is None:
        return dq, dk, dv, None, None, None
    dq_img, dk_img, dv_img = backward(dout, q, k_img, v_img, lse[1], delta[1], scale)
    return dq + dq_img, dk, dv, dk_img, dv_img, None


SPEC = register(OpSpec(
    name="attention",
    schema="attention(Tensor q, Tensor k, Tensor v, Tensor? k_img, Tensor? v_img, float? scale) -> Tensor",
    check=check_attention, ref=ref.attention, samples=samples_attention, fake=fake_attention,
    differentiable=("q", "k", "v", "k_img", "v_img"), backward=backward_attention, forward_for_grad="attention_forward",
    triton=triton_attention.attention, triton_for=attention_ws.triton_for("attention"), flops=attention_flops,
))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
              v_img: torch.Tensor | None = None, scale: float | None = None, *,
              impl: str = "auto") -> torch.Tensor:
    """Non-causal attention in [B, S, H, D] layout, with an optional image key/value set (Wan I2V).

    Returns softmax(q k^T * s) v + softmax(q k_img^T * s) v_img (two independent softmaxes summed),
    s = scale or 1/sqrt(D). q: [B, Sq, H, D]; k, v: [B, Sk, H, D/Dv]; k_img, v_img: [B, Si, H, D/Dv].
    Output: [B, Sq, H, Dv] in q's dtype.
    """
    return routing.resolve("attention", impl, q.device)(q, k, v, k_img, v_img, scale)
