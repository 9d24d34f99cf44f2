"""What tests, benchmarks and the GPU check share to judge a kernel's numbers: the tolerance table per dtype and the
2x-SDPA accuracy rule of attention (flash-attention's rule) with its fp32 rounding floor. Layer 0: imports only
torch and wan_kernels.

The rule (issue 4): a kernel's error against an fp64 reference on the same rounded inputs is at most 2x the error
plain torch makes at the inputs' precision (attention: SDPA, `sdpa_per_set`; gradients: the reference's autograd in
the same dtype, `rel_err`), plus a floor so that torch being lucky on a small tensor does not fail us
(attention: `fp32_rounding_floor`; gradients: `TOLERANCE[dtype].rounding`).

The 8-bit attention's inputs and measure (issue 23; tests/test_attention_int8.py, the GPU check): a Wan-like
generator (`wan_like`), comfy-kitchen's two int8-attention recipes (`comfy_bias`, `comfy_channel`) and the
worst-head NRMSE / cosine (`stats_per_head`).
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


# ---------------------------------------------------------------------------------------------
# 8-bit attention: inputs and the worst-head measure

def _rope(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of each head by pos * 10000^(-2i/D), positions shuffled (3-D grids)."""
    B, S, H, D = x.shape
    pos = torch.randperm(S, generator=g, device=x.device).float()[:, None]
    ang = pos * torch.pow(10000.0, -torch.arange(0, D, 2, device=x.device).float() / D)[None]  # [S, D/2]
    c, s = torch.cos(ang)[None, :, None], torch.sin(ang)[None, :, None]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * c - b * s, a * s + b * c), -1).reshape(B, S, H, D)


def _rms_tokens(B, S, H, D, g, gain):
    """Per-token RMSNorm over C = H * D of Gaussian activations, times heavy-tailed channel gains."""
    x = torch.randn(B, S, H * D, generator=g, device=gain.device)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    return (x * gain).reshape(B, S, H, D)


def wan_like(B, Sq, Sk, H, D, Si=0, seed=0, dtype=torch.float16, device="cpu"):
    """q, k, v, k_img, v_img (None without an image set) shaped like Wan's attention inputs: RMS-normed tokens
    with log-normal channel gains; keys get a bias shared by all tokens BEFORE a RoPE-like rotation (so smoothing
    removes only part of it) and two sink-like tokens x6; v has per-channel offsets and two large channels
    (|v| up to ~1e3). `device`: where they are drawn (the GPU check's long cases; CPU draws are the tests')."""
    g = torch.Generator(device=device).manual_seed(seed)
    C = H * D
    r = lambda *shape: torch.randn(*shape, generator=g, device=device)  # noqa: E731
    gq, gk = torch.exp(0.7 * r(C)), torch.exp(0.7 * r(C))
    q = _rope(_rms_tokens(B, Sq, H, D, g, gq), g)

    def keys(S):
        k = _rms_tokens(B, S, H, D, g, gk) + 2.0 * r(C).reshape(H, D)
        k = _rope(k, g)
        k[:, torch.randint(0, S, (2,), generator=g, device=device)] *= 6.0
        return k

    def values(S):
        v = r(B, S, H, D) * torch.exp(0.5 * r(H, D))
        v = v + 3.0 * r(H, D)
        v[..., :2] *= 250.0
        return v

    k, v = keys(Sk), values(Sk)
    ki, vi = (keys(Si), values(Si)) if Si else (None, None)
    return tuple(None if t is None else t.to(dtype) for t in (q, k, v, ki, vi))


def comfy_bias(B, Sq, Sk, H, D, seed=0, dtype=torch.float16):
    """comfy-kitchen's first recipe: Gaussian q, k, v; k plus a per-head vector of RMS 40 shared by all tokens."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, S, H, D, generator=g) for S in (Sq, Sk, Sk))
    k = k + 40.0 * torch.randn(1, 1, H, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), None, None


def comfy_channel(B, Sq, Sk, H, D, seed=0, dtype=torch.float16):
    """comfy-kitchen's second recipe: channel 0 of q and k x12, then each token RMS-normalised (per head)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, S, H, D, generator=g) for S in (Sq, Sk, Sk))
    for t in (q, k):
        t[..., 0] *= 12.0
    q, k = (t / t.pow(2).mean(-1, keepdim=True).sqrt() for t in (q, k))
    return q.to(dtype), k.to(dtype), v.to(dtype), None, None


def stats_per_head(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(worst-head NRMSE = ||got - want|| / ||want||, worst-head cosine) over [B, S, H, D] outputs."""
    d, w = got.double(), want.double()
    err = (d - w).pow(2).sum((1, 3)).sqrt() / w.pow(2).sum((1, 3)).sqrt()                  # [B, H]
    cos = (d * w).sum((1, 3)) / (d.pow(2).sum((1, 3)).sqrt() * w.pow(2).sum((1, 3)).sqrt())
    return err.max().item(), cos.min().item()


def e4m3_sweep() -> torch.Tensor:
    """fp32 values that exercise an fp32 -> e4m3 cast: every exponent 2^-27 .. 2^10 with any top 12 mantissa bits (all
    e4m3 ties and carries), low 11 bits in {0, 1, 0x400, 0x7FF}, both signs; plus zeros, infinities, the saturation
    edge and huge values (~1.26 M values)."""
    import numpy as np

    e = torch.arange(100, 138, dtype=torch.int64)[:, None, None]
    mhi = torch.arange(4096, dtype=torch.int64)[None, :, None] << 11
    mlo = torch.tensor([0, 1, 0x400, 0x7FF], dtype=torch.int64)[None, None, :]
    bits = ((e << 23) | mhi | mlo).reshape(-1)
    bits = torch.cat([bits, bits | (1 << 31)])
    x = torch.from_numpy(bits.numpy().astype(np.uint32).view(np.float32))
    extra = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 448.0, 463.99, 464.0, 464.01, 480.0, 1e30, -1e30,
                          2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -6 - 2.0 ** -10])
    return torch.cat([x, extra, -extra])

