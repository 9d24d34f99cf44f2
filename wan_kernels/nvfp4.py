"""NVFP4 format helpers: constants, the decode-convention global scale and the 128x4 scale swizzle.

Layout (REFERENCE.md §5, CUTLASS sm100 `SfKMajorAtom`):
  * `packed`      uint8 [M, K/2]: two E2M1 codes per byte, element 2i in the low nibble.
  * `block_scale` float8_e4m3fn [roundup(M, 128), roundup(K/16, 4)]: one scale per 16 elements along K,
    stored in the 128x4 swizzled order below, padding zero-filled. The tensor's flat bytes are the
    swizzled buffer; its 2-D shape is the padded scale-matrix shape.
      offset(m, k) = ((m // 128) * (Ks' // 4) + k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4
  * `global_scale` float32 scalar, DECODE convention: value = e2m1 * block_scale * global_scale,
    global_scale = amax / (6 * 448). (vLLM/FlashInfer pass the reciprocal, "encode" convention.)
Valid scales: a global scale is finite and > 0, or 0 for an all-zero tensor (whose codes are all +-0); block
scales are never NaN (0x7F, 0xFF) or negative. Checked on load (wan_model.io.formats.check_scales) and at the op
boundary where that costs no device sync (wan_kernels._checks).
"""

import torch

from wan_kernels.hardware import E4M3_MAX

BLOCK = 16
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def scale_shape(m: int, k: int) -> tuple[int, int]:
    """Shape of the swizzled block-scale tensor of an [m, k] matrix."""
    return round_up(m, 128), round_up(k // BLOCK, 4)


# Elements per step of `global_scale`: its fp32 temporaries are at most this big (64 MB), not the size of x
# (a 14B 720p activation with CFG is 2.1e9 elements: 8.4 GB per fp32 copy).
AMAX_CHUNK = 1 << 24


def global_scale(x: torch.Tensor) -> torch.Tensor:
    """Decode-convention per-tensor scale amax(|x|) / (6 * 448) as a 0-dim float32 tensor (NaN ignored, +-inf
    counted as the largest finite fp32, as `nan_to_num`). Reads x in chunks of AMAX_CHUNK elements, so no
    temporary is as large as x; no host synchronisation."""
    x = x.detach().reshape(-1)
    if not x.numel():
        return x.new_zeros((), dtype=torch.float32)
    amax = torch.stack([torch.nan_to_num(c.float(), nan=0.0).abs().amax() for c in x.split(AMAX_CHUNK)]).amax()
    return (amax / (E2M1_MAX * E4M3_MAX)).to(torch.float32)


E4M3_NAN = (0x7F, 0xFF)  # the NaN codes of float8_e4m3fn (it has no inf)


def bad_block_scale_bytes(b: torch.Tensor) -> torch.Tensor:
    """Mask of the invalid bytes of e4m3 block scales (as uint8): the NaN codes 0x7F / 0xFF and negative values
    (sign bit set; -0.0 = 0x80 excepted, it decodes to 0 like 0x00). Zero is valid: an all-zero block's scale."""
    return (b == 0x7F) | (b > 0x80)


def codes_all_zero(packed: torch.Tensor) -> bool:
    """Whether every E2M1 code of `packed` is +-0 (what dequantizes to 0 whatever the scales)."""
    return not (packed.view(torch.uint8) & 0x77).any()


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """[M, Ks] scale matrix (any dtype) -> [M', Ks'] whose flat order is the 128x4 swizzled layout."""
    m, ks = scales.shape
    mp, kp = round_up(m, 128), round_up(ks, 4)
    padded = scales.new_zeros((mp, kp))
    padded[:m, :ks] = scales
    # m = m0*128 + m1*32 + m2, k = k0*4 + k1  ->  offset order (m0, k0, m2, m1, k1)
    blocks = padded.view(mp // 128, 4, 32, kp // 4, 4).permute(0, 3, 2, 1, 4)
    return blocks.reshape(mp, kp)


def unswizzle_scales(swizzled: torch.Tensor, m: int, ks: int) -> torch.Tensor:
    """Inverse of `swizzle_scales`: [M', Ks'] swizzled -> [m, ks] row-major scale matrix."""
    mp, kp = swizzled.shape
    blocks = swizzled.reshape(mp // 128, kp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return blocks.reshape(mp, kp)[:m, :ks]
