"""The `wan` ops: one module per op, each holding the op's spec (`SPEC`, wan_kernels/_spec.py), its typed
wrapper(s) (the public kernel API) and `__all__` naming them. Every module of this package is imported here, in
name order, so an op registers itself by existing: adding one is adding its file.

Each wrapper takes `impl="auto"|"cuda"|"cpu"|"triton"|"ref"` (see wan_kernels/routing.py). "auto" calls
`torch.ops.wan.<op>` (the dispatcher picks the device's kernel from the route table); a named backend that
cannot run raises `BackendUnavailableError`, it never falls back.

Gradients: every backend of an op gives the same ones (the reference's, see wan_kernels/_autograd.py) for
the inputs the op is differentiable in; an input that is not (NVFP4 codes and scales, rope tables, the
nvfp4_quantize/dequantize/gemm ops) raises RuntimeError at forward time when it requires grad in grad mode.
"""

import importlib
import pkgutil

__all__ = []
for _module in pkgutil.iter_modules(__path__):
    _mod = importlib.import_module(f"{__name__}.{_module.name}")
    globals().update({name: getattr(_mod, name) for name in _mod.__all__})
    __all__ += _mod.__all__
del _module, _mod
