"""Ahead-of-time compilation of Triton kernels and inspection of the result: GPU readiness without a GPU.

`compile_aot(fn, signature, constexprs, arch=90, num_warps=...)` compiles a `@triton.jit` function for a
CUDA compute capability (80 = A100, 90 = H100/H200, 100 = B200) with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))` (no GPU or driver needed) and returns an `AotResult`:

* `ptx` (text), `cubin` (bytes) and `cubin_path` (written to `workdir` or a temporary directory);
* `registers`, `stack_bytes`, `local_bytes`, `static_shared_bytes` from the cubin, read by the `cuobjdump
  --dump-resource-usage` that ships with Triton (`triton/backends/nvidia/bin/`; the system CUDA 13.0
  tools cannot read Triton 3.8's sm_100 output); `dynamic_shared_bytes` (what Triton launches with);
* `spill_stores` / `spill_loads`: STL / LDL instructions in the SASS (`cuobjdump -sass`);
* `mma_families`: the tensor-core instruction families in the PTX: "mma.sync" (sm_80+ warp MMA),
  "wgmma" (sm_90a warpgroup MMA), "tcgen05" (sm_100a 5th-gen tensor cores / TMEM).

`spills` is True when the kernel uses local memory (STACK > 0 or any STL/LDL): ptxas ran out of registers.
`fn` may be a `JITFunction`, an `InterpretedFunction` (the kernel was decorated under TRITON_INTERPRET=1:
its Python function is recompiled here) or a plain Python function in Triton's language.

    from tools import aot
    r = aot.compile_aot(kernel, {"x_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024},
                        arch=90, num_warps=4, aligned=("x_ptr",))
    print(r.summary())

`compile_launch(launch, arch)` compiles a prepared launcher call (`wan_kernels.triton._launch.Launch`, built on meta
tensors of the real shapes) with the signature, constexprs and divisibility attributes Triton's own binder derives
from the call's arguments (`specialize`): ints equal to 1 become constexprs, ints % 16 == 0 and 16-byte aligned
pointers get `tt.divisibility`, as a launch on a GPU would. Prefer it to a hand-written signature.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from wan_kernels.triton._launch import Launch

# A100 / RTX 30xx (sm_86) / RTX 40xx, L40S (sm_89) / H100, H200 / B200 / RTX 50xx, RTX PRO 6000 (sm_120)
ARCHS = (80, 86, 89, 90, 100, 120)
MMA_FAMILIES = {
    "mma.sync": re.compile(r"\bmma\.sync\."),
    "wgmma": re.compile(r"\bwgmma\.mma_async\."),
    "tcgen05": re.compile(r"\btcgen05\.mma\b"),
}
_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclasses.dataclass(frozen=True)
class AotResult:
    name: str
    arch: int
    num_warps: int
    ptx: str
    cubin: bytes
    cubin_path: Path
    registers: int
    stack_bytes: int
    local_bytes: int
    static_shared_bytes: int
    dynamic_shared_bytes: int
    spill_stores: int
    spill_loads: int
    mma_families: frozenset[str]

    @property
    def spills(self) -> bool:
        return bool(self.stack_bytes or self.local_bytes or self.spill_stores or self.spill_loads)

    @property
    def shared_bytes(self) -> int:
        return self.static_shared_bytes + self.dynamic_shared_bytes

    def summary(self) -> str:
        mma = ",".join(sorted(self.mma_families)) or "-"
        return (f"{self.name} sm_{self.arch} warps={self.num_warps}: REG {self.registers} STACK {self.stack_bytes} "
                f"LOCAL {self.local_bytes} STL/LDL {self.spill_stores}/{self.spill_loads} "
                f"SHARED {self.static_shared_bytes}+{self.dynamic_shared_bytes} MMA {mma}")


def tool(name: str) -> Path:
    """Path of a CUDA tool bundled with Triton (cuobjdump, nvdisasm, ptxas, ptxas-blackwell)."""
    path = _TOOLS / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not bundled with this Triton ({_TOOLS})")
    return path


def as_jit_function(fn: Any) -> JITFunction:
    """A JITFunction for `fn` (JITFunction, InterpretedFunction or plain Python function)."""
    if isinstance(fn, JITFunction):
        return fn
    inner = getattr(fn, "fn", fn)  # InterpretedFunction keeps the Python function in .fn
    if isinstance(inner, JITFunction):
        return inner
    if not callable(inner):
        raise TypeError(f"compile_aot: expected a Triton kernel or Python function, got {type(fn).__name__}")
    return JITFunction(inner)


def _run(args: list[str]) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def resource_usage(cubin_path: Path | str, kernel_name: str | None = None) -> dict[str, int]:
    """{"registers", "stack", "shared", "local"} of one kernel of a cubin (bundled cuobjdump)."""
    out = _run([str(tool("cuobjdump")), "--dump-resource-usage", str(cubin_path)])
    current = None
    for line in out.splitlines():
        m = re.match(r"\s*Function\s+(\S+):", line)
        if m:
            current = m.group(1)
            continue
        m = _USAGE.search(line)
        if m and current is not None and (kernel_name is None or current == kernel_name):
            reg, stack, shared, local = map(int, m.groups())
            return {"registers": reg, "stack": stack, "shared": shared, "local": local}
    raise RuntimeError(f"no resource usage for kernel {kernel_name!r} in cuobjdump output:\n{out}")


def sass(cubin_path: Path | str) -> str:
    """Disassembly (SASS) of a cubin (bundled cuobjdump)."""
    return _run([str(tool("cuobjdump")), "-sass", str(cubin_path)])


def mma_families(ptx: str) -> frozenset[str]:
    """Tensor-core instruction families used by a PTX text."""
    return frozenset(name for name, pattern in MMA_FAMILIES.items() if pattern.search(ptx))


def compile_aot(fn: Any, signature: dict[str, str], constexprs: dict[str, Any] | None = None, *, arch: int,
                num_warps: int = 4, num_stages: int = 3, aligned: tuple[str, ...] = (),
                options: dict[str, Any] | None = None, workdir: str | os.PathLike | None = None) -> AotResult:
    """Compile `fn` for sm_`arch` and inspect the cubin.

    signature: {arg name: Triton type} for EVERY argument ("*fp16", "*bf16", "*fp32", "i32", "i64", "fp32",
    "constexpr"); constexprs: {name: value} for the "constexpr" ones. `aligned` names pointer/integer arguments
    that the runtime would specialise as divisible by 16 (16-byte aligned pointers, strides % 16 == 0), as
    Triton's launcher does on a GPU: without it, vectorised loads are not generated and the AOT picture is
    pessimistic. Extra compile options (e.g. {"maxnreg": 128}) go in `options`.
    """
    jit_fn = as_jit_function(fn)
    names = jit_fn.arg_names
    missing = [n for n in names if n not in signature]
    unknown = [n for n in signature if n not in names] + [n for n in aligned if n not in names]
    if missing or unknown:
        raise ValueError(f"compile_aot({jit_fn.__name__}): signature misses {missing}, unknown names {unknown}; "
                         f"arguments are {names}")
    constexprs = dict(constexprs or {})
    need = [n for n, t in signature.items() if t == "constexpr" and n not in constexprs]
    if need:
        raise ValueError(f"compile_aot({jit_fn.__name__}): no value for constexpr arguments {need}")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    opts = {"num_warps": num_warps, "num_stages": num_stages, **(options or {})}
    return _compile(ASTSource(jit_fn, signature, constexprs, attrs), arch, opts, num_warps, workdir)


@dataclasses.dataclass(frozen=True)
class Specialization:
    """What Triton's launcher compiles for one call: signature {name: type}, constexprs {(index,): value},
    attrs {(index,): [["tt.divisibility", 16]]} and the parsed compile options."""
    signature: dict
    constexprs: dict
    attrs: dict
    options: Any

    def constexpr_names(self, fn) -> dict[str, Any]:
        names = as_jit_function(fn).arg_names
        return {names[k[0]]: v for k, v in self.constexprs.items()}

    def divisible_names(self, fn) -> set[str]:
        names = as_jit_function(fn).arg_names
        return {names[k[0]] for k, v in self.attrs.items() if ["tt.divisibility", 16] in v}


def specialize(launch: Launch, arch: int) -> Specialization:
    """The specialisation `JITFunction.run` computes for `launch` on an sm_`arch` device (its binder and
    `_pack_args`, with the backend of that target): the same code path as a launch, without a GPU."""
    jit_fn = as_jit_function(launch.kernel)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", jit_fn.debug) or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return Specialization(signature, constexprs, attrs, options)


def compile_launch(launch: Launch, arch: int, *, options: dict[str, Any] | None = None,
                   workdir: str | os.PathLike | None = None) -> AotResult:
    """Compile a prepared launch for sm_`arch` as the runtime would (`specialize`) and inspect the cubin.
    `options` overrides compile options (e.g. {"maxnreg": 32} for a forced-spill check)."""
    spec = specialize(launch, arch)
    opts = dict(spec.options.__dict__, **(options or {}))
    src = ASTSource(as_jit_function(launch.kernel), spec.signature, spec.constexprs, spec.attrs)
    return _compile(src, arch, opts, opts["num_warps"], workdir)


def _compile(src: ASTSource, arch: int, opts: dict, num_warps: int, workdir) -> AotResult:
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    name = kernel.metadata.name
    directory = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="wan_aot_"))
    directory.mkdir(parents=True, exist_ok=True)
    cubin_path = directory / f"{name}_sm{arch}_w{num_warps}_{kernel.metadata.hash[:12]}.cubin"
    cubin_path.write_bytes(kernel.asm["cubin"])
    usage = resource_usage(cubin_path, name)
    disasm = sass(cubin_path)
    return AotResult(
        name=name, arch=arch, num_warps=num_warps, ptx=kernel.asm["ptx"], cubin=kernel.asm["cubin"],
        cubin_path=cubin_path, registers=usage["registers"], stack_bytes=usage["stack"],
        local_bytes=usage["local"], static_shared_bytes=usage["shared"],
        dynamic_shared_bytes=int(kernel.metadata.shared),
        spill_stores=len(re.findall(r"\bSTL(?:\.\w+)*\s", disasm)),
        spill_loads=len(re.findall(r"\bLDL(?:\.\w+)*\s", disasm)),
        mma_families=mma_families(kernel.asm["ptx"]),
    )


# ---------------------------------------------------------------------------------------------
# 32-bit offset overflow: interval analysis of the PTX integer registers at a launch's argument values

_INT32 = (-(2 ** 31), 2 ** 31 - 1)
_UINT32 = (0, 2 ** 32 - 1)
_INSTR = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)\s+(.*?);\s*$")
_REG = re.compile(r"^%(r|rd|rs)\d+$")
_IMM = re.compile(r"^-?(?:0[xX][0-9a-fA-F]+|\d+)$")


@dataclasses.dataclass(frozen=True)
class OffsetCheck:
    """`overflowing`: PTX lines that widen (cvt.s64.s32, mul.wide, mad.wide) a 32-bit value whose exact range at
    the launch's arguments leaves 32 bits, i.e. an offset that wrapped before it was made 64-bit. `checked`: the
    widening instructions whose sources had a known range (the analysis saw them)."""
    overflowing: list[str]
    checked: int


def offset_overflows(launch: Launch, ptx: str, arch: int) -> OffsetCheck:
    """Ranges of the integer registers of `ptx` (flow-insensitive intervals: program ids within `launch.grid`,
    thread ids within the block, integer parameters equal to the launch's arguments), and the widenings of an
    out-of-range 32-bit value. Registers fed by memory, floats or unmodelled instructions have unknown range
    and are not checked."""
    jit_fn = as_jit_function(launch.kernel)
    spec = specialize(launch, arch)
    values = dict(zip(jit_fn.arg_names, launch.args), **launch.kwargs)
    params = [n for n, t in spec.signature.items() if t != "constexpr"]
    name = re.search(r"\.entry\s+(\w+)", ptx).group(1)
    ntid = int(m.group(1)) if (m := re.search(r"\.reqntid\s+(\d+)", ptx)) else 1024
    grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
    special = {f"%ctaid.{a}": (0, g - 1) for a, g in zip("xyz", grid)}
    special |= {f"%nctaid.{a}": (g, g) for a, g in zip("xyz", grid)}
    special |= {"%tid.x": (0, ntid - 1), "%tid.y": (0, 0), "%tid.z": (0, 0), "%ntid.x": (ntid, ntid)}
    lines = [m.groups() for m in map(_INSTR.match, ptx.splitlines()) if m]
    ranges: dict[str, tuple[int, int] | None] = {}  # None: unknown
    defs: dict[str, list] = {}
    for opc, rest in lines:
        ops = [o.strip() for o in rest.split(",")]
        defs.setdefault(ops[0], []).append((opc.split(".")[0], ops))

    def remainder_of(ops):
        """`sub r, a, p` with p = q * d and q = a / d (LLVM's div/rem pairing): the registers (a, d), else None."""
        (pk, pops), = defs.get(ops[2], [(None, None)])[:1] or [(None, None)]
        if pk != "mul" or len(defs[ops[2]]) != 1:
            return None
        for q, d in ((pops[1], pops[2]), (pops[2], pops[1])):
            qdef = defs.get(q, [])
            if len(qdef) == 1 and qdef[0][0] == "div" and qdef[0][1][1:] == [ops[1], d]:
                return ops[1], d
        return None

    def val(op):
        if op in ranges:
            return ranges[op]
        if _IMM.match(op):
            v = int(op, 0)
            return (v, v)
        if op in special:
            return special[op]
        return None if (_REG.match(op) is None or op in ranges) else "undef"

    def evaluate(opc, ops):
        parts = opc.split(".")
        base = parts[0]
        if base == "ld" and parts[1] == "param":
            m = re.match(rf"\[{name}_param_(\d+)\]", ops[1])
            i = int(m.group(1)) if m else -1
            v = values.get(params[i]) if 0 <= i < len(params) else None
            return (int(v), int(v)) if isinstance(v, int) and not isinstance(v, bool) else None
        src = [val(o) for o in ops[1:]]
        if "undef" in src:
            return "undef"
        if any(s is None for s in src[:3 if base in ("mad", "selp") else 2]) and base not in ("selp",):
            return None
        if base in ("mov", "cvt") and len(src) == 1:
            return src[0]
        a = src[0] if src else None
        b = src[1] if len(src) > 1 else None
        prods = lambda x, y: [p * q for p in x for q in y]  # noqa: E731
        if base == "add":
            return (a[0] + b[0], a[1] + b[1])
        if base == "sub":
            rem = remainder_of(ops)
            if rem is not None and a[0] >= 0 and (d := val(rem[1])) not in (None, "undef") and d[0] > 0:
                return (0, min(a[1], d[1] - 1))
            return (a[0] - b[1], a[1] - b[0])
        if base == "mul" and parts[1] in ("lo", "wide"):
            return (min(prods(a, b)), max(prods(a, b)))
        if base == "mad" and parts[1] in ("lo", "wide") and src[2] is not None:
            p = prods(a, b)
            return (min(p) + src[2][0], max(p) + src[2][1])
        if base == "shl" and b[0] == b[1]:
            return (a[0] << b[0], a[1] << b[0])
        if base == "shr" and b[0] == b[1] and (parts[1] == "s32" or parts[1] == "s64" or a[0] >= 0):
            return (a[0] >> b[0], a[1] >> b[0])
        if base == "and" and (a[0] >= 0 or b[0] >= 0):
            return (0, min(x[1] for x in (a, b) if x[0] >= 0))
        if base in ("or", "xor") and a[0] >= 0 and b[0] >= 0:
            return (0, a[1] + b[1])
        if base in ("div", "rem") and a[0] >= 0 and b[0] > 0:
            return (a[0] // b[1], a[1] // b[0]) if base == "div" else (0, min(a[1], b[1] - 1))
        if base in ("min", "max"):
            f = min if base == "min" else max
            return (f(a[0], b[0]), f(a[1], b[1]))
        if base == "selp" and a is not None and b is not None:
            return (min(a[0], b[0]), max(a[1], b[1]))
        if base == "neg":
            return (-a[1], -a[0])
        if base == "bfe" and src[2] is not None and src[2][0] == src[2][1]:
            n = src[2][0]
            return (0, 2 ** n - 1) if parts[1].startswith("u") else (-(2 ** (n - 1)), 2 ** (n - 1) - 1)
        return None

    for step in range(40):
        changed = False
        for opc, rest in lines:
            ops = [o.strip() for o in rest.split(",")]
            if not ops or not _REG.match(ops[0]):
                continue
            r = evaluate(opc, ops)
            if r == "undef":
                continue
            old = ranges.get(ops[0], "unset")
            if r is not None and old not in ("unset", None):
                r = (min(r[0], old[0]), max(r[1], old[1]))
            elif old is None:
                r = None
            if step >= 30 and r != old and old != "unset":
                r = None  # still growing (a loop counter): widened to unknown
            if r != old:
                ranges[ops[0]] = r
                changed = True
        if not changed:
            break

    overflowing, checked = [], 0
    for opc, rest in lines:
        parts = opc.split(".")
        ops = [o.strip() for o in rest.split(",")]
        if parts[0] == "cvt" and len(parts) >= 3 and parts[-2][1:] == "64" and parts[-1][1:] == "32":
            srcs, kind = ops[1:2], parts[-1]
        elif parts[0] in ("mul", "mad") and parts[1] == "wide":
            srcs, kind = ops[1:3], parts[2]
        else:
            continue
        lo, hi = _INT32 if kind.startswith("s") else _UINT32
        known = [ranges.get(s) for s in srcs if _REG.match(s)]
        if known and all(k is not None for k in known):
            checked += 1
            if any(k[0] < lo or k[1] > hi for k in known):
                overflowing.append(f"{opc} {rest}  ranges {known}")
    return OffsetCheck(overflowing, checked)
