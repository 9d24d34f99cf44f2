"""Small deterministic inputs for every `wan` op (public and internal), shared by the library-level tests: the
specs' samples (wan_kernels/samples.py), the one source."""

import torch

from wan_kernels import samples


def op_inputs(dtype=torch.float32, seed=0) -> dict[str, tuple]:
    return samples.op_inputs(dtype, seed=seed, internal=True)
