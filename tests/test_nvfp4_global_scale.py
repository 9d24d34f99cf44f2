"""wan_kernels.nvfp4.global_scale (the W4A4 activation scale, per call): nan_to_num semantics (NaN ignored, +-inf
as the largest finite fp32) without any temporary as large as x (at 14B 720p with CFG one fp32 copy is 8.4 GB)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from wan_kernels import nvfp4


class _Largest(TorchDispatchMode):
    """Records the largest float32 op output (elements; views / aliases of inputs excluded) while active."""
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shared = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and \
                    t.untyped_storage().data_ptr() not in shared:
                self.largest = max(self.largest, t.numel())
        return out


def _old(x):
    return (torch.nan_to_num(x.float(), nan=0.0).abs().amax() / (6 * 448)).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("special", [None, "nan", "inf", "-inf"])
def test_no_full_size_fp32_temporary_and_same_value(dtype, special, monkeypatch):
    monkeypatch.setattr(nvfp4, "AMAX_CHUNK", 1000)
    x = torch.randn(64, 130, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[3, 7] = -40.0
    if special:
        x[50, 1] = float(special)
    with _Largest() as rec:
        got = nvfp4.global_scale(x)
    assert rec.largest <= 1000 < x.numel()
    assert got.dtype == torch.float32 and got.shape == () and torch.equal(got, _old(x))


def test_empty_and_strided():
    assert torch.equal(nvfp4.global_scale(torch.empty(0, 16)), torch.zeros(()))
    x = torch.randn(40, 64).t()
    assert torch.equal(nvfp4.global_scale(x), _old(x))
