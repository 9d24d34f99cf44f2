"""What the dispatcher runs is what the route table says, on every device class (capabilities simulated: no GPU);
compiled code is routed only where it runs; an op is added from one spec.

The CUDA cases call the dispatcher's own CUDA-key kernel of each op (`redispatch` with the CUDA key, on CPU
tensors) with `torch.cuda.get_device_capability` answering the simulated capability, and record which backend
the route hands the call to.
"""

from __future__ import annotations

import functools
import os
import re
import sys

import pytest
import torch

import wan_kernels
from wan_kernels import _extension, _library, routing, samples
from wan_kernels._spec import SPECS, OpSpec, Sampler, register
from wan_kernels.linear import NVFP4Linear, default_mode

DEFAULT_BUILD = ("8.0", "9.0a", "10.0a")
NO_CODE = (7, 5)  # T4: no SASS of the default build runs there, and the Triton kernels need 8.0
GPU_CLASSES = {c: cap for c, cap in routing.DEVICE_CLASSES.items() if cap is not None} | {"sm75": NO_CODE}

# Where the code of the default build runs, read off the CUDA compatibility rules by hand (SASS of sm_XY runs on
# sm_XZ, Z >= Y, of the same major; `a` targets on exactly their arch; no PTX in the build).
RUNS = {"8.0": {(8, 0), (8, 6), (8, 7), (8, 9)}, "9.0a": {(9, 0)}, "10.0a": {(10, 0)}}


def _known_build():
    """The dispatcher test below derives its expectations from RUNS: any build made of those targets (the
    default one, `make compat`'s 9.0a only) qualifies."""
    if not set(_extension.build_targets()) <= set(RUNS):
        pytest.skip(f"expectations are for builds of {sorted(RUNS)}, built {_extension.build_targets()}")


def _default_build():
    if _extension.build_targets() != DEFAULT_BUILD:
        pytest.skip(f"expectations are for WAN_CUDA_ARCHS={';'.join(DEFAULT_BUILD)}, "
                    f"built {_extension.build_targets()}")


def _expected(op: str, cap: tuple[int, int]) -> str:
    spec = SPECS[op]
    if spec.compose is not None:
        return _expected(spec.parts[0], cap)
    if isinstance(spec.cuda, routing.TorchCudaKernel):  # a kernel torch ships: every GPU from its capability on
        if cap >= spec.cuda.min_capability:
            return "cuda"
    elif spec.cuda is not None and any(cap in RUNS[t] for t in _extension.build_targets()
                                       if spec.cuda.targets is None or t in spec.cuda.targets):
        return "cuda"
    return "triton" if spec.triton is not None and cap >= (8, 0) else "ref"


def _cuda_key(spec: OpSpec, args):
    """Call the dispatcher's CUDA kernel of the op (what a CUDA tensor reaches below autograd)."""
    return spec.packet.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)


@pytest.mark.slow
@pytest.mark.parametrize("device_class", GPU_CLASSES)
@pytest.mark.parametrize("op", routing.public_ops())
def test_dispatcher_runs_the_backend_the_table_names(op, device_class, capability, monkeypatch):
    _known_build()
    cap = GPU_CLASSES[device_class]
    spec = SPECS[op]
    capability(cap)
    backend = routing.auto_backend(op, cap)
    assert backend == _expected(op, cap)  # it can run there
    if device_class in routing.DEVICE_CLASSES:
        assert routing.route_table()[op][device_class] == backend  # the report is the same table
    if spec.compose is not None:  # decomposed by the dispatcher: its parts are dispatched (and routed) each
        return
    # the callable the route holds is the backend's own
    want = {"cuda": lambda: getattr(torch.ops.wan, spec.cuda.op).default, "triton": lambda: spec.triton_launcher(cap),
            "ref": lambda: spec.ref}[backend]()
    assert routing.route(op, cap).fn.__wrapped__ is want
    # and the dispatcher's CUDA kernel runs it
    ran = []
    real = routing.backend_fn

    def spy(s, b, cap=None):
        real(s, b, cap)  # the backend exists (raises otherwise)
        return lambda *a: ran.append(b) or s.ref(*a)

    monkeypatch.setattr(routing, "backend_fn", spy)
    routing.clear_caches()
    args = samples.op_inputs()[op]
    if op == "nvfp4_gemm":  # a call the CUTLASS kernel takes (bf16 output; fp32 goes on: test below)
        args = (*args[:7], torch.bfloat16)
    if op == "fp8_linear":  # a call torch._scaled_mm takes (bf16; the others: tests/test_fp8.py)
        args = samples.op_inputs(torch.bfloat16)[op]
    _cuda_key(spec, args)
    assert ran == [backend]


def test_auto_nvfp4_gemm_runs_cutlass_on_sm100(capability, monkeypatch):
    # the defect: the CUDA router knew only triton/ref, so auto ran the reference on a B200
    _default_build()
    capability((10, 0))
    ran = []
    monkeypatch.setattr(routing, "backend_fn",
                        lambda s, b, cap=None: lambda *a: ran.append((s.name, b)) or s.ref(*a))
    args = samples.op_inputs()["nvfp4_gemm"]
    _cuda_key(SPECS["nvfp4_gemm"], (*args[:7], torch.bfloat16))
    assert ran == [("nvfp4_gemm", "cuda")]
    assert wan_kernels.route_table()["nvfp4_gemm"]["sm100"] == "cuda"


def test_auto_nvfp4_gemm_on_sm100_sends_calls_cutlass_refuses_to_triton(capability, monkeypatch):
    """CUTLASS writes bf16/fp16 only and needs K % 32 == 0, N % 8 == 0: under auto, an fp32 output (an fp32
    model's W4A4 linear) or such a shape runs the Triton kernel instead of raising in the launcher; a named
    impl="cuda" still reaches the kernel (which refuses)."""
    _default_build()
    capability((10, 0))
    ran = []
    monkeypatch.setattr(routing, "backend_fn", lambda s, b, cap=None: lambda *a: ran.append(b) or s.ref(*a))
    a, a_s, a_gs, b, b_s, b_gs, bias, _ = samples.op_inputs()["nvfp4_gemm"]  # K = 64, N = 24
    spec = SPECS["nvfp4_gemm"]
    for out_dtype, want in ((torch.float32, "triton"), (torch.float16, "cuda"), (torch.bfloat16, "cuda")):
        _cuda_key(spec, (a, a_s, a_gs, b, b_s, b_gs, bias, out_dtype))
        assert ran.pop() == want, out_dtype
    b20, b20_s, b20_gs = Sampler(seed=3).nvfp4(20, 64)  # N = 20: not a multiple of 8
    _cuda_key(spec, (a, a_s, a_gs, b20, b20_s, b20_gs, None, torch.bfloat16))
    assert ran.pop() == "triton"
    assert not spec.cuda.accepts(a, a_s, a_gs, b, b_s, b_gs, bias, torch.float32)


@pytest.mark.parametrize("cap, mode", [((10, 0), "w4a4"), ((9, 0), "w4a16"), ((10, 3), "w4a16"), ((12, 0), "w4a16"),
                                       ((8, 6), "w4a16")])
def test_nvfp4_linear_picks_w4a4_where_auto_runs_cutlass(cap, mode, capability):
    _default_build()
    capability(cap)
    assert default_mode("cuda") == mode
    lin = NVFP4Linear(32, 8, mode="auto")
    lin._bind(torch.device("cuda"))
    assert lin.mode == mode
    assert lin._linear is (wan_kernels.nvfp4_linear_w4a4 if mode == "w4a4" else wan_kernels.nvfp4_linear)


@pytest.mark.parametrize("target, cap, runs", [
    ("8.0", (8, 0), True), ("8.0", (8, 6), True), ("8.0", (8, 9), True), ("8.0", (9, 0), False),
    ("8.0", (12, 0), False), ("8.6", (8, 0), False), ("9.0a", (9, 0), True), ("9.0a", (10, 0), False),
    ("10.0a", (10, 0), True), ("10.0a", (10, 3), False), ("10.0a", (12, 0), False), ("10.0f", (10, 3), True),
    ("10.0f", (12, 0), False), ("8.0+PTX", (9, 0), True), ("8.0+PTX", (12, 0), True), ("8.0+PTX", (7, 5), False),
    ("10.0a+PTX", (10, 3), False), ("12.0", (12, 1), True), ("12.0", (11, 0), False),
])
def test_code_runs_on(target, cap, runs):
    assert routing.code_runs_on(target, cap) is runs


def test_consumer_gpus_are_device_classes():
    assert {"sm86": (8, 6), "sm89": (8, 9), "sm120": (12, 0)}.items() <= routing.DEVICE_CLASSES.items()


def test_sm86_may_name_the_sm80_cuda_kernel_and_sm120_may_not(capability):
    # compiled_archs() used to match capabilities exactly: sm_86 refused the sm_80 SASS that runs there
    _default_build()
    capability((8, 6))
    assert routing.unavailable_reason("nvfp4_quantize", "cuda", torch.device("cuda")) is None
    capability((12, 0))
    with pytest.raises(wan_kernels.BackendUnavailableError, match=r"compiled for \['8.0', '9.0a', '10.0a'\].*sm_120"):
        routing.resolve("nvfp4_quantize", "cuda", torch.device("cuda", 0))


def test_cuda_kernels_sit_on_internal_ops():
    # a CUDA kernel bound to the public op runs on every CUDA device, also where its code does not
    # ("no kernel image is available" on sm_103/sm_120): _C registers them on the internal ops only
    if not _extension.EXTENSION.build_info.get("with_cuda"):
        pytest.skip("_C built without CUDA")
    for op in routing.public_ops():
        assert not _extension.has_compiled_kernel(op, "CUDA"), op
        dump = torch._C._dispatch_dump(f"wan::{op}")
        if SPECS[op].compose is None:
            assert re.search(r"^CUDA: registered at .*wan_kernels/_library\.py", dump, re.M), dump
    sm100 = any(t.startswith("10.") for t in _extension.build_targets())  # `make compat` builds 9.0a only
    for op in ("nvfp4_quantize_cuda", "nvfp4_dequantize_cuda") + (("nvfp4_gemm_sm100",) if sm100 else ()):
        assert _extension.has_compiled_kernel(op, "CUDA"), op


@pytest.mark.parametrize("op", routing.public_ops())
def test_cpu_dispatcher_runs_the_cpu_route(op):
    """The CPU route: the C++ kernel where _C has one (registered from csrc/), else the checked reference."""
    spec = SPECS[op]
    backend = routing.auto_backend(op, None)
    assert routing.route_table()[op]["cpu"] == backend
    if spec.compose is not None:
        assert backend == routing.auto_backend(spec.parts[0], None)
        return
    where = re.search(r"^CPU: registered at (\S+)", torch._C._dispatch_dump(f"wan::{op}"), re.M).group(1)
    assert ("/csrc/" in where) == (backend == "cpu"), where


def test_model_hot_path_binds_the_bare_dispatcher_ops():
    from wan_model.core.model import bind_ops

    ops = bind_ops("auto", "cpu")
    assert ops.gated_residual is torch.ops.wan.gated_residual.default
    assert ops.qkv_rope is torch.ops.wan.qkv_rope.default


# ---------------------------------------------------------------------------------------------
# A toy op from one spec


def _toy_check(x, w):
    if w.shape != x.shape[-1:]:
        raise ValueError(f"toy_scale: w must be [{x.shape[-1]}], got shape {tuple(w.shape)}")


def _toy_ref(x, w):
    return (x.float() * w.float()).to(x.dtype)


def _toy_triton(x, w):  # stands in for a Triton launcher
    return _toy_ref(x, w)


@pytest.fixture
def toy():
    spec = register(OpSpec(
        name="toy_scale", schema="toy_scale(Tensor x, Tensor w) -> Tensor", namespace="wan_toy", check=_toy_check,
        ref=_toy_ref, fake=lambda x, w: torch.empty_like(x), differentiable=("x", "w"), triton=_toy_triton,
        samples=lambda s: (s.randn(3, 16), s.randn(16)),
    ))
    _library.register_namespace("wan_toy")
    routing.clear_caches()
    yield spec
    _library.unregister_namespace("wan_toy")
    del SPECS["toy_scale"]
    routing.clear_caches()


def test_toy_op_from_one_spec(toy, capability, monkeypatch, capsys):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from wan_kernels.__main__ import self_check

    x, w = samples.spec_inputs(toy)
    # registration: schema, CPU kernel (the reference), fake, opcheck
    torch.testing.assert_close(torch.ops.wan_toy.toy_scale(x, w), x * w, rtol=0, atol=0)
    torch.library.opcheck(torch.ops.wan_toy.toy_scale.default, (x.requires_grad_(), w))
    with FakeTensorMode() as mode:
        assert torch.ops.wan_toy.toy_scale(mode.from_tensor(x), mode.from_tensor(w)).shape == x.shape
    # checks on the dispatcher op and every backend
    for call in (lambda: torch.ops.wan_toy.toy_scale(x, w[:3]),
                 lambda: routing.resolve("toy_scale", "ref", "cpu")(x, w[:3])):
        with pytest.raises(ValueError, match=r"toy_scale: w must be \[16\], got shape \(3,\)"):
            call()
    # autograd: the reference's gradients through the dispatcher
    x = x.detach().requires_grad_()
    gx, = torch.autograd.grad(torch.ops.wan_toy.toy_scale(x, w).sum(), x)
    torch.testing.assert_close(gx, w.expand_as(x), rtol=0, atol=0)
    # routing: CPU -> reference (no C++ kernel), sm80 -> its Triton launcher, through the dispatcher's CUDA key
    assert routing.auto_backend("toy_scale", None) == "ref"
    capability((8, 0))
    assert routing.auto_backend("toy_scale", (8, 0)) == "triton"
    assert routing.route("toy_scale", (8, 0)).fn.__wrapped__ is _toy_triton
    ran = []
    real = routing.backend_fn
    monkeypatch.setattr(routing, "backend_fn",
                        lambda s, b, cap=None: (lambda *a: ran.append(b) or real(s, b, cap)(*a)))
    routing.clear_caches()
    _cuda_key(toy, (x.detach(), w))
    assert ran == ["triton"]
    # the self-check of `python -m wan_kernels`
    assert self_check([torch.device("cpu")], namespace="wan_toy")
    assert "toy_scale" in capsys.readouterr().out


def test_triton_kernels_registry_is_read_from_the_specs():
    from wan_kernels.triton import KERNELS

    assert KERNELS == {op: s.triton for op, s in SPECS.items() if s.triton is not None}
    assert "qkv_rope" not in KERNELS and "attention" in KERNELS


@pytest.mark.skipif(os.environ.get("WAN_SKIP_CUDA_BUILD") == "1", reason="no CUDA build")
def test_internal_ops_have_the_public_schema():
    for spec in SPECS.values():
        if spec.cuda is not None:
            internal = str(getattr(torch.ops.wan, spec.cuda.op).default._schema)
            public = str(spec.packet.default._schema)
            assert internal == public.replace(f"wan::{spec.name}(", f"wan::{spec.cuda.op}(", 1)


ATTENTION_OPS = ("attention", "attention_forward", "attention_lse")


@pytest.mark.slow
@pytest.mark.parametrize("routed", [frozenset(), frozenset({90, 100})], ids=["as-shipped", "ws-on-90-100"])
@pytest.mark.parametrize("op", ATTENTION_OPS)
def test_attention_picks_its_triton_kernel_per_arch_from_the_route(op, routed, capability, monkeypatch):
    """wan::attention's Hopper/Blackwell path (attention_ws) is chosen per arch by the route, not by the launcher:
    as shipped (never measured on a GPU) no device class runs it; with `ROUTED_ARCH_CLASSES` naming 90 and 100
    exactly sm_90, sm_100 and sm_103 do, and sm_80/86/89/120 keep today's kernel. Both the dispatcher's CUDA
    kernel (impl="auto") and the named impl="triton" run the launcher the route names: a spy stands in for each
    launcher and records which one ran."""
    from wan_kernels.triton import attention as fa2
    from wan_kernels.triton import attention_ws as ws

    spec = SPECS[op]
    ran = []
    for module, tag in ((fa2, "fa2"), (ws, "ws")):
        spy = functools.wraps(getattr(module, op))(lambda *a, tag=tag: ran.append(tag) or spec.ref(*a))
        monkeypatch.setattr(module, op, spy)
    monkeypatch.setattr(ws, "ROUTED_ARCH_CLASSES", routed)
    args = samples.op_inputs()[op]
    for cap in [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0)]:
        capability(cap)
        want = "ws" if routed and cap in ((9, 0), (10, 0), (10, 3)) else "fa2"
        assert routing.auto_backend(op, cap) == "triton"
        module = "attention_ws" if want == "ws" else "attention"
        assert routing.triton_kernel(op, cap) == f"wan_kernels.triton.{module}.{op}"
        _cuda_key(spec, args)
        routing.resolve(op, "triton", "cuda:0")(*args)
        assert ran == [want, want], (cap, ran)
        ran.clear()


def test_attention_ws_route_is_off_as_shipped():
    """Pinned so that enabling it is a visible, reviewed change (after the GPU check measures it): issue 17."""
    from wan_kernels.triton import attention_ws as ws

    assert ws.ROUTED_ARCH_CLASSES == frozenset()
    assert routing.triton_kernel("attention", (9, 0)) == "wan_kernels.triton.attention.attention"


# ---------------------------------------------------------------------------------------------
# The call path: a handful of Python frames from the wrapper to the kernel, the arguments checked once

CALL_PATH_OPS = ("attention", "qk_norm_rope", "nvfp4_linear", "gated_residual", "nvfp4_quantize")
MAX_FRAMES = 5  # wrapper, resolve, [the op's Autograd kernel], CUDA router, checks in front of the kernel


def _call_path(op: str, args, kernels=()) -> tuple[int, int, list[str]]:
    """(frames, checks, names) of one call of `wan_kernels.<op>(*args)`: the Python frames of the package it
    enters outside the op's check and the kernel (wan_kernels/ref/, wan_kernels/triton/, the code objects in
    `kernels`), and how often the op's check runs."""
    pkg = os.path.dirname(wan_kernels.__file__)
    check = SPECS[op].check.__code__
    frames, names, below = [], [], []
    checks = 0

    def profile(frame, event, arg):
        nonlocal checks
        code = frame.f_code
        if event == "return" and below and below[-1] is frame:
            below.pop()
        if event != "call" or below or not code.co_filename.startswith(pkg):
            return
        if code is check:
            checks += 1
        if code is check or code in kernels or code.co_filename.startswith((f"{pkg}/ref/", f"{pkg}/triton/")):
            below.append(frame)
        elif not any(f is frame for f in frames):  # a generator resumed is the same frame
            frames.append(frame)
            names.append(code.co_name)

    call = getattr(wan_kernels, op)
    call(*args)  # routes resolved, caches filled
    sys.setprofile(profile)
    try:
        call(*args)
    finally:
        sys.setprofile(None)
    return len(frames), checks, names


@pytest.mark.parametrize("op", CALL_PATH_OPS)
def test_cpu_call_path_is_short_and_checks_once(op):
    frames, checks, names = _call_path(op, samples.op_inputs()[op])
    assert checks == 1, names
    assert frames <= MAX_FRAMES, names


CUDA_CALL_PATH = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_routing import MAX_FRAMES, _call_path
from wan_kernels import routing, samples
from wan_kernels._spec import SPECS

op, cap = {op!r}, {cap!r}
args = samples.op_inputs()[op]
out = SPECS[op].ref(*args)


def stand_in(s, b, cap=None):
    return lambda *a: out


routing.backend_fn = stand_in
torch.cuda.get_device_capability = lambda device=None: cap
routing.clear_caches()
torch.Tensor.device = property(lambda self: torch.device("cuda", 0))
with torch._C._IncludeDispatchKeyGuard(torch._C.DispatchKey.CUDA):
    frames, checks, names = _call_path(op, args, kernels={{stand_in(None, None).__code__}})
assert checks == 1, names
assert frames <= MAX_FRAMES, names
print("ok", frames, checks)
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("cap", [(8, 0), (10, 0)], ids=["sm80", "sm100"])
@pytest.mark.parametrize("op", CALL_PATH_OPS)
def test_cuda_call_path_is_short_and_checks_once(op, cap):
    """The CUDA route, simulated: every tensor reports device cuda:0 (so the wrapper resolves for CUDA and the
    checks read no values, as on a GPU), the dispatcher is sent to the CUDA key, and each backend's kernel is a
    stand-in returning the reference's output. In a fresh interpreter per case: under torch 2.11 (make compat) the
    simulation leaves CPU tensor creation broken for the rest of the process ("CUDAGuardImpl initialized with
    non-CUDA DeviceType: cpu" in the next test's first torch.randn), whatever is restored after it."""
    import subprocess

    code = CUDA_CALL_PATH.format(tests=os.path.dirname(os.path.abspath(__file__)), op=op, cap=cap)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr


# The same toy op added as the README's "Adding an op" says: its spec file and its reference file, nothing else
# edited. A copy of the package gets the two files; a fresh interpreter imports it.

TOY_OP = '''"""wan::toy_scale: x * w over the last dimension (a test's toy op)."""
import torch

from wan_kernels import ref, routing
from wan_kernels._spec import OpSpec, register

__all__ = ["toy_scale"]


def check_toy_scale(x, w):
    if w.shape != x.shape[-1:]:
        raise ValueError(f"toy_scale: w must be [{x.shape[-1]}], got shape {tuple(w.shape)}")


SPEC = register(OpSpec(
    name="toy_scale", schema="toy_scale(Tensor x, Tensor w) -> Tensor", check=check_toy_scale, ref=ref.toy_scale,
    fake=lambda x, w: torch.empty_like(x), differentiable=("x", "w"), samples=lambda s: (s.randn(3, 16), s.randn(16)),
    flops=lambda x, w: 0, cpp=False,
))


def toy_scale(x, w, *, impl="auto"):
    return routing.resolve("toy_scale", impl, x.device)(x, w)
'''

TOY_REF = '''__all__ = ["toy_scale"]


def toy_scale(x, w):
    return (x.float() * w.float()).to(x.dtype)
'''

TOY_CHECKS = '''
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import wan_kernels
from wan_kernels import routing, samples
from wan_kernels._spec import SPECS

x, w = samples.op_inputs()["toy_scale"]
assert "toy_scale" in wan_kernels.__all__ and "toy_scale" in wan_kernels.ref.__all__
torch.testing.assert_close(wan_kernels.toy_scale(x, w), x * w, rtol=0, atol=0)
torch.testing.assert_close(torch.ops.wan.toy_scale(x, w), x * w, rtol=0, atol=0)
torch.library.opcheck(torch.ops.wan.toy_scale.default, (x.clone().requires_grad_(), w))
with FakeTensorMode() as mode:
    assert torch.ops.wan.toy_scale(mode.from_tensor(x), mode.from_tensor(w)).shape == x.shape
try:
    wan_kernels.toy_scale(x, w[:3])
    raise AssertionError("no ValueError")
except ValueError as e:
    assert "toy_scale: w must be [16], got shape (3,)" in str(e)
assert routing.route_table()["toy_scale"] == {c: "ref" for c in routing.DEVICE_CLASSES}
print("toy checks passed")
'''


@pytest.mark.slow
def test_toy_op_added_as_files(tmp_path):
    import shutil
    import subprocess

    src = os.path.dirname(wan_kernels.__file__)
    pkg = tmp_path / "wan_kernels"
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for so in os.listdir(src):
        if so.endswith(".so"):
            os.symlink(os.path.join(src, so), pkg / so)
    (pkg / "ops" / "toy_scale.py").write_text(TOY_OP)
    (pkg / "ref" / "toy_scale.py").write_text(TOY_REF)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def run(*argv):
        r = subprocess.run([sys.executable, *argv], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    assert "toy checks passed" in run("-c", TOY_CHECKS)  # registered, checked, fake-able, opcheck, routed
    out = run("-m", "wan_kernels")  # listed in the route table and self-checked
    assert re.search(r"^  toy_scale +ref +ref", out, re.M), out
    assert re.search(r"^  cpu  toy_scale +auto .* ok$", out, re.M), out
    assert "self-check: passed" in out
