"""Autograd of the `wan` ops: which inputs each op is differentiable in, and one backward per op.

The backward is the op's `OpSpec.backward` (backward kernels, themselves ops) where it has one; else it
recomputes the op's pure-torch reference (wan_kernels/ref) from the saved inputs under autograd and returns
its vector-Jacobian product (`_vjp`), so that backend's gradients are the reference's (computed at the
inputs' precision: fp32 math, one rounding to the input dtype); the forward keeps its fast kernel either
way. Memory: the inputs are saved, and `_vjp` holds the reference's intermediates (attention: the [Sq, Sk]
probabilities) for one op at a time.

One rule on every path, the dispatcher's `torch.ops.wan.<op>` (`register`) and the named backends of
wan_kernels/routing.py that do not go through it (`backend`):
  * grad mode on and an input in OPS[op].differentiable requires grad: the outputs carry this backward;
  * grad mode on and any other tensor input requires grad (NVFP4 codes and scales, global scales, rope
    tables; every input of nvfp4_quantize/dequantize/gemm; every input of an inference-only op, whose
    message names the op to train with: `OpSpec.training_op`): RuntimeError at forward time naming the
    argument, never a silent None gradient.
"""

from __future__ import annotations


import torch

from wan_kernels._spec import SPECS, OpSpec

OPS: dict[str, OpSpec] = {}  # op (public or internal) -> its spec: everything the rule reads; filled by `register`


def _check_not_differentiable(op: str, args) -> None:
    """RuntimeError when an input outside OPS[op].differentiable requires grad (callers: grad mode is on)."""
    spec = OPS[op]
    diff = spec.differentiable
    for name, a in zip(spec.arg_names, args):
        if isinstance(a, torch.Tensor) and a.requires_grad and name not in diff:
            if spec.training_op is not None:
                raise RuntimeError(f"{spec.qualname} is inference only (no gradients), but {name} requires grad: "
                                   f"train with wan_kernels.{spec.training_op} ({spec.namespace}::"
                                   f"{spec.training_op}, bf16), or call it under torch.no_grad()")
            what = (f"{spec.qualname} is not differentiable" if not diff else
                    f"{spec.qualname} is differentiable only in {', '.join(diff)}")
            raise RuntimeError(f"{what}, but {name} requires grad: pass {name}.detach() or call it under "
                               f"torch.no_grad()")


def _setup_context(op: str):
    saves_outputs = OPS[op].saves_outputs

    def setup_context(ctx, inputs, output):
        _check_not_differentiable(op, inputs)  # runs only when grad mode is on and an input requires grad
        outputs = (output if isinstance(output, tuple) else (output,)) if saves_outputs else ()
        ctx.save_for_backward(*(a if isinstance(a, torch.Tensor) else None for a in inputs), *outputs)
        ctx.constants = tuple(None if isinstance(a, torch.Tensor) else a for a in inputs)

    return setup_context


def _vjp(op: str, inputs, grads, needs_input_grad) -> tuple:
    """Gradients of the reference of `op` at `inputs` for the output gradients `grads`, one per input
    (None where no gradient is needed). Differentiable itself when grad mode is on (double backward)."""
    create_graph = torch.is_grad_enabled()
    wanted = [i for i, need in enumerate(needs_input_grad) if need]
    with torch.enable_grad():
        leaves = list(inputs)
        if not create_graph:
            for i in wanted:
                leaves[i] = inputs[i].detach().requires_grad_()
        out = OPS[op].ref(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], [leaves[i] for i in wanted], [g for _, g in pairs],
                              allow_unused=True, create_graph=create_graph) if pairs and wanted else ()
    result = [None] * len(inputs)
    for i, g in zip(wanted, got):
        result[i] = g
    return tuple(result)


def _backward(op: str, impl: str = "auto"):
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        n = len(ctx.constants)
        inputs = [t if t is not None else c for t, c in zip(saved[:n], ctx.constants)]
        spec = OPS[op]
        custom = spec.backward
        if custom is None:
            return _vjp(op, inputs, grads, ctx.needs_input_grad)
        if spec.saves_outputs:
            return tuple(custom(inputs, grads, ctx.needs_input_grad, outputs=saved[n:], impl=impl))
        return tuple(custom(inputs, grads, ctx.needs_input_grad))

    return backward


def _function(op: str, fn, forward_fn=None, impl: str = "auto"):
    """An autograd.Function running `fn` with op's backward. `forward_fn` (the op's forward_for_grad, same
    arguments, more outputs) runs in its place; the Function returns the op's own outputs and saves all."""
    setup_context, backward = _setup_context(op), _backward(op, impl)
    n_out = OPS[op].n_returns

    def forward(ctx, *args):
        if forward_fn is None:
            out = fn(*args)
            setup_context(ctx, args, out)
            return out
        res = forward_fn(*args)
        setup_context(ctx, args, res)
        return res[0] if n_out == 1 else tuple(res[:n_out])

    return type(f"wan_{op}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def _autograd_kernel(spec: OpSpec):
    """The Autograd dispatch-key kernel of an op with a forward_for_grad (built as torch.library.register_autograd
    builds its kernel: an autograd.Function around a call below the Autograd key): under grad mode with an input
    requiring grad, the forward_for_grad op runs in place of the op; else the op itself, redispatched."""
    packet = spec.packet.default
    grad_forward = SPECS[spec.forward_for_grad].packet.default

    def below_autograd(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return grad_forward(*args)

    function = _function(spec.name, None, below_autograd)

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return packet.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    return kernel


def backend(spec: OpSpec, fn, *, own_autograd: bool, capability: tuple[int, int] | None = None):
    """`fn`, a backend of the op (same signature), as routing hands it out: the op's argument checks, then
    the rule above. own_autograd: `fn` is differentiable by itself (the dispatcher op, whose autograd
    `register` installs; the reference; a composite of those), else it runs in an autograd.Function
    with the op's backward (the Triton launchers; `capability`: the device class they were picked for, which
    picks the forward_for_grad's launcher too)."""
    op, check = spec.name, spec.check
    # not own_autograd: `fn` is a Triton launcher (routing), and so is the forward_for_grad run in its place
    grad_forward = spec.forward_for_grad and SPECS[spec.forward_for_grad]
    function = None if own_autograd else _function(op, fn, grad_forward and grad_forward.triton_launcher(capability),
                                                   "triton")

    def run(*args):
        check(*args)
        if torch.is_grad_enabled():  # a plain loop: torch.compile traces it (not torch._C._any_requires_grad)
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    _check_not_differentiable(op, args)
                    if function is not None:
                        return function.apply(*args)
                    break
        return fn(*args)

    run.__name__ = f"{op}_{getattr(fn, '__name__', 'impl')}"
    run.__wrapped__ = fn  # the backend function behind the checks
    return run


def register(lib: torch.library.Library, spec: OpSpec) -> None:
    """Record the op's rule and register its autograd with the dispatcher (composites differentiate
    through their parts)."""
    OPS[spec.name] = spec
    if spec.forward_for_grad is not None:
        lib.impl(spec.name, _autograd_kernel(spec), "Autograd", with_keyset=True)
    elif spec.compose is None:
        torch.library.register_autograd(spec.qualname, _backward(spec.name), setup_context=_setup_context(spec.name),
                                        lib=lib)
