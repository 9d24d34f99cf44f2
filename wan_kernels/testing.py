"""What tests, benchmarks and the GPU check share to judge a kernel's numbers: the tolerance table per dtype and the
2x-SDPA accuracy rule of attention (flash-attention's rule) with its fp32 rounding floor. Layer 0: imports only
torch and wan_kernels.

The rule (issue 4): a kernel's error against an fp64 reference on the same rounded inputs is at most 2x the error
plain torch makes at the inputs' precision (attention: SDPA, `sdpa_per_set`; gradients: the reference's autograd in
the same dtype, `rel_err`), plus a floor so that torch being lucky on a small tensor does not fail us
(attention: `fp32_rounding_floor`; gradients: `TOLERANCE[dtype].rounding`).
"""

from __future__ import annotations

import dataclasses

import torch

from wan_kernels import ref


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """The bounds of one dtype. Each field is one rule, used where its docstring line says.

    ulp       one unit in the last place at 1.0 (2^-mantissa bits): a result rounded to the dtype twice, or by two
              computations that straddle a rounding boundary, differs by up to one ulp relative
              (tests/test_nvfp4_linear.py); `ulp / 2` (`half_ulp`) is one correct rounding
              (tests/test_nvfp4_triton.py's dequantization).
    rounding  the 2x rule's additive floor for gradients (tests/test_*grad.py): one rounding of the gradient's
              dtype relative to its largest entry: half an ulp for fp16 / bf16; fp32 1e-6 (~17 fp32 unit
              roundoffs: the reductions' fp32 accumulation order, not the dtype's last rounding, dominates).
    atol/rtol backend vs reference on the same inputs, |got - want| <= atol + rtol |want| (tools/gpu_check.py's
              ops section): the kernels compute in fp32 and round once, so about one ulp of the output dtype
              (x2 for reductions / accumulation order); fp32 allows TF32-free accumulation-order differences.
    """

    ulp: float
    rounding: float
    atol: float
    rtol: float

    @property
    def half_ulp(self) -> float:
        return self.ulp / 2


TOLERANCE = {
    torch.float32: Tolerance(ulp=2.0**-23, rounding=1e-6, atol=2e-4, rtol=2e-4),
    torch.float16: Tolerance(ulp=2.0**-10, rounding=2.0**-11, atol=2e-3, rtol=2e-3),
    torch.bfloat16: Tolerance(ulp=2.0**-7, rounding=2.0**-8, atol=1.6e-2, rtol=1.6e-2),
}
# fp32 only: two fp32 computations of the same O(1) values (kernel vs reference, or the reference vs torch's own op)
# differ by the order of their sums and fused multiply-adds, a few fp32 ulps (~1e-7 .. 1e-6); bound 1e-5 absolute
# (issue 3; tests/test_qk_norm_rope.py, tests/test_references.py).
FP32_ATOL = 1e-5


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-30) -> float:
    """max |got - want| / max |want| (want in fp64; `floor` keeps an all-zero want finite): the measure of the
    gradients' 2x rule."""
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(floor)).item()


def sdpa_per_set(q, k, v, k_img=None, v_img=None, scale=None):
    """SDPA at the inputs' precision per key/value set, summed in that dtype ([B, S, H, D] layout): what plain
    torch does for Wan, the baseline of the 2x-SDPA rule."""
    def one(k_, v_):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), scale=scale).transpose(1, 2)
    out = one(k, v)
    return out if k_img is None else out + one(k_img, v_img)


def fp32_rounding_floor(q, k, v, k_img=None, v_img=None, scale=None) -> float:
    """The rule's floor: output error of ONE fp32 rounding of every score x = s * q.k and of the output
    accumulator, to first order: d out / d x_j = p_j (v_j - out), so per query row and key/value set
    |d out| <= 2^-24 * (max_j |x_j| * max_j |v_j - out| + max_j |v_j|). Largest over rows, sets summed.
    (tests/test_attention.py explains why the rule needs it.)"""
    s = 1.0 / q.shape[-1] ** 0.5 if scale is None else scale
    total = 0.0
    for kk, vv in ((k, v), (k_img, v_img)):
        if kk is None:
            continue
        x = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk.double()) * s
        vh = vv.double().transpose(1, 2)                                              # [B, H, Sk, Dv]
        out = torch.softmax(x, -1) @ vh                                               # [B, H, Sq, Dv]
        # max_j,d |v_jd - out_d| without the [Sq, Sk, Dv] broadcast: the extremes of v per d give it (exactly:
        # rounding is monotone)
        vmax, vmin = vh.amax(2, keepdim=True), vh.amin(2, keepdim=True)             # [B, H, 1, Dv]
        spread = torch.maximum(vmax - out, out - vmin).amax(-1)                       # [B, H, Sq]
        total = total + 2.0**-24 * (x.abs().amax(-1) * spread + vh.abs().amax((-1, -2))[..., None])
    return float(total.max()) if torch.is_tensor(total) and total.numel() else 0.0


def attention_ref64(q, k, v, k_img=None, v_img=None, scale=None) -> torch.Tensor:
    """The reference attention in fp64 on the (rounded) inputs: the rule's exact answer."""
    return ref.attention(*(None if t is None else t.double() for t in (q, k, v, k_img, v_img)), scale=scale)


def assert_flash_rule(got, inputs, scale=None, what=""):
    """Assert the 2x-SDPA rule for an attention output `got` of `inputs` = (q, k, v, k_img, v_img): max |got - ref64|
    <= 2 x max |SDPA per set - ref64| + the fp32 rounding floor; also got's dtype, shape and contiguity.
    Returns (err, err_sdpa)."""
    q = inputs[0]
    want = attention_ref64(*inputs, scale=scale)
    assert got.dtype == q.dtype and got.shape == want.shape and got.is_contiguous(), (what, got.dtype, got.shape)
    err = (got.double() - want).abs().max().item()
    err_sdpa = (sdpa_per_set(*inputs, scale=scale).double() - want).abs().max().item()
    floor = fp32_rounding_floor(*inputs, scale=scale)
    assert err <= 2 * err_sdpa + floor, f"{what}: error {err:.3g} > 2 x SDPA's {err_sdpa:.3g} + {floor:.3g}"
    return err, err_sdpa
