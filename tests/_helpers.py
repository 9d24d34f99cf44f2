"""Helpers shared by test modules that are not fixtures (fixtures: tests/conftest.py; inputs: tests/_inputs.py;
model builders and inputs: wan_model/testing.py; accuracy rules: wan_kernels/testing.py): the tiny variants, one
forward of ours / of diffusers, diffusers' dtype rule and loader, NVFP4 bit-exactness, a time limit, the
dispatcher per simulated device class, opcheck and bit equality on float8 inputs."""

from __future__ import annotations

import contextlib
import signal

import torch

from wan_kernels import routing
from wan_kernels._spec import SPECS

VARIANTS = ("tiny-t2v", "tiny-i2v", "tiny-flf2v", "tiny-ti2v")


def run_ours(model, inputs, **kw):
    """One no-grad forward of our model on make_inputs' (x, t, text, image)."""
    x, t, text, img = inputs
    with torch.no_grad():
        return model(x, t, text, img, **kw)


def run_diffusers(ref, inputs):
    """One no-grad forward of a diffusers WanTransformer3DModel on make_inputs' (x, t, text, image)."""
    x, t, text, img = inputs
    with torch.no_grad():
        return ref(x, t, text, img, return_dict=False)[0]


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality of two tensors of one dtype and shape, float8_e4m3fn included (compared as bytes: torch has no
    equality kernel for it)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        *(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in (a, b)))


def assert_same_quant(a, b):
    """Two NVFP4 quantizations (packed codes, e4m3 block scales) are bit-identical."""
    assert torch.equal(a[0], b[0]), "packed codes differ"
    assert torch.equal(a[1].view(torch.uint8), b[1].view(torch.uint8)), "block scales differ"


def diffusers_bf16_like(ref, dtype=torch.bfloat16):
    """Cast a diffusers model as `from_pretrained(torch_dtype=dtype)` holds it: parameters under
    `_keep_in_fp32_modules` (matched on dot-separated name parts, diffusers' rule) stay fp32."""
    keep = type(ref)._keep_in_fp32_modules
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if not any(k in name.split(".") for k in keep):
                p.data = p.data.to(dtype)
    return ref


def diffusers_from_pretrained(path, dtype=torch.float32):
    """diffusers' own WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype) on our saved dir (its
    config, shard-index, key loading and fp32-keep rule; needs `accelerate`, in requirements.txt)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(path, torch_dtype=dtype).eval()


@contextlib.contextmanager
def within(seconds: float):
    """Fail (instead of hanging the suite) when the block runs longer than `seconds` (SIGALRM)."""
    def fire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


TRITON_FROM_SM80 = {"cpu": "ref", "sm80": "triton", "sm86": "triton", "sm89": "triton", "sm90": "triton",
                    "sm100": "triton", "sm103": "triton", "sm120": "triton"}


def assert_dispatch_per_device_class(op, args, routes, capability, monkeypatch):
    """`op`'s route table is `routes`, and on every simulated device class (and sm_75, which has no class: ref) the
    dispatcher's CUDA kernel runs that backend on `args`: the route holds the spec's launcher or reference, and the
    backend the dispatcher resolves is the one called (`capability`: the conftest fixture)."""
    assert routing.route_table()[op] == routes
    spec = SPECS[op]
    for name, cap in [*((n, c) for n, c in routing.DEVICE_CLASSES.items() if c), ("sm75", (7, 5))]:
        capability(cap)
        backend = routing.auto_backend(op, cap)
        assert backend == routes.get(name, "ref"), name
        assert routing.route(op, cap).fn.__wrapped__ is (spec.triton if backend == "triton" else spec.ref), name
        ran = []
        monkeypatch.setattr(routing, "backend_fn", lambda s, b, c=None: lambda *a: ran.append(b) or s.ref(*a))
        routing.clear_caches()
        spec.packet.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)
        monkeypatch.undo()
        capability(cap)
        assert ran == [backend], name


def opcheck(op: str, args) -> None:
    """torch.library.opcheck of torch.ops.wan.<op> on `args`. With float8_e4m3fn inputs, opcheck's test_schema
    (SchemaCheckMode compares inputs with allclose, which torch does not implement for float8) is replaced by its
    promise checked on the raw bytes: no input mutated; the other three checks run as usual."""
    fp8_inputs = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn]
    if not fp8_inputs:
        torch.library.opcheck(getattr(torch.ops.wan, op).default, args)
        return
    torch.library.opcheck(getattr(torch.ops.wan, op).default, args,
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    before = [a.view(torch.uint8).clone() for a in fp8_inputs]
    getattr(torch.ops.wan, op)(*args)
    assert all(torch.equal(b, a.view(torch.uint8)) for a, b in zip(fp8_inputs, before))
