"""Bad input raises ValueError (Python paths) or RuntimeError (C++ kernels) naming the argument and
quoting its shape or dtype, on every CPU backend."""

import pytest
import torch

import wan_kernels

from _inputs import op_inputs

IMPLS = ["auto", "ref", "cpu", "triton"]  # triton: under TRITON_INTERPRET=1 (same checks, before the launch)
NO_CPP_CPU_KERNEL = ("nvfp4_gemm", "nvfp4_linear")  # impl="cpu" raises for these (test_library.py)


def _replace(args, i, value):
    args = list(args)
    args[i] = value
    return tuple(args)


def _block_scale(byte: int, shape=(128, 4)) -> torch.Tensor:
    """Swizzled e4m3 block scales of 1.0 with one byte set to `byte` at [1, 2]."""
    t = torch.full(shape, 0x38, dtype=torch.uint8)
    t[1, 2] = byte
    return t.view(torch.float8_e4m3fn)


CASES = [
    # op, argument index, bad value, pattern the message must contain
    ("qk_norm_rope", 0, torch.randn(2, 17, 100), r"qkv must be \[B, S, 3\*C\].*\(?2, 17, 100\)?"),
    ("qk_norm_rope", 0, torch.randn(17, 384), r"qkv must be \[B, S, 3\*C\].*17, 384"),
    ("qk_norm_rope", 0, torch.randn(2, 17, 384).double(), r"qkv must be float32/float16/bfloat16.*(Double|float64)"),
    ("qk_norm_rope", 5, 3, r"num_heads=3 does not divide C=128"),
    ("qk_norm_rope", 1, torch.randn(64), r"norm_q_weight must be \[128\].*64"),
    ("qk_norm_rope", 3, torch.randn(17, 16), r"rope_cos.* must be float32 \[S, D/2\] = \[17, 32\].*17, 16"),
    ("qk_norm_rope", 4, torch.randn(17, 32).double(), r"rope_sin.*(Double|float64)"),
    ("qkv_rope", 1, torch.randn(384, 100), r"w_qkv must be \[3\*C, 128\].*384, 100"),
    ("attention", 1, torch.randn(2, 7, 3, 64), r"k must be \[2, Sk, 2, 64\].*2, 7, 3, 64"),
    ("attention", 0, torch.randn(2, 17, 128), r"q must be \[B, S, H, D\].*2, 17, 128"),
    ("attention", 4, None, r"k_img and v_img must be given together"),
    ("nvfp4_quantize", 0, torch.randn(4, 40), r"multiple of 16.*4, 40"),
    ("nvfp4_quantize", 0, torch.randn(4, 4, 16), r"x must be 2-D \[M, K\].*4, 4, 16"),
    ("nvfp4_quantize", 0, torch.randint(0, 5, (4, 32)), r"x must be float32/float16/bfloat16.*(Long|int64)"),
    ("nvfp4_quantize", 1, torch.tensor([1.0, 2.0]), r"global_scale must be a 1-element float32 tensor.*2"),
    ("nvfp4_dequantize", 1, torch.zeros(37, 4, dtype=torch.float8_e4m3fn), r"block_scale must have shape \[128, 4\].*37, 4"),
    ("nvfp4_dequantize", 0, torch.zeros(37, 32), r"packed must be 2-D uint8.*(Float|float32)"),
    ("nvfp4_dequantize", 3, torch.int32, r"dtype must be float32/float16/bfloat16"),
    ("nvfp4_gemm", 3, torch.zeros(24, 16, dtype=torch.uint8), r"disagree on K|b_scale must have shape"),
    ("nvfp4_gemm", 6, torch.randn(5), r"bias must be \[24\].*5"),
    ("nvfp4_linear", 0, torch.randn(2, 5, 48), r"x must be \[\.\.\., 64\].*2, 5, 48"),
    ("nvfp4_linear", 4, torch.randn(7), r"bias must be \[24\].*7"),
    # one input rule for every backend (the C++ composite of qkv_rope broadcast these biases)
    ("qkv_rope", 2, torch.randn(1, 384), r"b_qkv must be \[384\] or None.*1, 384"),
    ("qkv_rope", 2, torch.randn(17, 384), r"b_qkv must be \[384\] or None.*17, 384"),
    ("qkv_rope", 2, torch.ones(384, dtype=torch.int64), r"b_qkv must have x's dtype torch.float32.*int64"),
    ("qkv_rope", 0, torch.ones(2, 17, 128, dtype=torch.int32), r"x must be float32/float16/bfloat16.*int32"),
    # float operands of int/bool/complex dtype, named with their dtype
    ("qk_norm_rope", 1, torch.ones(128, dtype=torch.int64), r"norm_q_weight must be float32/float16/bf.*int64"),
    ("qk_norm_rope", 2, torch.ones(128, dtype=torch.bool), r"norm_k_weight must be float32/float16/bfloat16.*bool"),
    ("qk_norm_rope", 1, torch.ones(128, dtype=torch.complex64), r"norm_q_weight must be float.*complex64"),
    ("qkv_rope", 4, torch.ones(128, dtype=torch.int32), r"norm_k_weight must be float32/float16/bfloat16.*int32"),
    ("qk_norm_rope", 3, torch.ones(17, 32, dtype=torch.complex64), r"rope_cos must be float32.*complex64"),
    ("qkv_rope", 6, torch.ones(17, 32, dtype=torch.int64), r"rope_sin must be float32.*int64"),
    ("nvfp4_linear", 4, torch.ones(24, dtype=torch.int32), r"bias must be float32/float16/bfloat16.*int32"),
    ("nvfp4_gemm", 6, torch.ones(24, dtype=torch.bool), r"bias must be float32/float16/bfloat16.*bool"),
    ("layer_norm_modulate", 1, torch.ones(2, 1, 128, dtype=torch.int64), r"scale must be float32 .*int64"),
    ("layer_norm_modulate", 2, torch.ones(2, 17, 128, dtype=torch.bool), r"shift must be float32 .*bool"),
    ("gated_residual", 2, torch.ones(2, 1, 128, dtype=torch.complex64), r"gate must be float32 .*complex64"),
    # scale values (CPU tensors: read without a device sync)
    ("nvfp4_quantize", 1, torch.tensor(float("nan")), r"nvfp4_quantize: global_scale must be finite and > 0.*got nan"),
    ("nvfp4_dequantize", 2, torch.tensor(-1.0), r"global_scale must be finite and > 0.*got -1\.0"),
    ("nvfp4_gemm", 2, torch.tensor(0.0), r"a_global_scale must be finite and > 0.*got 0\.0"),
    ("nvfp4_linear", 3, torch.tensor(float("inf")), r"w_global_scale must be finite and > 0.*got inf"),
    ("nvfp4_dequantize", 1, _block_scale(0x7F), r"block_scale holds NaN e4m3 byte 0x7F at \[1, 2\]"),
    ("nvfp4_gemm", 4, _block_scale(0xFF), r"b_scale holds NaN e4m3 byte 0xFF at \[1, 2\]"),
    ("nvfp4_linear", 2, _block_scale(0xB8), r"w_scale holds negative e4m3 byte 0xB8 at \[1, 2\]"),
]


PARAMS = [pytest.param(*case, impl, id=f"{case[0]}-{i}-{impl}") for i, case in enumerate(CASES) for impl in IMPLS
          if not (impl == "cpu" and case[0] in NO_CPP_CPU_KERNEL)]


@pytest.mark.slow
@pytest.mark.parametrize("op,index,bad,pattern,impl", PARAMS)
def test_bad_input_message(op, index, bad, pattern, impl, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    args = _replace(op_inputs()[op], index, bad)
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        getattr(wan_kernels, op)(*args, impl=impl)


def test_python_paths_raise_value_error():
    args = _replace(op_inputs()["nvfp4_quantize"], 0, torch.randn(4, 40))
    with pytest.raises(ValueError):
        wan_kernels.nvfp4_quantize(*args, impl="ref")


def test_device_mismatch_is_named():
    x = torch.randn(4, 32)
    gs = torch.empty((), device="meta")
    with pytest.raises(ValueError, match="global_scale is on meta but the inputs are on cpu"):
        wan_kernels.nvfp4_quantize(x, gs, impl="ref")


@pytest.mark.parametrize("op,index,bad,pattern", [
    ("qk_norm_rope", 1, torch.ones(128, dtype=torch.int64), r"norm_q_weight must be float32/float16/bfloat16.*(Long|int64)"),
    ("qk_norm_rope", 2, torch.ones(128, dtype=torch.bool), r"norm_k_weight must be float32/float16/bfloat16.*(Bool|bool)"),
    ("qkv_rope", 2, torch.randn(1, 384), r"b_qkv must be \[384\] or None.*1, 384"),
    ("qkv_rope", 2, torch.ones(384, dtype=torch.int64), r"b_qkv must have x's dtype torch.float32.*int64"),
    ("qkv_rope", 4, torch.ones(128, dtype=torch.int32), r"norm_k_weight must be float32/float16/bfloat16.*(Int|int32)"),
], ids=lambda v: v if isinstance(v, (str, int)) else None)
def test_direct_dispatcher_call_checks_like_the_wrappers(op, index, bad, pattern):
    # torch.ops.wan.* called directly: the C++ kernel's TORCH_CHECKs (qk_norm_rope) and the one composition of
    # qkv_rope (its checks in front) hold the same rules as the wrappers
    args = _replace(op_inputs()[op], index, bad)
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        getattr(torch.ops.wan, op)(*args)
