"""Small deterministic inputs for every op, from the specs (`OpSpec.samples`): the self-check of
`python -m wan_kernels`, the GPU check (`python -m tools.gpu_check`) and the library tests build their
calls from here.

`op_inputs(dtype)` gives, per op, the positional arguments of one call: activations in `dtype`; the operands
that are fp32 by contract (RoPE tables, adaLN scale/shift/gate, NVFP4 global scales) stay fp32; NVFP4 packed
weights and scales are quantized by the reference. For `nvfp4_dequantize`/`nvfp4_gemm`, `dtype` is the output
dtype. Each op draws from its own generator, so its inputs do not depend on which other ops exist.
"""

from __future__ import annotations

import torch

from wan_kernels._spec import OpSpec, Sampler, all_specs


def spec_inputs(spec: OpSpec, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                seed: int = 0) -> tuple:
    return spec.samples(Sampler(dtype, device, seed))


def op_inputs(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0, *,
              internal: bool = False, namespace: str = "wan") -> dict[str, tuple]:
    """{op: args} for the public ops of `namespace` (internal=True: and the internal ops of CUDA kernels)."""
    return {s.name: spec_inputs(s, dtype, device, seed) for s in all_specs(namespace)
            if internal or s.internal_of is None}
