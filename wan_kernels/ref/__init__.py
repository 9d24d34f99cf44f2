"""Pure-torch references of every `wan` op: the spec. fp32 math (fp64 inputs stay fp64), CPU-runnable.

Tests, benchmarks ("ref-eager"/"ref-compile") and `impl="ref"` use these; fast backends never import them.
"""

from wan_kernels.ref.attention import attention, attention_lse
from wan_kernels.ref.modulate import gated_residual, layer_norm_modulate
from wan_kernels.ref.nvfp4 import nvfp4_dequantize, nvfp4_gemm, nvfp4_linear, nvfp4_quantize
from wan_kernels.ref.qk_norm_rope import qk_norm_rope
from wan_kernels.ref.qkv_rope import qkv_rope

__all__ = ["attention", "attention_lse", "gated_residual", "layer_norm_modulate", "nvfp4_dequantize", "nvfp4_gemm", "nvfp4_linear", "nvfp4_quantize", "qk_norm_rope", "qkv_rope"]
