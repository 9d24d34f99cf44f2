"""One spec per op: the single place an op of the `wan` namespace is described.

Registration (wan_kernels/_library.py), routing (wan_kernels/routing.py), the autograd rule, the self-check of
`python -m wan_kernels`, the sample inputs of the tests and the GPU check, the FLOP formulas and the cost model's
fused-kernel numbers are all derived from the `OpSpec`s in `SPECS`. Each op's spec sits next to its typed
wrapper in wan_kernels/ops/<op>.py; its kernels are wan_kernels/ref/, wan_kernels/triton/ and csrc/.

Adding an op: write wan_kernels/ops/<op>.py with `SPEC = register(OpSpec(...))`, the wrapper and `__all__`
(wan_kernels/ops/__init__.py imports every module there), its kernels (wan_kernels/ref/<op>.py with `__all__`,
wan_kernels/triton/<op>.py; C++/CUDA: csrc/<op>/ and the same schema in csrc/registration.cpp, which
tests/test_library.py pins equal; a Python-only op says cpp=False), its test and its bench (README.md, "Adding an
op"). tests/test_routing.py registers a toy op from one spec, and adds one as files to a copy of the package.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class CudaKernel:
    """A compiled CUDA kernel of `_C` behind an op. It sits on the internal op `op` (declared in
    csrc/registration.cpp with the op's schema under that name), never on the public op itself, so the Python
    router decides per device capability whether it can run. `targets`: the build targets (WAN_CUDA_ARCHS
    entries, e.g. "10.0a") whose code holds it; None = every target of the build. `accepts(*args)`: the calls
    the kernel takes (None: all); under impl="auto" the route runs the next backend for the others, a named
    impl="cuda" lets the kernel refuse them."""
    op: str
    targets: tuple[str, ...] | None = None
    accepts: Callable | None = None


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """Everything about one op.

    name, schema: `torch.ops.<namespace>.<name>`, schema string without the namespace.
    check(*args): raises ValueError naming the argument and quoting its shape/dtype.
    ref: the pure-torch reference (wan_kernels/ref/<op>.py), the spec of the numerics.
    samples(Sampler) -> the positional arguments of one small deterministic call.
    fake(*args): shapes only (torch.compile, meta tensors); None for a composite.
    differentiable: the argument names gradients flow to (any other input requiring grad raises).
    training_op: for an inference-only op (no differentiable inputs), the op to train with instead: an input
        requiring grad raises one line naming it (wan::attention_int8 -> attention).
    backward(inputs, grads, needs_input_grad) -> one gradient (or None) per input: the op's backward, built from
        backward ops of its own (each an op with a fake, so torch.compile traces training steps); inputs are the
        forward's arguments, grads one per output (None where the output gets no gradient). None = the
        reference's vector-Jacobian product (wan_kernels/_autograd.py).
    save_outputs: the autograd also saves the forward's outputs and calls
        backward(inputs, grads, needs_input_grad, outputs=..., impl=...): impl is "auto" on the dispatcher's path
        (its backward ops route by device) and "triton" for the named Triton backend (its backward ops too).
    forward_for_grad: an op of its own (same arguments, a spec of its own) returning this op's outputs followed by
        what the backward needs (attention: the per-set log-sum-exp); when gradients are needed the op's Autograd
        kernel runs it in place of the forward (one forward, nothing recomputed) and `outputs` holds all of its
        results. Implies save_outputs.
    triton: the Triton launcher (same signature), or None.
    triton_for(capability) -> the Triton launcher for a CUDA device class where it differs by arch (attention:
        the TMA / warp-specialised kernel on the arch classes `attention_ws.ROUTED_ARCH_CLASSES` names); None =
        `triton` on every device. Routing reads it through `triton_launcher` (auto and the named backend alike).
    cuda: the compiled CUDA kernel, or None.
    compose(part) -> callable: a composite op built from the ops named in `parts`; part(name) gives the callable
        of a part (its dispatcher op, or its named backend). Composites have no kernels of their own.
    flops(*shapes): matmul FLOPs from the argument shapes (FlopCounterMode's convention), or None.
    constant, weights: arguments independent of the batch (weights, tables) / model parameters among them
        (the cost model's `const` and `weight` bytes).
    internal_of: for the internal op carrying a CudaKernel, the public op it serves.
    cpp: the schema is declared by `_C`'s TORCH_LIBRARY (csrc/registration.cpp: every op of the namespace with
        C++/CUDA kernels or a schema there); False: a Python-only op (Triton and reference kernels), declared
        by wan_kernels/_library.py.
    """
    name: str
    schema: str
    check: Callable
    ref: Callable
    samples: Callable
    fake: Callable | None = None
    differentiable: tuple[str, ...] = ()
    training_op: str | None = None
    backward: Callable | None = None
    save_outputs: bool = False
    forward_for_grad: str | None = None
    triton: Callable | None = None
    triton_for: Callable | None = None
    cuda: CudaKernel | None = None
    compose: Callable | None = None
    parts: tuple[str, ...] = ()
    flops: Callable | None = None
    constant: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()
    namespace: str = "wan"
    internal_of: str | None = None
    cpp: bool = True

    def triton_launcher(self, capability: tuple[int, int] | None = None) -> Callable | None:
        """The Triton launcher for a device class (capability; None = CPU under the interpreter)."""
        if self.triton_for is not None and capability is not None:
            return self.triton_for(capability)
        return self.triton

    @property
    def qualname(self) -> str:
        return f"{self.namespace}::{self.name}"

    @functools.cached_property
    def _parsed(self):
        return torch._C.parse_schema(self.qualname + self.schema[len(self.name):])

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self._parsed.arguments)

    @property
    def n_returns(self) -> int:
        return len(self._parsed.returns)

    @property
    def saves_outputs(self) -> bool:
        """The autograd saves the forward's outputs (save_outputs, or a forward_for_grad's extra outputs)."""
        return self.save_outputs or self.forward_for_grad is not None

    @property
    def packet(self):
        """The dispatcher op `torch.ops.<namespace>.<name>`."""
        return getattr(getattr(torch.ops, self.namespace), self.name)

    def cost(self, *args) -> dict[str, int]:
        """FLOPs and HBM bytes of ONE fused kernel of this op at `args` (meta tensors suffice): every input read
        once (a broadcast operand counts its distinct elements), every output (from the fake) written once;
        `const`/`weight`: the bytes of the inputs named in `constant`/`weights`. Keys match wan_model.cost.Kernel."""
        tensors = {n: a for n, a in zip(self.arg_names, args) if isinstance(a, torch.Tensor)}
        out = self.fake(*args)

        def nbytes(ts) -> int:
            return sum(t.numel() * t.element_size() for t in ts)

        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]
        return {"flops": self.flops(*shapes) if self.flops else 0, "read": nbytes(tensors.values()),
                "write": nbytes(out if isinstance(out, tuple) else (out,)),
                "const": nbytes(t for n, t in tensors.items() if n in self.constant),
                "weight": nbytes(t for n, t in tensors.items() if n in self.weights)}

    def internal(self) -> "OpSpec | None":
        """The spec of the internal op carrying the CUDA kernel (same schema, fake, reference, checks)."""
        if self.cuda is None:
            return None
        return dataclasses.replace(self, name=self.cuda.op, schema=self.cuda.op + self.schema[len(self.name):],
                                   triton=None, cuda=None, internal_of=self.name)


def checked(spec: OpSpec, fn: Callable) -> Callable:
    """`fn` with the op's argument checks in front (`__wrapped__`: the backend function behind them)."""
    check = spec.check

    def run(*args):
        check(*args)
        return fn(*args)

    run.__name__ = f"{spec.name}_{getattr(fn, '__name__', 'impl')}"
    run.__wrapped__ = fn
    return run


SPECS: dict[str, OpSpec] = {}  # public op name -> spec, in registration order


def register(spec: OpSpec) -> OpSpec:
    if not spec.schema.startswith(spec.name + "("):
        raise ValueError(f"OpSpec {spec.name!r}: schema must start with '{spec.name}(', got {spec.schema!r}")
    if (spec.fake is None) == (spec.compose is None) or bool(spec.compose) != bool(spec.parts):
        raise ValueError(f"OpSpec {spec.name!r}: give a fake (an op with kernels) or compose + parts (a composite)")
    SPECS[spec.name] = spec
    return spec


def all_specs(namespace: str = "wan") -> list[OpSpec]:
    """Public and internal specs of a namespace."""
    out = []
    for s in SPECS.values():
        if s.namespace == namespace:
            out += [s] + ([s.internal()] if s.cuda else [])
    return out


class Sampler:
    """Deterministic small inputs for `OpSpec.samples`: activations in `dtype` on `device`; operands that are
    fp32 by contract (RoPE tables, adaLN scale/shift/gate, NVFP4 global scales) are asked for in fp32."""

    def __init__(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0):
        self.dtype, self.device = dtype, torch.device(device)
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape: int, dtype: torch.dtype | None = None, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=self.g) * scale).to(device=self.device, dtype=dtype or self.dtype)

    def rope(self, s: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos, sin [s, d/2] of random angles."""
        ang = torch.rand(s, d // 2, generator=self.g).to(self.device) * 6.0
        return ang.cos(), ang.sin()

    def nvfp4(self, m: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(packed, block_scale, global_scale) of a random fp32 [m, k] matrix, quantized by the reference."""
        from wan_kernels import nvfp4, ref

        x = self.randn(m, k, dtype=torch.float32)
        gs = nvfp4.global_scale(x)
        return (*ref.nvfp4_quantize(x, gs), gs)
