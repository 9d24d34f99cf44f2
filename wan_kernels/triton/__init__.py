"""Triton kernels of the `wan` ops.

`KERNELS` maps an op name to its Triton launcher (same signature as the op), read from the op specs
(`OpSpec.triton`, wan_kernels/ops/<op>.py): the specs are the one registry. A launcher runs on CUDA tensors,
or on CPU tensors under TRITON_INTERPRET=1; an op without one has no Triton backend and `impl="triton"` raises.
"""


def __getattr__(name: str):
    if name == "KERNELS":
        import wan_kernels  # noqa: F401  (registers every spec)
        from wan_kernels._spec import SPECS

        return {op: s.triton for op, s in SPECS.items() if s.triton is not None and s.namespace == "wan"}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
