"""Small deterministic inputs for every `wan` op (public and internal), shared by the library-level tests: the
specs' samples (wan_kernels/samples.py), the one source."""

import torch

from wan_kernels import samples


def op_inputs(dtype=torch.float32, seed=0) -> dict[str, tuple]:
    return samples.op_inputs(dtype, seed=seed, internal=True)


def attention_inputs(B, Sq, Sk, Si, H, D, dtype, seed=0, Dv=None, magnitude=1.0):
    """q, k, v, k_img, v_img (None, None without an image set) in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D

    def r(*shape):
        return (torch.randn(*shape, generator=g) * magnitude).to(dtype)

    q, k, v = r(B, Sq, H, D), r(B, Sk, H, D), r(B, Sk, H, Dv)
    ki, vi = (r(B, Si, H, D), r(B, Si, H, Dv)) if Si else (None, None)
    return q, k, v, ki, vi


def nvfp4_adversarial(gs: float) -> torch.Tensor:
    """Rows that hit every E2M1 midpoint exactly, saturation, subnormal block scales and zero blocks."""
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    rows = []
    for s in (1.0, 0.5, 2**-7, 3 * 2**-9, 448.0):  # block scales incl. E4M3 subnormals
        # amax 6*s*gs fixes the block scale at s, so x / (s * gs) hits the midpoints exactly
        block = torch.cat([mids, -mids]) * s * gs
        rows.append(block)
    rows.append(torch.zeros(16))                       # all-zero block
    rows.append(torch.full((16,), 1e6 * gs))           # beyond 6 * 448 * gs: saturates
    rows.append(torch.linspace(-1, 1, 16) * 1e-4 * gs)  # scale below E4M3's range: codes 0
    return torch.stack(rows).reshape(-1, 32)
