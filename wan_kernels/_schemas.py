"""Schemas of the `wan` op namespace, for a Python-only install (no `_C`).

The compiled extension declares the same strings in csrc/registration.cpp (TORCH_LIBRARY(wan, m));
tests/test_library.py asserts that the two are identical, so the C++ file stays the one source.
"""

SCHEMAS = {
    "qk_norm_rope": "qk_norm_rope(Tensor qkv, Tensor norm_q_weight, Tensor norm_k_weight, Tensor rope_cos, "
    "Tensor rope_sin, int num_heads, float eps) -> (Tensor q, Tensor k, Tensor v)",
    "qkv_rope": "qkv_rope(Tensor x, Tensor w_qkv, Tensor? b_qkv, Tensor norm_q_weight, Tensor norm_k_weight, "
    "Tensor rope_cos, Tensor rope_sin, int num_heads, float eps) -> (Tensor q, Tensor k, Tensor v)",
    "attention": "attention(Tensor q, Tensor k, Tensor v, Tensor? k_img, Tensor? v_img, float? scale) -> Tensor",
    "nvfp4_quantize": "nvfp4_quantize(Tensor x, Tensor global_scale) -> (Tensor packed, Tensor block_scale)",
    "nvfp4_dequantize": "nvfp4_dequantize(Tensor packed, Tensor block_scale, Tensor global_scale, "
    "ScalarType dtype) -> Tensor",
    "nvfp4_gemm": "nvfp4_gemm(Tensor a, Tensor a_scale, Tensor a_global_scale, Tensor b, Tensor b_scale, "
    "Tensor b_global_scale, Tensor? bias, ScalarType out_dtype) -> Tensor",
    "layer_norm_modulate": "layer_norm_modulate(Tensor x, Tensor scale, Tensor shift, float eps) -> Tensor",
    "gated_residual": "gated_residual(Tensor x, Tensor y, Tensor gate) -> Tensor",
    "nvfp4_linear": "nvfp4_linear(Tensor x, Tensor w, Tensor w_scale, Tensor w_global_scale, Tensor? bias) -> Tensor",
    # Internal: the CUTLASS sm100a backend of nvfp4_gemm (same semantics; CUDA kernel only on sm_100).
    "nvfp4_gemm_sm100": "nvfp4_gemm_sm100(Tensor a, Tensor a_scale, Tensor a_global_scale, Tensor b, "
    "Tensor b_scale, Tensor b_global_scale, Tensor? bias, ScalarType out_dtype) -> Tensor",
}

# Public op -> the internal op that carries its compiled CUDA kernel (when it is not the op itself).
CUDA_KERNEL_OPS = {"nvfp4_gemm": "nvfp4_gemm_sm100"}
INTERNAL = tuple(CUDA_KERNEL_OPS.values())

# Ops implemented as a composition of other ops (no fake impl, no per-device kernels).
COMPOSITE = ("qkv_rope",)

OPS = tuple(SCHEMAS)                                       # every op of the namespace
PUBLIC_OPS = tuple(op for op in OPS if op not in INTERNAL)  # the API (wan_kernels.<op>)
