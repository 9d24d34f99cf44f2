"""wan::nvfp4_linear (W4A16), the W4A4 composition and the NVFP4Linear module."""

import pytest
import torch
from torch import nn

import wan_kernels
from wan_kernels import nvfp4, ref
from wan_kernels.linear import NVFP4Linear
from wan_kernels.testing import TOLERANCE


def _weights(n=40, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    gw = nvfp4.global_scale(w)
    return w, gw, ref.nvfp4_quantize(w, gw), torch.randn(n, generator=g)


def test_reference_is_dequantized_weight_matmul():
    w, gw, (wp, ws), bias = _weights()
    x = torch.randn(3, 7, 96, generator=torch.Generator().manual_seed(1))
    got = wan_kernels.nvfp4_linear(x, wp, ws, gw, bias, impl="ref")
    want = x.double() @ ref.nvfp4_dequantize(wp, ws, gw, torch.float64).T + bias.double()
    assert got.shape == (3, 7, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)  # fp32 math over K=96 O(1) terms


def test_auto_on_cpu_is_the_reference():
    w, gw, (wp, ws), bias = _weights()
    x = torch.randn(5, 96).bfloat16()
    assert torch.equal(wan_kernels.nvfp4_linear(x, wp, ws, gw, bias), wan_kernels.nvfp4_linear(x, wp, ws, gw, bias, impl="ref"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_w4a16_matches_reference(monkeypatch, dtype):
    """bf16 was ~1e8 off under the interpreter (its bf16 tl.dot works on bit patterns, REFERENCE §1); the
    interpreted launch now dots the same exact values in fp32 (wan_kernels/triton/nvfp4.py `dot_dtype`)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w, gw, (wp, ws), bias = _weights()
    x = torch.randn(2, 9, 96, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = wan_kernels.nvfp4_linear(x, wp, ws, gw, bias.to(dtype), impl="triton")
    want = wan_kernels.nvfp4_linear(x, wp, ws, gw, bias.to(dtype), impl="ref")
    assert got.dtype == want.dtype == dtype and got.shape == want.shape == (2, 9, 40)
    # both round (nearly) the same fp32 value to x's dtype once: within one ulp
    assert ((got.float() - want.float()).abs() <= want.float().abs() * TOLERANCE[dtype].ulp + 2**-24).all()


@pytest.mark.parametrize("impl", ["ref", "auto"])
def test_w4a4_is_quantize_then_gemm(impl):
    w, gw, (wp, ws), bias = _weights()
    x = torch.randn(4, 6, 96, generator=torch.Generator().manual_seed(3))
    got = wan_kernels.nvfp4_linear_w4a4(x, wp, ws, gw, bias, impl=impl)
    x2 = x.reshape(-1, 96)
    gx = nvfp4.global_scale(x2)
    want = ref.nvfp4_gemm(*ref.nvfp4_quantize(x2, gx), gx, wp, ws, gw, bias, torch.float32).reshape(4, 6, 40)
    assert torch.equal(got, want)


def test_module_from_linear():
    lin = nn.Linear(96, 40)
    q = NVFP4Linear.from_linear(lin)
    assert q.mode == "w4a16"  # CPU: no FP4 tensor cores
    assert set(q.state_dict()) == {"weight", "weight_scale", "weight_scale_2", "bias"}
    assert q.weight.dtype == torch.uint8 and q.weight_scale.dtype == torch.float8_e4m3fn
    assert q.weight_scale_2.item() == pytest.approx(lin.weight.abs().max().item() / (6 * 448), rel=1e-6)
    x = torch.randn(3, 96)
    want = x @ q.dequantized_weight().T + lin.bias.detach()
    torch.testing.assert_close(q(x), want, rtol=0, atol=1e-5)
    # NVFP4 keeps ~20 dB of SNR of a Gaussian weight: output within ~15% of the dense layer
    with torch.no_grad():
        rel = float((q(x) - lin(x)).norm() / lin(x).norm())
    assert 0.01 < rel < 0.15, rel
    with pytest.raises(ValueError, match="multiple of 16"):
        NVFP4Linear(40, 8)
    with pytest.raises(ValueError, match="mode"):
        NVFP4Linear(32, 8, mode="fp8")


def test_mode_is_rebound_on_device_move(monkeypatch):
    import wan_kernels.linear as lin_mod

    q = NVFP4Linear(32, 8)
    assert q.mode == "w4a16"
    seen = []
    monkeypatch.setattr(lin_mod, "default_mode", lambda device: seen.append(torch.device(device)) or "w4a4")
    q.to(torch.float32)  # any _apply re-decides for the buffers' device
    assert q.mode == "w4a4" and q._linear is wan_kernels.nvfp4_linear_w4a4 and seen == [torch.device("cpu")]
    assert NVFP4Linear(32, 8, mode="w4a16").to(torch.float32).mode == "w4a16"  # an explicit mode stays


def test_dtype_casts_keep_the_nvfp4_format():
    q = NVFP4Linear.from_linear(nn.Linear(64, 24))
    scale, gs = q.weight_scale.clone(), q.weight_scale_2.clone()
    q = q.to(torch.bfloat16)
    assert q.weight_scale.dtype == torch.float8_e4m3fn and torch.equal(q.weight_scale.view(torch.uint8), scale.view(torch.uint8))
    assert q.weight_scale_2.dtype == torch.float32 and torch.equal(q.weight_scale_2, gs)
    assert q.bias.dtype == torch.bfloat16 and q.weight.dtype == torch.uint8
    assert q(torch.randn(3, 64).bfloat16()).dtype == torch.bfloat16
