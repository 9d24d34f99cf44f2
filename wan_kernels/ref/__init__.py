"""Pure-torch references of every `wan` op: the spec. fp32 math (fp64 inputs stay fp64), CPU-runnable.

Tests, benchmarks ("ref-eager"/"ref-compile") and `impl="ref"` use these; fast backends never import them.
Each module's `__all__` names the references it holds; every module of this package is collected here, so a
new op's reference is one new file (wan_kernels/ref/<op>.py).
"""

import importlib
import pkgutil

__all__ = []
for _module in pkgutil.iter_modules(__path__):
    _mod = importlib.import_module(f"{__name__}.{_module.name}")
    globals().update({name: getattr(_mod, name) for name in _mod.__all__})
    __all__ += _mod.__all__
del _module, _mod
