"""The `wan` namespace: schemas, fake impls, opcheck, torch.compile, routing, Python-only fallback."""

import os
import subprocess
import sys

import pytest
import torch

import wan_kernels
from wan_kernels import _extension, routing
from wan_kernels._extension import EXTENSION
from wan_kernels._spec import SPECS, all_specs

from _helpers import opcheck
from _inputs import op_inputs

SPECS_ALL = {s.name: s for s in all_specs()}  # public and internal ops
OPS = tuple(SPECS_ALL)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_is_built():
    # CI builds _C (README test command); a silent fallback to pure torch would hide a broken build.
    assert EXTENSION.loaded, EXTENSION.error
    assert EXTENSION.build_info["torch_version"] == torch.__version__
    from wan_kernels._library import MISSING_FROM_EXTENSION

    assert MISSING_FROM_EXTENSION == (), f"stale _C build lacks {MISSING_FROM_EXTENSION}: run `make build`"


def test_extension_built_with_cuda_for_default_archs():
    info = EXTENSION.build_info
    if os.environ.get("WAN_SKIP_CUDA_BUILD") == "1":
        pytest.skip("WAN_SKIP_CUDA_BUILD=1: this build has no CUDA sources by request")
    assert info["with_cuda"], info
    assert info["cuda_archs"] == os.environ.get("WAN_CUDA_ARCHS", "8.0;9.0a;10.0a")
    # on the internal op: the router binds it where its code runs (tests/test_routing.py)
    assert _extension.has_compiled_kernel("nvfp4_quantize_cuda", "CUDA")
    assert not _extension.has_compiled_kernel("nvfp4_quantize", "CUDA")


@pytest.mark.subprocess
def test_cuda_objects_per_arch_have_no_spills():
    """The built _C carries SASS for every default arch and no CUDA kernel uses local memory (STACK 0),
    read with the cuobjdump that ships in the Triton wheel (no GPU needed)."""
    if os.environ.get("WAN_SKIP_CUDA_BUILD") == "1":
        pytest.skip("WAN_SKIP_CUDA_BUILD=1: this build has no CUDA sources by request")
    import re

    import triton

    import wan_kernels._C as ext

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    elves = subprocess.run([cuobjdump, "--list-elf", ext.__file__], capture_output=True, text=True, check=True).stdout
    archs = sorted(set(re.findall(r"\.(sm_\w+)\.cubin", elves)))
    assert archs == ["sm_100a", "sm_80", "sm_90a"], elves
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", ext.__file__], capture_output=True, text=True,
                           check=True).stdout
    stacks = [int(x) for x in re.findall(r"STACK:(\d+)", usage)]
    assert len(stacks) >= 3 * 6  # quantize + dequantize x 3 dtypes, per arch
    assert max(stacks) == 0, usage
    if "10.0a" in EXTENSION.build_info["cuda_archs"]:
        # The CUTLASS NVFP4 GEMM is compiled for sm_100a alone, with block-scaled FP4 tensor-core MMAs
        # (tcgen05.mma...block_scale; SASS UTCOMMA), 1-SM and 2-SM (.2CTA) tiles.
        assert re.findall(r"nvfp4_gemm_sm100_\w+\.(sm_\w+)\.cubin", elves) == ["sm_100a", "sm_100a"], elves
        sass = subprocess.run([cuobjdump, "-sass", ext.__file__], capture_output=True, text=True, check=True).stdout
        assert "UTCOMMA.2CTA" in sass and "UTCOMMA.4X" in sass


@pytest.mark.parametrize("op", OPS)
def test_schema_matches_python_copy(op):
    # The C++ TORCH_LIBRARY is the source; the spec's copy (for installs without _C) must be identical.
    assert EXTENSION.loaded
    schema = str(getattr(torch.ops.wan, op).default._schema)
    assert schema == "wan::" + SPECS_ALL[op].schema


def test_every_op_has_fake_and_cpu_kernel():
    for op, spec in SPECS_ALL.items():
        name = f"wan::{op}"
        if spec.compose is not None:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")
            continue
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
        if spec.internal_of is None:  # internal ops carry a CUDA kernel only where it is compiled
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


def test_compiled_cpu_kernels_are_cpp():
    # these have C++ CPU kernels: auto must not route them to the reference.
    for op in ("qk_norm_rope", "qkv_rope", "attention", "nvfp4_quantize", "nvfp4_dequantize"):
        assert routing.auto_backend(op, None) == "cpu", op
    assert routing.auto_backend("nvfp4_gemm", None) == "ref"


def _requiring_grad(op: str, args: tuple) -> tuple:
    """args with the inputs `op` is differentiable in requiring grad (so opcheck tests its autograd)."""
    spec = SPECS_ALL[op]
    return tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and n in spec.differentiable else a
                 for n, a in zip(spec.arg_names, args))


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    opcheck(op, _requiring_grad(op, op_inputs()[op]))


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_fake_matches_real_shapes(op):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = op_inputs()[op]
    real = getattr(torch.ops.wan, op)(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = getattr(torch.ops.wan, op)(*fake_args)
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in fake]


@pytest.mark.slow
def test_compile_fullgraph_traces_every_op():
    inputs = op_inputs()

    def f(inputs):
        outs = []
        for op in OPS:
            out = getattr(torch.ops.wan, op)(*inputs[op])
            outs += list(out) if isinstance(out, tuple) else [out]
        return outs

    eager = f(inputs)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")(inputs)
    for a, b in zip(eager, compiled):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


@pytest.mark.slow
def test_compile_inductor_with_wrappers():
    q, k, v, ki, vi, _ = op_inputs()["attention"]
    args = op_inputs()["qk_norm_rope"]

    def f(q, k, v, ki, vi, qkv):
        o = wan_kernels.attention(q, k, v, ki, vi)
        qq, kk, vv = wan_kernels.qk_norm_rope(qkv, *args[1:])
        return o * 2, qq + kk + vv

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, k, v, ki, vi, args[0])
    want = f(q, k, v, ki, vi, args[0])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # same kernels; inductor only fuses the adds


def test_named_unavailable_backend_raises_never_falls_back(monkeypatch):
    q, k, v, *_ = op_inputs()["attention"]
    with pytest.raises(wan_kernels.BackendUnavailableError, match="impl='cuda' on cpu"):
        wan_kernels.attention(q, k, v, impl="cuda")
    a, a_s, a_gs, b, b_s, b_gs, bias, dt = op_inputs()["nvfp4_gemm"]
    with pytest.raises(wan_kernels.BackendUnavailableError, match="no C\\+\\+ CPU kernel of wan::nvfp4_gemm"):
        wan_kernels.nvfp4_gemm(a, a_s, a_gs, b, b_s, b_gs, bias, dt, impl="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    wan_kernels.attention(q, k, v, impl="triton")   # runs interpreted ...
    monkeypatch.delenv("TRITON_INTERPRET")          # ... and is refused once the interpreter is off (not cached)
    with pytest.raises(wan_kernels.BackendUnavailableError, match="Triton needs CUDA tensors"):
        wan_kernels.attention(q, k, v, impl="triton")
    with pytest.raises(wan_kernels.BackendUnavailableError, match="Triton needs CUDA tensors"):
        routing.bind("attention", "triton", "cpu")
    assert routing.unavailable_reason("attention", "cuda", "cpu") == "backend 'cuda' runs CUDA tensors, got cpu"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert routing.unavailable_reason("attention", "cuda", "cuda") == "wan::attention has no CUDA kernel"
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        wan_kernels.attention(q, k, v, impl="fast")


def test_route_table_covers_every_op_and_target():
    table = wan_kernels.route_table()
    assert set(table) == set(SPECS)
    for row in table.values():
        assert set(row) == set(routing.DEVICE_CLASSES)
        assert set(row.values()) <= set(routing.BACKENDS)
    if EXTENSION.build_info.get("with_cuda"):
        # The CUDA NVFP4 quantizer is compiled for every default target: auto routes to it where that code runs
        # (sm_80 SASS on 8.x, sm_90a on 9.0, sm_100a on 10.0), to Triton elsewhere.
        assert {c: table["nvfp4_quantize"][c] for c in routing.DEVICE_CLASSES} == {
            "cpu": "cpu", "sm80": "cuda", "sm86": "cuda", "sm89": "cuda", "sm90": "cuda", "sm100": "cuda",
            "sm103": "triton", "sm120": "triton"}


@pytest.mark.subprocess
def test_cli_prints_routing_and_passes_self_check():
    out = subprocess.run([sys.executable, "-m", "wan_kernels"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "routing (backend used by impl='auto')" in out.stdout
    assert "self-check: passed" in out.stdout
    assert "FAIL" not in out.stdout.replace("self-check: passed", "")


_NO_EXT = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "wan_kernels._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import torch, wan_kernels
from wan_kernels import routing
assert not wan_kernels.EXTENSION.loaded
assert routing.auto_backend("qk_norm_rope", None) == "ref"
x = torch.randn(2, 5, 3 * 128)
cos, sin = torch.ones(5, 32), torch.zeros(5, 32)
q, k, v = torch.ops.wan.qkv_rope(x[..., :128], torch.randn(384, 128), None, torch.ones(128), torch.ones(128), cos, sin, 2, 1e-6)
print("fallback", tuple(q.shape))
try:
    wan_kernels.qk_norm_rope(x, torch.ones(128), torch.ones(128), cos, sin, 2, impl="cpu")
except wan_kernels.BackendUnavailableError as e:
    print("raised", e)
"""


@pytest.mark.subprocess
def test_import_without_extension_uses_references():
    out = subprocess.run([sys.executable, "-c", _NO_EXT], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fallback (2, 5, 2, 64)" in out.stdout
    assert "raised" in out.stdout and "no C++ CPU kernel" in out.stdout
    main = subprocess.run([sys.executable, "-c", _NO_EXT.split("import torch")[0] +
                           "import wan_kernels.__main__ as m; raise SystemExit(m.main([]))"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert main.returncode == 0, main.stdout + main.stderr
    assert "NOT BUILT, pure-torch fallback" in main.stdout
