"""Which backend runs each `wan` op, decided once per (op, impl, device) and cached.

Backends:
  "cuda"   CUDA C++/CUTLASS kernels of `wan_kernels._C` (CUDA tensors)
  "cpu"    C++ CPU kernels of `wan_kernels._C` (CPU tensors)
  "triton" Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
  "ref"    the pure-torch references (any device)
`impl="auto"` calls the dispatcher op `torch.ops.wan.<op>`, whose per-device kernel is the route shown
by `route_table()`: on CPU the C++ kernel, else the reference; on CUDA the CUDA C++ kernel, else the
Triton kernel, else the reference. A named backend that cannot run raises BackendUnavailableError;
it never falls back silently.
"""

from __future__ import annotations

import functools

import torch

from wan_kernels import _library, _schemas
from wan_kernels import triton as triton_kernels
from wan_kernels.triton._launch import interpreter_enabled

BACKENDS = ("cuda", "cpu", "triton", "ref")
IMPLS = ("auto",) + BACKENDS
# Archs a kernel of _C needs beyond being compiled for the device (sm_100a code runs on 10.0 only).
CUDA_ARCH_LIMITS: dict[str, tuple[tuple[int, int], ...]] = {"nvfp4_gemm": ((10, 0),)}
# Device classes the route table is printed for (the compile targets of this project).
DEVICE_CLASSES = {"cpu": None, "sm80 (A100)": (8, 0), "sm90 (H100/H200)": (9, 0), "sm100 (B200)": (10, 0)}


class BackendUnavailableError(RuntimeError):
    """An explicitly named backend cannot run this op on this device."""


def compiled_archs() -> tuple[tuple[int, int], ...]:
    archs = []
    for a in _library.EXTENSION.build_info.get("cuda_archs", "").split(";"):
        a = a.removesuffix("+PTX").rstrip("af")
        if a:
            major, minor = a.split(".")
            archs.append((int(major), int(minor)))
    return tuple(archs)


def _cuda_backend_reason(op: str, capability: tuple[int, int] | None) -> str | None:
    """None when the compiled CUDA kernel can run `op` on a device of this capability, else why not."""
    if op in _schemas.COMPOSITE:
        return _cuda_backend_reason("qk_norm_rope", capability)
    if not _library.has_compiled_kernel(op, "CUDA"):
        return f"no CUDA kernel of wan::{op} in this build of wan_kernels._C ({_library.EXTENSION.error or 'built'})"
    if capability is not None:
        if capability not in compiled_archs():
            return f"wan_kernels._C was not compiled for sm_{capability[0]}{capability[1]} (archs {compiled_archs()})"
        limits = CUDA_ARCH_LIMITS.get(op)
        if limits and capability not in limits:
            return f"the CUDA kernel of wan::{op} needs compute capability {limits}, device has {capability}"
    return None


def _triton_reason(op: str, on_cuda: bool) -> str | None:
    base = "qk_norm_rope" if op in _schemas.COMPOSITE else op
    if base not in triton_kernels.KERNELS:
        return f"wan::{base} has no Triton kernel"
    if not on_cuda and not interpreter_enabled():
        return "Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    return None


def unavailable_reason(op: str, backend: str, device: torch.device) -> str | None:
    if backend == "ref":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs CPU tensors, got {device}"
        base = "qk_norm_rope" if op in _schemas.COMPOSITE else op
        return None if _library.has_compiled_kernel(base, "CPU") else f"no C++ CPU kernel of wan::{base} in _C"
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs CUDA tensors, got {device}"
        return _cuda_backend_reason(op, torch.cuda.get_device_capability(device))
    if backend == "triton":
        return _triton_reason(op, device.type == "cuda")
    raise ValueError(f"unknown backend {backend!r}; expected one of {IMPLS}")


def _compose_qkv_rope(qk_norm_rope_fn):
    def qkv_rope(x, w_qkv, b_qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps):
        qkv = torch.nn.functional.linear(x, w_qkv, b_qkv)
        return qk_norm_rope_fn(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps)

    return qkv_rope


_RESOLVED: dict[tuple[str, str, torch.device], object] = {}  # a plain dict: torch.compile traces lookups


def _resolve(op: str, impl: str, device: torch.device):
    key = (op, impl, device)
    fn = _RESOLVED.get(key)
    if fn is None:
        fn = _RESOLVED[key] = _resolve_uncached(op, impl, device)
    return fn


def _resolve_uncached(op: str, impl: str, device: torch.device):
    if impl == "auto":
        return getattr(torch.ops.wan, op).default
    reason = unavailable_reason(op, impl, device)
    if reason is not None:
        raise BackendUnavailableError(f"wan::{op} with impl={impl!r} on {device}: {reason}")
    if impl == "ref":
        return _library.checked(op, _library.REFS[op])
    if op in _schemas.COMPOSITE:
        return _library.checked(op, _compose_qkv_rope(_resolve("qk_norm_rope", impl, device)))
    if impl == "triton":
        return _library.checked(op, triton_kernels.KERNELS[op])
    if impl == "cuda":  # the compiled CUDA kernel, possibly on its internal op
        return getattr(torch.ops.wan, _schemas.CUDA_KERNEL_OPS.get(op, op)).default
    return getattr(torch.ops.wan, op).default  # "cpu": the C++ kernel behind the dispatcher


def resolve(op: str, impl: str, device: torch.device | str):
    """The callable that runs `op` with backend `impl` on `device` (same signature as the op)."""
    if op not in _schemas.PUBLIC_OPS:
        raise ValueError(f"unknown op {op!r}; wan ops are {_schemas.PUBLIC_OPS}")
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _resolve(op, impl, device)


def auto_backend(op: str, capability: tuple[int, int] | None) -> str:
    """The backend `impl="auto"` uses for `op` on a device class (None = CPU)."""
    if op in _schemas.COMPOSITE:
        return auto_backend("qk_norm_rope", capability)
    if capability is None:
        return "cpu" if _library.has_compiled_kernel(op, "CPU") else "ref"
    if _cuda_backend_reason(op, capability) is None:
        return "cuda"
    if _triton_reason(op, on_cuda=True) is None:
        return "triton"
    return "ref"


def cuda_router(op: str):
    """CUDA kernel for the dispatcher when _C has none: the Triton kernel when there is one, else the
    reference; chosen once per device capability."""
    @functools.lru_cache(maxsize=None)
    def pick(capability):
        backend = auto_backend(op, capability)
        fn = triton_kernels.KERNELS[op] if backend == "triton" else _library.REFS[op]
        return _library.checked(op, fn)

    def run(*args):
        device = next(a for a in args if isinstance(a, torch.Tensor)).device
        return pick(torch.cuda.get_device_capability(device))(*args)

    run.__name__ = f"{op}_cuda_router"
    return run


def route_table() -> dict[str, dict[str, str]]:
    """{op: {device class: backend used by impl="auto"}} for CPU and the sm80/sm90/sm100 targets."""
    return {op: {name: auto_backend(op, cap) for name, cap in DEVICE_CLASSES.items()} for op in _schemas.PUBLIC_OPS}
