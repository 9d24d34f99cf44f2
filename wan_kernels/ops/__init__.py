"""The `wan` ops: one module per op, each holding the op's spec (`SPEC`, wan_kernels/_spec.py) and its typed
wrapper, the public kernel API.

Each wrapper takes `impl="auto"|"cuda"|"cpu"|"triton"|"ref"` (see wan_kernels/routing.py). "auto" calls
`torch.ops.wan.<op>` (the dispatcher picks the device's kernel from the route table); a named backend that
cannot run raises `BackendUnavailableError`, it never falls back.

Gradients: every backend of an op gives the same ones (the reference's, see wan_kernels/_autograd.py) for
the inputs the op is differentiable in; an input that is not (NVFP4 codes and scales, rope tables, the
nvfp4_quantize/dequantize/gemm ops) raises RuntimeError at forward time when it requires grad in grad mode.
"""

from wan_kernels.ops.attention import attention
from wan_kernels.ops.attention_backward import attention_backward, attention_delta, attention_forward
from wan_kernels.ops.attention_lse import attention_lse
from wan_kernels.ops.fp8_linear import fp8_linear
from wan_kernels.ops.gated_residual import gated_residual
from wan_kernels.ops.gated_residual_backward import gated_residual_backward
from wan_kernels.ops.layer_norm_modulate import layer_norm_modulate
from wan_kernels.ops.layer_norm_modulate_backward import layer_norm_modulate_backward
from wan_kernels.ops.nvfp4_dequantize import nvfp4_dequantize
from wan_kernels.ops.nvfp4_gemm import nvfp4_gemm
from wan_kernels.ops.nvfp4_linear import nvfp4_linear, nvfp4_linear_backward, nvfp4_linear_w4a4
from wan_kernels.ops.nvfp4_quantize import nvfp4_quantize
from wan_kernels.ops.qk_norm_rope import qk_norm_rope
from wan_kernels.ops.qk_norm_rope_backward import qk_norm_rope_backward
from wan_kernels.ops.qkv_rope import qkv_rope

__all__ = ["attention", "attention_backward", "attention_delta", "attention_forward", "attention_lse", "fp8_linear", "gated_residual", "gated_residual_backward", "layer_norm_modulate", "layer_norm_modulate_backward", "nvfp4_dequantize", "nvfp4_gemm", "nvfp4_linear",
           "nvfp4_linear_backward", "nvfp4_linear_w4a4", "nvfp4_quantize", "qk_norm_rope", "qk_norm_rope_backward", "qkv_rope"]
