"""Loads the compiled extension `wan_kernels._C` and records which kernels it registered.

`_C`'s TORCH_LIBRARY(wan) (csrc/registration.cpp) declares the schemas; its TORCH_LIBRARY_IMPL blocks register
the C++ CPU kernels on the public ops and the CUDA kernels on internal ops (`OpSpec.cuda`). `COMPILED` is taken
right after the import, before Python registers anything, so it names exactly the C++/CUDA kernels.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Extension:
    loaded: bool
    error: str | None
    build_info: dict


def _load() -> Extension:
    try:
        from wan_kernels import _C  # registers TORCH_LIBRARY(wan) and its kernels
    except ImportError as e:
        return Extension(False, str(e), {})
    return Extension(True, None, dict(_C.build_info()))


EXTENSION = _load()

# {(op, dispatch key)} of the kernels `_C` registered ("CPU", "CUDA")
COMPILED = frozenset(
    (name.removeprefix("wan::"), key) for name in torch._C._dispatch_get_all_op_names() if name.startswith("wan::")
    for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(name, key)) if EXTENSION.loaded \
    else frozenset()


def has_compiled_kernel(op: str, dispatch_key: str) -> bool:
    """True when `_C` registered a C++ (CPU) or CUDA kernel of `wan::op` for the dispatch key."""
    return (op, dispatch_key) in COMPILED


def build_targets() -> tuple[str, ...]:
    """The CUDA build targets of `_C` (WAN_CUDA_ARCHS entries, e.g. "8.0", "9.0a", "10.0a+PTX")."""
    return tuple(a for a in EXTENSION.build_info.get("cuda_archs", "").split(";") if a)
