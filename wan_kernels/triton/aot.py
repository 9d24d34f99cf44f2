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

    from wan_kernels.triton import aot
    r = aot.compile_aot(kernel, {"x_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024},
                        arch=90, num_warps=4, aligned=("x_ptr",))
    print(r.summary())
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

ARCHS = (80, 90, 100)
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
    src = ASTSource(jit_fn, signature, constexprs, attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages, **(options or {})}
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


def compile_all_archs(fn: Callable, signature: dict[str, str], constexprs: dict[str, Any] | None = None,
                      archs: tuple[int, ...] = ARCHS, **kwargs) -> dict[int, AotResult]:
    """`compile_aot` for each arch (default sm_80, sm_90, sm_100)."""
    return {arch: compile_aot(fn, signature, constexprs, arch=arch, **kwargs) for arch in archs}
