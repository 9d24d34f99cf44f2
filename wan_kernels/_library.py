"""Loads the compiled extension and completes the `wan` op namespace from Python.

* `_C` present: its TORCH_LIBRARY(wan) declares the schemas and registers the C++ CPU / CUDA kernels.
* `_C` absent (or broken): the same schemas (wan_kernels/_schemas.py) are declared here, so that
  `torch.ops.wan.*` always exists and runs on CPU through the references.
Then, for every op: a fake impl (torch.compile / meta tensors), the reference as CPU kernel where no
C++ one exists, and a CUDA kernel that routes to Triton where no CUDA C++ one exists.
"""

from __future__ import annotations

import dataclasses

import torch

from wan_kernels import _schemas, ref
from wan_kernels._checks import CHECKS
from wan_kernels.nvfp4 import scale_shape


@dataclasses.dataclass(frozen=True)
class Extension:
    loaded: bool
    error: str | None
    build_info: dict


def _load_extension() -> Extension:
    try:
        from wan_kernels import _C  # registers TORCH_LIBRARY(wan) and its kernels
    except ImportError as e:
        return Extension(False, str(e), {})
    return Extension(True, None, dict(_C.build_info()))


EXTENSION = _load_extension()


def _missing_schemas() -> tuple[str, ...]:
    return tuple(op for op in _schemas.OPS if torch._C._jit_get_operation(f"wan::{op}")[0] is None)


# Schemas a loaded _C lacks (a stale build of an older checkout): declared here so the package imports;
# tests/test_library.py fails while this is not empty.
MISSING_FROM_EXTENSION = _missing_schemas() if EXTENSION.loaded else ()
if not EXTENSION.loaded or MISSING_FROM_EXTENSION:
    _DEF_LIB = torch.library.Library("wan", "DEF" if not EXTENSION.loaded else "FRAGMENT")
    for _op, _schema in _schemas.SCHEMAS.items():
        if not EXTENSION.loaded or _op in MISSING_FROM_EXTENSION:
            _DEF_LIB.define(_schema)

_IMPL_LIB = torch.library.Library("wan", "IMPL")


def has_compiled_kernel(op: str, dispatch_key: str) -> bool:
    """True when `_C` registered a C++/CUDA kernel of `wan::op` for the dispatch key ("CPU"/"CUDA").
    A CUDA kernel may sit on an internal op (`_schemas.CUDA_KERNEL_OPS`)."""
    if not EXTENSION.loaded:
        return False
    if dispatch_key == "CUDA":
        op = _schemas.CUDA_KERNEL_OPS.get(op, op)
    return op not in PYTHON_KERNELS.get(dispatch_key, ()) and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"wan::{op}", dispatch_key)


def checked(op: str, fn):
    """`fn` with the op's argument checks in front (for paths that do not check by themselves)."""
    check = CHECKS[op]

    def run(*args):
        check(*args)
        return fn(*args)

    run.__name__ = f"{op}_{getattr(fn, '__name__', 'impl')}"
    run.__wrapped__ = fn  # the backend function behind the checks
    return run


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes only.

def _fake_qk_norm_rope(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps):
    B, S, C3 = qkv.shape
    shape = (B, S, num_heads, C3 // 3 // num_heads)
    return qkv.new_empty(shape), qkv.new_empty(shape), qkv.new_empty(shape)


def _fake_attention(q, k, v, k_img, v_img, scale):
    return q.new_empty((*q.shape[:3], v.shape[-1]))


def _fake_nvfp4_quantize(x, global_scale):
    m, k = x.shape
    return x.new_empty((m, k // 2), dtype=torch.uint8), x.new_empty(scale_shape(m, k), dtype=torch.float8_e4m3fn)


def _fake_nvfp4_dequantize(packed, block_scale, global_scale, dtype):
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=dtype)


def _fake_nvfp4_gemm(a, a_scale, a_global_scale, b, b_scale, b_global_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


def _fake_nvfp4_linear(x, w, w_scale, w_global_scale, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _fake_like_x(x, *args):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


FAKES = {
    "qk_norm_rope": _fake_qk_norm_rope,
    "attention": _fake_attention,
    "nvfp4_quantize": _fake_nvfp4_quantize,
    "nvfp4_dequantize": _fake_nvfp4_dequantize,
    "nvfp4_gemm": _fake_nvfp4_gemm,
    "nvfp4_gemm_sm100": _fake_nvfp4_gemm,
    "nvfp4_linear": _fake_nvfp4_linear,
    "layer_norm_modulate": _fake_like_x,
    "gated_residual": _fake_like_x,
}

REFS = {op: getattr(ref, op) for op in _schemas.PUBLIC_OPS} | {"nvfp4_gemm_sm100": ref.nvfp4_gemm}

# dispatch key -> ops whose kernel for that key was registered here from Python
PYTHON_KERNELS: dict[str, set[str]] = {"CPU": set(), "CUDA": set()}


def _qkv_rope_composite(x, w_qkv, b_qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps):
    CHECKS["qkv_rope"](x, w_qkv, b_qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps)
    qkv = torch.nn.functional.linear(x, w_qkv, b_qkv)  # ONE GEMM over the concatenated [3C, C] weight
    return torch.ops.wan.qk_norm_rope(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads, eps)


def _register() -> None:
    from wan_kernels import routing  # routing needs the registry above

    for op, fake in FAKES.items():
        torch.library.register_fake(f"wan::{op}", checked(op, fake), lib=_IMPL_LIB)
    if not EXTENSION.loaded:
        _IMPL_LIB.impl("qkv_rope", _qkv_rope_composite, "CompositeImplicitAutograd")
    for op in FAKES:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"wan::{op}", "CPU"):
            _IMPL_LIB.impl(op, checked(op, REFS[op]), "CPU")
            PYTHON_KERNELS["CPU"].add(op)
        if op not in _schemas.INTERNAL and not torch._C._dispatch_has_kernel_for_dispatch_key(f"wan::{op}", "CUDA"):
            _IMPL_LIB.impl(op, routing.cuda_router(op), "CUDA")
            PYTHON_KERNELS["CUDA"].add(op)


_register()
