"""wan::attention_backward: the gradients of one key/value set of softmax attention from the set's saved row
statistics (FlashAttention-2's backward), the backward of wan::attention, wan::attention_lse and, per key block,
of ring attention (wan_model/core/parallel.py). wan::attention_forward: wan::attention that also returns each set's
log-sum-exp, the forward the autograd of wan::attention runs when gradients are needed (wan_kernels/_autograd.py).
Kernels: wan_kernels/ref/attention.py, wan_kernels/triton/attention_bwd.py, wan_kernels/triton/attention.py."""

from __future__ import annotations

import torch

from wan_kernels import ref, routing
from wan_kernels._checks import same_device, shape_of
from wan_kernels._spec import OpSpec, register
from wan_kernels.ops.attention import attention_flops, attention_set_flops, check_attention
from wan_kernels.triton import attention as triton_attention
from wan_kernels.triton import attention_ws
from wan_kernels.triton import attention_bwd as triton_attention_bwd

__all__ = ["attention_backward", "attention_delta", "attention_forward"]


def check_attention_forward(q, k, v, k_img=None, v_img=None, scale=None) -> None:
    check_attention(q, k, v, k_img, v_img, scale)


def fake_attention_forward(q, k, v, k_img, v_img, scale):
    B, Sq, H, _ = q.shape
    return (q.new_empty((B, Sq, H, v.shape[-1])),
            q.new_empty((1 if k_img is None else 2, B, H, Sq), dtype=torch.promote_types(q.dtype, torch.float32)))


def samples_attention_forward(s):
    B, S, H, D = 2, 17, 2, 64
    return (s.randn(B, S, H, D), s.randn(B, 7, H, D), s.randn(B, 7, H, D), s.randn(B, 5, H, D), s.randn(B, 5, H, D),
            None)


FORWARD_SPEC = register(OpSpec(
    name="attention_forward",
    schema="attention_forward(Tensor q, Tensor k, Tensor v, Tensor? k_img, Tensor? v_img, float? scale) "
           "-> (Tensor out, Tensor lse)",
    check=check_attention_forward, ref=ref.attention_forward, samples=samples_attention_forward,
    fake=fake_attention_forward, triton=triton_attention.attention_forward,
    triton_for=attention_ws.triton_for("attention_forward"), flops=attention_flops, cpp=False,
))


def check_attention_backward(dout, q, k, v, lse, delta, scale=None) -> None:
    op = "attention_backward"
    check_attention(q, k, v, None, None, scale)
    B, Sq, H, _ = q.shape
    if dout.shape != (B, Sq, H, v.shape[3]) or dout.dtype != q.dtype:
        raise ValueError(f"{op}: dout must be {q.dtype} [{B}, {Sq}, {H}, {v.shape[3]}] (q {shape_of(q)}, "
                         f"v {shape_of(v)}), got shape {shape_of(dout)} dtype {dout.dtype}")
    stat = torch.promote_types(q.dtype, torch.float32)
    for name, t in (("lse", lse), ("delta", delta)):
        if t.shape != (B, H, Sq) or t.dtype != stat:
            raise ValueError(f"{op}: {name} must be {stat} [B, H, Sq] = [{B}, {H}, {Sq}], "
                             f"got shape {shape_of(t)} dtype {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but the inputs are on {q.device}")
    if dout.device != q.device:
        raise ValueError(f"{op}: dout is on {dout.device} but the inputs are on {q.device}")


def fake_attention_backward(dout, q, k, v, lse, delta, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def attention_backward_flops(dout_shape, q_shape, k_shape, v_shape, *args) -> int:
    """10 * B * H * Sq * Sk * D (D = Dv): q k^T recomputed, dout v^T, p^T dout, ds k, ds^T q."""
    B, Sq, H, D = q_shape
    return 2 * B * H * Sq * k_shape[1] * (3 * D + 2 * v_shape[-1])


def samples_attention_backward(s):
    B, S, H, D, Sk = 2, 17, 2, 64, 7
    q, k, v, dout = s.randn(B, S, H, D), s.randn(B, Sk, H, D), s.randn(B, Sk, H, D), s.randn(B, S, H, D)
    out, lse = ref.attention_lse(q, k, v)
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).to(lse.dtype).contiguous()
    return dout, q, k, v, lse, delta, None


SPEC = register(OpSpec(
    name="attention_backward",
    schema="attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor delta, float? scale) "
           "-> (Tensor dq, Tensor dk, Tensor dv)",
    check=check_attention_backward, ref=ref.attention_backward, samples=samples_attention_backward,
    fake=fake_attention_backward, differentiable=("dout", "q", "k", "v", "lse", "delta"),
    triton=triton_attention_bwd.attention_backward, flops=attention_backward_flops, cpp=False,
))


def check_attention_delta(dout, out, q, k_img=None, v_img=None, lse_img=None, scale=None) -> None:
    op = "attention_delta"
    B, Sq, H, _ = q.shape
    for name, t in (("dout", dout), ("out", out)):
        if t.dim() != 4 or t.shape[:3] != q.shape[:3] or t.dtype != q.dtype:
            raise ValueError(f"{op}: {name} must be {q.dtype} [{B}, {Sq}, {H}, Dv] (q {shape_of(q)}), "
                             f"got shape {shape_of(t)} dtype {t.dtype}")
    if dout.shape != out.shape:
        raise ValueError(f"{op}: dout {shape_of(dout)} and out {shape_of(out)} differ in shape")
    if k_img is not None:
        check_attention(q, k_img, v_img, None, None, scale)
        if v_img.shape[3] != out.shape[3]:
            raise ValueError(f"{op}: v_img {shape_of(v_img)} and out {shape_of(out)} differ in the value dim")
        stat = torch.promote_types(q.dtype, torch.float32)
        if lse_img is None or lse_img.shape != (B, H, Sq) or lse_img.dtype != stat:
            got = "None" if lse_img is None else f"shape {shape_of(lse_img)} dtype {lse_img.dtype}"
            raise ValueError(f"{op}: lse_img must be {stat} [B, H, Sq] = [{B}, {H}, {Sq}] with k_img, got {got}")
    elif v_img is not None:
        raise ValueError(f"{op}: v_img given without k_img")
    same_device(op, q, dout=dout, out=out, k_img=k_img, v_img=v_img, lse_img=lse_img)


def fake_attention_delta(dout, out, q, k_img, v_img, lse_img, scale):
    B, Sq, H, _ = q.shape
    return q.new_empty((1 if k_img is None else 2, B, H, Sq), dtype=torch.promote_types(q.dtype, torch.float32))


def attention_delta_flops(dout_shape, out_shape, q_shape, k_img_shape=None, v_img_shape=None, *args) -> int:
    """4 * B * H * Sq * Si * D over the image keys (q k_img^T and dout v_img^T); the row sums are not matmuls."""
    return 0 if k_img_shape is None else attention_set_flops(q_shape, k_img_shape, v_img_shape)


def samples_attention_delta(s):
    B, S, H, D, Si = 2, 17, 2, 64, 5
    q, k_img, v_img = s.randn(B, S, H, D), s.randn(B, Si, H, D), s.randn(B, Si, H, D)
    return s.randn(B, S, H, D), s.randn(B, S, H, D), q, k_img, v_img, ref.attention_lse(q, k_img, v_img)[1], None


DELTA_SPEC = register(OpSpec(
    name="attention_delta",
    schema="attention_delta(Tensor dout, Tensor out, Tensor q, Tensor? k_img, Tensor? v_img, Tensor? lse_img, "
           "float? scale) -> Tensor",
    check=check_attention_delta, ref=ref.attention_delta, samples=samples_attention_delta,
    fake=fake_attention_delta, triton=triton_attention_bwd.attention_delta, flops=attention_delta_flops, cpp=False,
))


def attention_delta(dout: torch.Tensor, out: torch.Tensor, q: torch.Tensor, k_img: torch.Tensor | None = None,
                    v_img: torch.Tensor | None = None, lse_img: torch.Tensor | None = None,
                    scale: float | None = None, *, impl: str = "auto") -> torch.Tensor:
    """The delta of each key set of an attention output (FlashAttention-2's preprocess): [S, B, H, Sq] fp32
    (fp64 for fp64 inputs). dout, out: [B, Sq, H, Dv] in q's dtype; q: [B, Sq, H, D].
    No image set: S = 1, rowsum(dout * out). With k_img, v_img [B, Si, H, D/Dv] and their lse_img [B, H, Sq]
    (wan::attention_forward's lse[1]): S = 2, [rowsum(dout * out) - delta_img, delta_img], delta_img =
    rowsum(dout * out_img) recomputed over the image keys (out = out_text + out_img, only the sum is kept)."""
    return routing.resolve("attention_delta", impl, q.device)(dout, out, q, k_img, v_img, lse_img, scale)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor | None = None,
                      v_img: torch.Tensor | None = None, scale: float | None = None, *,
                      impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """`wan_kernels.attention` that also returns each key set's log-sum-exp: (out [B, Sq, H, Dv] in q's dtype,
    lse [S, B, H, Sq]), S = 1 without an image set, 2 with one (lse[1]: the image keys'); natural log, fp32
    (fp64 for fp64 inputs)."""
    return routing.resolve("attention_forward", impl, q.device)(q, k, v, k_img, v_img, scale)


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                       delta: torch.Tensor, scale: float | None = None, *,
                       impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of one key/value set of softmax attention, FlashAttention-2's backward.

    dout: [B, Sq, H, Dv] in q's dtype; q: [B, Sq, H, D]; k, v: [B, Sk, H, D/Dv]; lse, delta: [B, H, Sq] fp32
    (fp64 for fp64 inputs). With p = exp(s q k^T - lse), s = scale or 1/sqrt(D):
        dv = p^T dout,  ds = p * (dout v^T - delta),  dq = s ds k,  dk = s ds^T q.
    lse: the natural-log log-sum-exp of the set's scores (wan::attention_lse / attention_forward);
    delta = rowsum(dout * out) of that set's normalised output out ([B, H, Sq], fp32; FlashAttention-2's D).
    Then (dq, dk, dv) are the gradients of <dout, out>; a gradient dlse on lse enters as delta - dlse.
    Ring attention (a key block at a time): with the lse and delta of the MERGED output of all blocks,
    the call for block j returns dk_j, dv_j (that block's gradients) and block j's share of dq; the full dq
    is the sum over blocks. Returns tensors of q's, k's, v's shapes and dtypes, contiguous.
    """
    return routing.resolve("attention_backward", impl, q.device)(dout, q, k, v, lse, delta, scale)
