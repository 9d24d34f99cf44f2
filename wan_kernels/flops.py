"""FLOP formulas of the `wan` ops for `torch.utils.flop_counter.FlopCounterMode`, from the specs (`OpSpec.flops`).

Importing this module registers them (once per process) for every op with a formula and for the internal op
of its CUDA kernel; `wan_model.cost` imports it lazily, so `import wan_kernels` stays free of the flop counter.
Counted as FlopCounterMode counts aten matmuls: 2 FLOPs per multiply-add of a matrix product, nothing for
softmax, norms or elementwise work. Composites (qkv_rope) get none: the counter sees their parts (one would
count the GEMM twice).
"""

from __future__ import annotations

from torch.utils.flop_counter import register_flop_formula

import wan_kernels  # noqa: F401  (registers the wan namespace)
from wan_kernels._spec import all_specs


def _formula(flops):
    def formula(*args, out_shape=None, **kwargs) -> int:
        return flops(*args)

    return formula


def register(namespace: str = "wan") -> None:
    for spec in all_specs(namespace):
        if spec.flops is not None:
            register_flop_formula(spec.packet)(_formula(spec.flops))


register()

