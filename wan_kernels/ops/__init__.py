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
from wan_kernels.ops.attention_lse import attention_lse
from wan_kernels.ops.gated_residual import gated_residual
from wan_kernels.ops.layer_norm_modulate import layer_norm_modulate
from wan_kernels.ops.nvfp4_dequantize import nvfp4_dequantize
from wan_kernels.ops.nvfp4_gemm import nvfp4_gemm
from wan_kernels.ops.nvfp4_linear import nvfp4_linear, nvfp4_linear_w4a4
from wan_kernels.ops.nvfp4_quantize import nvfp4_quantize
from wan_kernels.ops.qk_norm_rope import qk_norm_rope
from wan_kernels.ops.qkv_rope import qkv_rope

__all__ = ["attention", "attention_lse", "gated_residual", "layer_norm_modulate", "nvfp4_dequantize", "nvfp4_gemm", "nvfp4_linear",
           "nvfp4_linear_w4a4", "nvfp4_quantize", "qk_norm_rope", "qkv_rope"]
