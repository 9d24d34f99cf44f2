"""Triton kernels of the `wan` ops.

`KERNELS` maps an op name to its Triton launcher (same signature as the op). A launcher runs on CUDA
tensors, or on CPU tensors under TRITON_INTERPRET=1. The routing (wan_kernels/routing.py) picks them
up from here; an op absent from this table has no Triton backend (yet) and `impl="triton"` raises.
"""

KERNELS: dict = {}
KERNELS["qk_norm_rope"] = __import__("wan_kernels.triton.qk_norm_rope", fromlist=["qk_norm_rope"]).qk_norm_rope
KERNELS["attention"] = __import__("wan_kernels.triton.attention", fromlist=["attention"]).attention
KERNELS["nvfp4_quantize"] = __import__("wan_kernels.triton.nvfp4", fromlist=["nvfp4_quantize"]).nvfp4_quantize
KERNELS["nvfp4_dequantize"] = __import__("wan_kernels.triton.nvfp4", fromlist=["nvfp4_dequantize"]).nvfp4_dequantize
KERNELS["nvfp4_gemm"] = __import__("wan_kernels.triton.nvfp4", fromlist=["nvfp4_gemm"]).nvfp4_gemm
KERNELS["nvfp4_linear"] = __import__("wan_kernels.triton.nvfp4", fromlist=["nvfp4_linear_w4a16"]).nvfp4_linear_w4a16
KERNELS["layer_norm_modulate"] = __import__("wan_kernels.triton.modulate", fromlist=["layer_norm_modulate"]).layer_norm_modulate
KERNELS["gated_residual"] = __import__("wan_kernels.triton.modulate", fromlist=["gated_residual"]).gated_residual
