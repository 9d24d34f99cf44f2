"""Which backend runs each op: ONE route table (op, device class) -> backend + callable, built lazily once per
(op, capability) from the op specs (wan_kernels/_spec.py), used both to dispatch and to report.

Backends:
  "cuda"   CUDA/CUTLASS kernels of `wan_kernels._C`, on the op's internal op (`OpSpec.cuda`); or a CUDA
           kernel torch ships (`TorchCudaKernel`: cuBLASLt FP8 through torch._scaled_mm from sm_89 on)
  "cpu"    C++ CPU kernels of `wan_kernels._C` (CPU tensors)
  "triton" Triton kernels (CUDA tensors of compute capability >= 8.0, or CPU tensors under TRITON_INTERPRET=1)
  "ref"    the pure-torch references (any device)
`impl="auto"` calls the dispatcher op `torch.ops.wan.<op>`. Its CPU kernel is the C++ one, else the reference.
Its CUDA kernel is `cuda_router(spec)`, which runs `route(op, capability).fn`: the compiled CUDA kernel where
code of the build runs on the device (`code_runs_on`), else the Triton kernel, else the reference. `route_table()`
and `python -m wan_kernels` print the `.backend` of the same routes. A named backend that cannot run raises
BackendUnavailableError; it never falls back silently. Every backend runs the op's argument checks (the C++
kernels their TORCH_CHECKs) and the same autograd rule (wan_kernels/_autograd.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from wan_kernels import _autograd, _extension
from wan_kernels._spec import SPECS, CudaKernel, OpSpec, checked
from wan_kernels.triton._launch import interpreter_enabled

BACKENDS = ("cuda", "cpu", "triton", "ref")
IMPLS = ("auto",) + BACKENDS
# The Triton kernels use bf16 tensor-core dots (mma.sync and newer): compute capability 8.0 or above.
TRITON_MIN_CAPABILITY = (8, 0)
# The device classes of the route table: CPU, the build targets and the consumer GPUs people own.
DEVICE_CLASSES: dict[str, tuple[int, int] | None] = {
    "cpu": None, "sm80": (8, 0), "sm86": (8, 6), "sm89": (8, 9), "sm90": (9, 0), "sm100": (10, 0), "sm103": (10, 3),
    "sm120": (12, 0),
}
GPUS = {"sm80": "A100", "sm86": "RTX 3090, A40", "sm89": "RTX 4090, L40S", "sm90": "H100, H200", "sm100": "B200",
        "sm103": "B300", "sm120": "RTX 5090, RTX PRO 6000"}


class BackendUnavailableError(RuntimeError):
    """An explicitly named backend cannot run this op on this device."""


@dataclasses.dataclass(frozen=True)
class TorchCudaKernel(CudaKernel):
    """An op's CUDA kernel that torch itself ships (e.g. cuBLASLt's FP8 GEMM behind `torch._scaled_mm`), not `_C`:
    `fn` (the op's signature) runs on every CUDA device of capability >= `min_capability`, whatever `_C` was
    built with. Like a `_C` kernel it sits on the internal op `op` (wan_kernels/_library.py registers `fn` there)."""
    fn: Callable | None = None
    min_capability: tuple[int, int] = (0, 0)


def _parse_target(target: str) -> tuple[int, int, str, bool]:
    """"10.0a+PTX" -> (10, 0, "a", True)."""
    ptx = target.endswith("+PTX")
    major, _, minor = target.removesuffix("+PTX").partition(".")
    return int(major), int(minor[:1]), minor[1:], ptx


def code_runs_on(target: str, capability: tuple[int, int]) -> bool:
    """Whether the code nvcc emits for build target `target` (a WAN_CUDA_ARCHS entry) runs on `capability`.

    "8.0"        sm_80 SASS runs on the same major at an equal or newer minor (8.0, 8.6, 8.9), never on 9.x.
    "9.0a"       arch-specific SASS (wgmma, tcgen05) runs on exactly that capability: sm_90a on 9.0, sm_100a on 10.0.
    "10.0f"      family-specific SASS runs on the same major at an equal or newer minor (10.0, 10.3).
    "+PTX"       the PTX is JIT-compiled by the driver for any newer capability (plain targets; `a`/`f` PTX stays
                 within the arch / family).
    """
    major, minor, suffix, ptx = _parse_target(target)
    if suffix == "a":
        return capability == (major, minor)
    if capability[0] == major and capability[1] >= minor:
        return True
    return ptx and not suffix and capability >= (major, minor)


def _cuda_reason(spec: OpSpec, capability: tuple[int, int] | None) -> str | None:
    """None when the op's compiled CUDA kernel runs on a device of `capability` (None: any CUDA device)."""
    if spec.cuda is None:
        return f"{spec.qualname} has no CUDA kernel"
    if isinstance(spec.cuda, TorchCudaKernel):
        need = spec.cuda.min_capability
        return None if capability is None or capability >= need else (
            f"the CUDA kernel of {spec.qualname} needs compute capability >= {need}, device has {capability}")
    if not _extension.has_compiled_kernel(spec.cuda.op, "CUDA"):
        return (f"no CUDA kernel of {spec.namespace}::{spec.cuda.op} in this build of wan_kernels._C "
                f"({_extension.EXTENSION.error or 'built without it'})")
    targets = [t for t in _extension.build_targets() if spec.cuda.targets is None
               or t.removesuffix("+PTX") in spec.cuda.targets]
    if capability is not None and not any(code_runs_on(t, capability) for t in targets):
        return (f"the CUDA kernel of {spec.qualname} is compiled for {targets} (WAN_CUDA_ARCHS), none of which runs "
                f"on sm_{capability[0]}{capability[1]}")
    return None


def _triton_reason(spec: OpSpec, capability: tuple[int, int] | None, on_cuda: bool) -> str | None:
    if spec.triton is None:
        return f"{spec.qualname} has no Triton kernel"
    if not on_cuda and not interpreter_enabled():
        return "Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    if on_cuda and capability is not None and capability < TRITON_MIN_CAPABILITY:
        return (f"the Triton kernels need compute capability >= {TRITON_MIN_CAPABILITY}, "
                f"device has {capability}")
    return None


def _reason(spec: OpSpec, backend: str, device_type: str, capability: tuple[int, int] | None) -> str | None:
    if spec.compose is not None:  # a composite runs where all its parts run
        for part in spec.parts:
            reason = _reason(SPECS[part], backend, device_type, capability)
            if reason is not None:
                return reason
        return None
    if backend == "ref":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"backend 'cpu' runs CPU tensors, got {device_type}"
        return None if _extension.has_compiled_kernel(spec.name, "CPU") else \
            f"no C++ CPU kernel of {spec.qualname} in _C"
    if backend == "cuda":
        if device_type != "cuda":
            return f"backend 'cuda' runs CUDA tensors, got {device_type}"
        return _cuda_reason(spec, capability)
    if backend == "triton":
        return _triton_reason(spec, capability, device_type == "cuda")
    raise ValueError(f"unknown backend {backend!r}; expected one of {IMPLS}")


def unavailable_reason(op: str, backend: str, device: torch.device | str) -> str | None:
    """None when backend `backend` can run `op` on `device`, else why not."""
    device = torch.device(device)
    capability = tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
    return _reason(SPECS[op], backend, device.type, capability)


# ---------------------------------------------------------------------------------------------
# The route table: (op, capability) -> Route. One dict, filled on first use; plain dicts so that
# torch.compile traces lookups.

@dataclasses.dataclass(frozen=True)
class Route:
    backend: str   # "cuda" | "cpu" | "triton" | "ref"
    fn: object     # what the dispatcher runs (for a GPU capability: the CUDA key's callable, checks included)


_ROUTES: dict[tuple[str, tuple[int, int] | None], Route] = {}
_CAPABILITY: dict[int | None, tuple[int, int]] = {}          # CUDA device index -> capability
_RESOLVED: dict[tuple[str, str, torch.device, bool], object] = {}


def clear_caches() -> None:
    """Forget every route (tests simulating another device or build)."""
    _ROUTES.clear()
    _CAPABILITY.clear()
    _RESOLVED.clear()


def backend_fn(spec: OpSpec, backend: str, capability: tuple[int, int] | None = None):
    """The raw callable of a (non-composite) op's backend, without the Python checks: "cuda" the internal op
    carrying the compiled kernel, "cpu" the dispatcher op (its CPU key is the C++ kernel), "triton" the
    launcher for the device class `capability` (`OpSpec.triton_launcher`), "ref" the reference."""
    if backend == "cuda":
        return getattr(getattr(torch.ops, spec.namespace), spec.cuda.op).default
    if backend == "cpu":
        return spec.packet.default
    return spec.triton_launcher(capability) if backend == "triton" else spec.ref


def _make_route(spec: OpSpec, capability: tuple[int, int] | None) -> Route:
    if spec.compose is not None:  # reported as its parts' route (the dispatcher decomposes it)
        return Route(route(spec.parts[0], capability).backend, spec.packet.default)
    if capability is None:
        backend = "cpu" if _extension.has_compiled_kernel(spec.name, "CPU") else "ref"
        return Route(backend, spec.packet.default)
    candidates = [b for b in ("cuda", "triton", "ref") if b == "ref" or _reason(spec, b, "cuda", capability) is None]
    backend = candidates[0]
    fn = checked(spec, backend_fn(spec, backend, capability))
    if backend == "cuda" and spec.cuda.accepts is not None:  # calls the kernel refuses: the next backend
        fn = _when(spec.cuda.accepts, fn, checked(spec, backend_fn(spec, candidates[1], capability)))
    return Route(backend, fn)


def _when(accepts, fn, otherwise):
    """`fn` for the calls `accepts`, else `otherwise` (`__wrapped__`: fn's backend function)."""
    def run(*args):
        return fn(*args) if accepts(*args) else otherwise(*args)

    run.__name__, run.__wrapped__ = fn.__name__, fn.__wrapped__
    return run


def route(op: str, capability: tuple[int, int] | None) -> Route:
    """The route of `op` on a device class (capability; None = CPU)."""
    key = (op, capability)
    r = _ROUTES.get(key)
    if r is None:
        r = _ROUTES[key] = _make_route(SPECS[op], capability)
    return r


def auto_backend(op: str, capability: tuple[int, int] | None) -> str:
    """The backend `impl="auto"` uses for `op` on a device class (None = CPU)."""
    return route(op, capability).backend


def _device_capability(device: torch.device) -> tuple[int, int]:
    cap = _CAPABILITY.get(device.index)
    if cap is None:
        cap = _CAPABILITY[device.index] = tuple(torch.cuda.get_device_capability(device))
    return cap


def cuda_router(spec: OpSpec):
    """The CUDA-key kernel of a public op: runs the route of the tensors' device capability (one frame: the
    caches are read inline, `route` and `_device_capability` fill them on a device's first call)."""
    op = spec.name

    def run(*args):
        for a in args:
            if isinstance(a, torch.Tensor):
                device = a.device
                break
        cap = _CAPABILITY.get(device.index)
        r = _ROUTES.get((op, cap)) if cap is not None else None
        if r is None:
            r = route(op, _device_capability(device))
        return r.fn(*args)

    run.__name__ = f"{op}_cuda_router"
    return run


def route_table() -> dict[str, dict[str, str]]:
    """{op: {device class: backend used by impl="auto"}} for every public op and DEVICE_CLASSES."""
    return {op: {name: auto_backend(op, cap) for name, cap in DEVICE_CLASSES.items()} for op in public_ops()}


def triton_kernel(op: str, capability: tuple[int, int] | None) -> str | None:
    """The module-qualified name of the Triton launcher the route of `op` runs on a device class (e.g.
    "wan_kernels.triton.attention.attention"), None where the route is not Triton's."""
    r = route(op, capability)
    if r.backend != "triton" or capability is None:
        return None
    fn = r.fn.__wrapped__  # the launcher the route holds (what the dispatcher runs), behind the checks
    return f"{fn.__module__}.{fn.__name__}"


def public_ops(namespace: str = "wan") -> tuple[str, ...]:
    return tuple(op for op, s in SPECS.items() if s.namespace == namespace)


# ---------------------------------------------------------------------------------------------
# Callables handed out to the wrappers (resolve) and to the model (bind)

def _named(spec: OpSpec, impl: str, device: torch.device):
    reason = unavailable_reason(spec.name, impl, device)
    if reason is not None:
        raise BackendUnavailableError(f"{spec.qualname} with impl={impl!r} on {device}: {reason}")
    if impl == "ref":
        return _autograd.backend(spec, spec.ref, own_autograd=True)
    if spec.compose is not None:
        return _autograd.backend(spec, spec.compose(lambda part: resolve(part, impl, device)), own_autograd=True)
    # the dispatcher ops ("cpu", "cuda") differentiate through the autograd _library registers
    capability = _device_capability(device) if device.type == "cuda" else None
    return _autograd.backend(spec, backend_fn(spec, impl, capability), own_autograd=impl != "triton",
                             capability=capability)


def _checks_inside(spec: OpSpec, device: torch.device) -> bool:
    """Whether every kernel the dispatcher op runs on `device` runs the op's Python checks itself: the CUDA
    router's routes, the fake (meta), the checked reference as CPU kernel. A C++ CPU kernel (TORCH_CHECK) and
    devices without a kernel of ours need them in front of the dispatcher op."""
    if device.type in ("cuda", "meta"):
        return True
    return device.type == "cpu" and not _extension.has_compiled_kernel(spec.name, "CPU")


def _resolve(op: str, impl: str, device: torch.device | str, lean: bool):
    spec = SPECS.get(op)
    if spec is None:
        raise ValueError(f"unknown op {op!r}; ops are {tuple(SPECS)}")
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (op, impl, device, lean)
    fn = _RESOLVED.get(key)
    if fn is None:
        if impl != "auto":
            fn = _named(spec, impl, device)
        elif lean or (spec.compose is None and _checks_inside(spec, device)):
            fn = spec.packet.default
        elif spec.compose is not None:  # what the dispatcher decomposes it into, behind the composite's own rule
            fn = _autograd.backend(spec, spec.compose(lambda part: SPECS[part].packet.default), own_autograd=True)
        else:
            fn = _autograd.backend(spec, spec.packet.default, own_autograd=True)
        if not (impl == "triton" and device.type == "cpu"):  # that one runs while TRITON_INTERPRET=1: checked anew
            _RESOLVED[key] = fn
    return fn


def resolve(op: str, impl: str, device: torch.device | str):
    """The callable that runs `op` with backend `impl` on `device` (same signature as the op), its Python
    argument checks run once per call (ValueError naming the argument): in front of the backend, or, for
    impl="auto" where the dispatcher's kernel checks (`_checks_inside`), by that kernel. The wrappers' hot path:
    one dict lookup (a `torch.device` with its index, as `tensor.device` gives, hits the cache)."""
    fn = _RESOLVED.get((op, impl, device, False))
    return fn if fn is not None else _resolve(op, impl, device, lean=False)


def bind(op: str, impl: str, device: torch.device | str):
    """`resolve` for hot paths that bind once (the model's `bind_ops`): impl="auto" is the bare dispatcher op
    (C++ kernels check with TORCH_CHECK, Python kernels and the CUDA router run the Python checks); a named
    backend is the same callable as `resolve`'s."""
    return _resolve(op, impl, device, lean=True)
