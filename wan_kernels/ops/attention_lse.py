"""wan::attention_lse: wan::attention over one key/value set that also returns the log-sum-exp of the scores, the
quantity by which ring attention (wan_model/core/parallel.py) merges the results of key blocks exactly.
Kernels: wan_kernels/ref/attention.py, wan_kernels/triton/attention.py, csrc/attention/attention_cpu.cpp (C++ CPU).
Differentiable in q, k, v with gradients for both outputs (wan_kernels/ops/attention_backward.py)."""

from __future__ import annotations

import torch

from wan_kernels import _autograd, ref, routing
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.attention import attention_set_flops, check_attention
from wan_kernels.triton import attention as triton_attention
from wan_kernels.triton import attention_ws

__all__ = ["attention_lse"]


def check_attention_lse(q, k, v, scale=None) -> None:
    check_attention(q, k, v, None, None, scale)


def fake_attention_lse(q, k, v, scale):
    B, Sq, H, _ = q.shape
    return (q.new_empty((B, Sq, H, v.shape[-1])),
            q.new_empty((B, H, Sq), dtype=torch.promote_types(q.dtype, torch.float32)))


def attention_lse_flops(q_shape, k_shape, v_shape, *args) -> int:
    return attention_set_flops(q_shape, k_shape, v_shape)


def samples_attention_lse(s):
    B, S, H, D = 2, 17, 2, 64
    return s.randn(B, S, H, D), s.randn(B, 7, H, D), s.randn(B, 7, H, D), None


def backward_attention_lse(inputs, grads, needs_input_grad, *, outputs, impl):
    """Gradients of both outputs from the saved (out, lse): wan::attention_backward with delta =
    rowsum(dout * out) - dlse (d lse / d scores = the softmax itself). Double backward: the reference's VJP."""
    if torch.is_grad_enabled():
        return _autograd._vjp("attention_lse", inputs, grads, needs_input_grad)
    q, k, v, scale = inputs
    out, lse = outputs
    dout, dlse = grads
    if dout is None:
        dout = torch.zeros_like(out)
    delta = routing.resolve("attention_delta", impl, q.device)(dout, out, q, None, None, None, scale)[0]
    if dlse is not None:
        delta = delta - dlse
    return (*routing.resolve("attention_backward", impl, q.device)(dout, q, k, v, lse, delta, scale), None)


SPEC = register(OpSpec(
    name="attention_lse",
    schema="attention_lse(Tensor q, Tensor k, Tensor v, float? scale) -> (Tensor out, Tensor lse)",
    check=check_attention_lse, ref=ref.attention_lse, samples=samples_attention_lse, fake=fake_attention_lse,
    differentiable=("q", "k", "v"), backward=backward_attention_lse, save_outputs=True,
    triton=triton_attention.attention_lse, triton_for=attention_ws.triton_for("attention_lse"),
    flops=attention_lse_flops,
))


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
                  impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T s) v and the log-sum-exp of the scores, s = scale or 1/sqrt(D).

    q: [B, Sq, H, D]; k, v: [B, Sk, H, D/Dv]. Returns (out [B, Sq, H, Dv] in q's dtype, lse [B, H, Sq]):
    lse[b, h, i] = logsumexp_n(s * q[b, i, h] . k[b, n, h]), natural log, float32 (float64 for float64 inputs;
    the Triton kernel takes fp16/bf16/fp32 only). Two key blocks' results merge exactly:
    out = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b), lse = lse_a - logsigmoid(lse_a - lse_b).
    """
    return routing.resolve("attention_lse", impl, q.device)(q, k, v, scale)
