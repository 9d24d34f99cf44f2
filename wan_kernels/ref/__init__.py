"""Pure-torch references of every `wan` op: the spec. fp32 math (fp64 inputs stay fp64), CPU-runnable.

Tests, benchmarks ("ref-eager"/"ref-compile") and `impl="ref"` use these; fast backends never import them.
"""

from wan_kernels.ref.attention import attention, attention_backward, attention_delta, attention_forward, attention_lse
from wan_kernels.ref.modulate import gated_residual, gated_residual_backward, layer_norm_modulate, layer_norm_modulate_backward
from wan_kernels.ref.nvfp4 import nvfp4_dequantize, nvfp4_gemm, nvfp4_linear, nvfp4_linear_backward, nvfp4_quantize
from wan_kernels.ref.qk_norm_rope import qk_norm_rope, qk_norm_rope_backward
from wan_kernels.ref.qkv_rope import qkv_rope

__all__ = ["attention", "attention_backward", "attention_delta", "attention_forward", "attention_lse", "gated_residual", "gated_residual_backward", "layer_norm_modulate", "layer_norm_modulate_backward", "nvfp4_dequantize", "nvfp4_gemm", "nvfp4_linear", "nvfp4_linear_backward", "nvfp4_quantize", "qk_norm_rope", "qk_norm_rope_backward", "qkv_rope"]
