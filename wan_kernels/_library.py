"""Registers every op spec (wan_kernels/_spec.py, wan_kernels/ops/) with the dispatcher.

* `_C` present (wan_kernels/_extension.py): its TORCH_LIBRARY(wan) declares the schemas and registers the C++
  CPU kernels (on the public ops) and CUDA kernels (on internal ops, `OpSpec.cuda`).
* `_C` absent (or a stale build lacking an op): the spec's schema is declared here, so `torch.ops.wan.*`
  always exists and runs on CPU through the references.
Then, per spec: the fake (torch.compile / meta tensors, checks in front), the reference as CPU kernel where
no C++ one exists, the CUDA kernel = `routing.cuda_router` (the route table), the autograd
(wan_kernels/_autograd.py); a composite gets its one composition as CompositeImplicitAutograd kernel.
The internal op of a CUDA kernel gets the same schema, fake, reference CPU kernel and autograd.
"""

from __future__ import annotations

import torch

from wan_kernels import _autograd, ops, routing  # noqa: F401  (ops: every spec registers itself)
from wan_kernels._extension import EXTENSION, has_compiled_kernel
from wan_kernels._spec import SPECS, OpSpec, all_specs, checked

_LIBS: dict[str, list[torch.library.Library]] = {}  # namespace -> the libraries holding its registrations


def _has_schema(spec: OpSpec) -> bool:
    return torch._C._jit_get_operation(spec.qualname)[0] is not None


def _composite(spec: OpSpec):
    return checked(spec, spec.compose(lambda part: SPECS[part].packet.default))


def register_namespace(namespace: str) -> None:
    """Declare (where `_C` did not) and register every spec of `namespace` (public and internal)."""
    specs = all_specs(namespace)
    missing = [s for s in specs if not _has_schema(s)]
    libs = _LIBS.setdefault(namespace, [])
    if missing:
        kind = "FRAGMENT" if len(missing) < len(specs) or libs else "DEF"
        libs.append(torch.library.Library(namespace, kind))
        for s in missing:
            libs[-1].define(s.schema)
    lib = torch.library.Library(namespace, "IMPL")
    libs.append(lib)
    for s in specs:
        if s.compose is not None:
            lib.impl(s.name, _composite(s), "CompositeImplicitAutograd")
        else:
            torch.library.register_fake(s.qualname, checked(s, s.fake), lib=lib)
            if not has_compiled_kernel(s.name, "CPU"):
                lib.impl(s.name, checked(s, s.ref), "CPU")
            if s.internal_of is None:
                lib.impl(s.name, routing.cuda_router(s), "CUDA")
            elif isinstance(SPECS[s.internal_of].cuda, routing.TorchCudaKernel):  # a kernel torch ships
                lib.impl(s.name, SPECS[s.internal_of].cuda.fn, "CUDA")
        _autograd.register(lib, s)


def unregister_namespace(namespace: str) -> None:
    """Drop a namespace's registrations and autograd rules (tests registering a toy op)."""
    for lib in reversed(_LIBS.pop(namespace, [])):
        lib._destroy()
    for op in [op for op, s in _autograd.OPS.items() if s.namespace == namespace]:
        del _autograd.OPS[op]


# Schemas a loaded _C lacks (a stale build of an older checkout): declared here so the package imports;
# tests/test_library.py fails while this is not empty.
MISSING_FROM_EXTENSION = tuple(s.name for s in all_specs() if s.cpp and not _has_schema(s)) if EXTENSION.loaded else ()
register_namespace("wan")
