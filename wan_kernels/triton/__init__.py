"""Triton kernels of the `wan` ops.

`KERNELS` maps an op name to its Triton launcher (same signature as the op). A launcher runs on CUDA
tensors, or on CPU tensors under TRITON_INTERPRET=1. The routing (wan_kernels/routing.py) picks them
up from here; an op absent from this table has no Triton backend (yet) and `impl="triton"` raises.
"""

KERNELS: dict = {}
KERNELS["qk_norm_rope"] = __import__("wan_kernels.triton.qk_norm_rope", fromlist=["qk_norm_rope"]).qk_norm_rope
