"""How a Triton launcher runs its kernel: one prepared `Launch`, run compiled on CUDA tensors (under the tensors'
device), interpreted on CPU tensors, and compiled ahead of time by readiness from the same object.

Every launcher is split in two: `prepare_*(..., capability)` checks nothing new, allocates the outputs, picks the
config for `capability` ((major, minor) of the target GPU; None = the Triton interpreter) and returns a `Launch`
(kernel, grid, positional args, constexprs + compile options); `run(launch)` launches it. A real call takes
`capability` from the tensor's device (`target`); `tools.readiness` / `aot.compile_launch` take the same
`Launch` built on meta tensors of Wan's shapes and let Triton's own binder derive the specialisation (ints equal
to 1 become constexprs, multiples of 16 and 16-byte aligned pointers get `tt.divisibility`), so what readiness
compiles is what the runtime compiles.

TRITON_INTERPRET is read per call (not at import): each kernel is a `JITFunction` built explicitly (not by
`@triton.jit`, which returns an interpreted function when TRITON_INTERPRET=1 is set at import), and its
interpreted twin is made on demand; CUDA tensors always run the compiled kernel. The routing reads the same switch.
"""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, Callable

import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# Compile options of kernels whose results are claimed bit-identical to the reference / C++ kernels (built with
# -ffp-contract=off): no mul+add -> fma contraction (Triton's default contracts; the interpreter does not).
EXACT = {"enable_fp_fusion": False}


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_interpreter(t: torch.Tensor, op: str) -> bool:
    """True when `t` is a CPU tensor to run through the Triton interpreter; CUDA tensors run compiled.
    A CPU tensor without TRITON_INTERPRET=1 raises: the compiled kernel cannot run there."""
    if t.device.type == "cuda":
        return False
    if not interpreter_enabled():
        raise RuntimeError(f"{op} (triton): CPU tensors need TRITON_INTERPRET=1")
    return True


def target(t: torch.Tensor, op: str) -> tuple[int, int] | None:
    """The capability a launch on `t` compiles for: its CUDA device's, or None (interpreter, CPU tensor)."""
    return None if on_interpreter(t, op) else tuple(torch.cuda.get_device_capability(t.device))


def mma_class(capability: tuple[int, int]) -> str:
    """The tensor-core instruction class Triton emits for a capability, which tile configs are keyed on:
    "wgmma" on sm_90 (sm_90a), "tcgen05" on the sm_100 family (10.x), "mma.sync" elsewhere (sm_80, sm_86, sm_87,
    sm_89, sm_120/121: warp MMA, ~100 KB of shared memory per block except sm_80/87)."""
    major, minor = capability
    if (major, minor) == (9, 0):
        return "wgmma"
    if major == 10:
        return "tcgen05"
    return "mma.sync"


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: `kernel[grid](*args, **kwargs)` on `device` (kwargs: constexprs and compile options)."""
    kernel: JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict[str, Any]
    device: torch.device
    interpreted: Callable[[JITFunction], InterpretedFunction] | None = None  # builds the interpreter flavour


def interpreter_twin(kernel: JITFunction) -> InterpretedFunction:
    """`Launch.interpreted` for kernels that call JITFunction helpers, which the interpreter cannot call: the
    kernel and every wan_kernels helper reachable from it are re-created as plain functions, each over a copy of
    its own module's namespace in which that module's helpers (its own and those it imported from wan_kernels,
    not Triton's) are plain functions too."""
    spaces: dict[int, dict] = {}

    def space(module_globals: dict) -> dict:
        key = id(module_globals)
        if key not in spaces:
            spaces[key] = ns = dict(module_globals)  # registered before filling: helpers may refer to each other
            for name, value in module_globals.items():
                if isinstance(value, JITFunction) and value.fn.__module__.startswith("wan_kernels."):
                    ns[name] = plain(value.fn)
        return spaces[key]

    def plain(f):
        g = types.FunctionType(f.__code__, space(f.__globals__), f.__name__, f.__defaults__, f.__closure__)
        g.__annotations__ = dict(f.__annotations__)
        g.__kwdefaults__ = f.__kwdefaults__
        return g

    return InterpretedFunction(plain(kernel.fn))


# Keyed by id(): a JITFunction hashes by its cache key, which walks the functions it calls, and raises when
# TRITON_INTERPRET=1 was set at import (helpers decorated with @triton.jit are interpreted functions then). The
# kernels are module-level objects that live as long as the process.
_INTERPRETED: dict[int, InterpretedFunction] = {}


def kernel_for(launch: Launch):
    """The function object `run` calls: the compiled kernel for CUDA devices, the interpreted one otherwise."""
    if launch.device.type == "cuda":
        return launch.kernel
    key = id(launch.kernel)
    if key not in _INTERPRETED:
        make = launch.interpreted or (lambda k: InterpretedFunction(k.fn))
        _INTERPRETED[key] = make(launch.kernel)
    return _INTERPRETED[key]


def run(launch: Launch) -> None:
    """Launch on the tensors' device (Triton launches on the current device and its current stream)."""
    fn = kernel_for(launch)
    if launch.device.type == "cuda":
        with torch.cuda.device(launch.device):
            fn[launch.grid](*launch.args, **launch.kwargs)
    else:
        fn[launch.grid](*launch.args, **launch.kwargs)
