"""Build of wan-kernels: ONE extension, `wan_kernels._C`, compiled with torch's cpp_extension + ninja.

Every build setting is a WAN_-prefixed environment variable read in `BuildConfig.from_env` below
(and documented in README.md). No GPU is needed: CUDA sources are compiled for the archs listed in
WAN_CUDA_ARCHS, never for a detected device.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import importlib.util
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0a;10.0a"
# Sources whose kernels exist for ONE arch only: compiled by nvcc for that arch alone (not for every
# arch in WAN_CUDA_ARCHS as the rest of csrc/*.cu), torch-free, in parallel, and linked into _C.
ARCH_SPECIFIC_SOURCES = {
    "10.0a": ("csrc/nvfp4_gemm/nvfp4_gemm_sm100_bf16.cu", "csrc/nvfp4_gemm/nvfp4_gemm_sm100_f16.cu"),
}


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    cuda_archs: tuple[str, ...]   # WAN_CUDA_ARCHS, e.g. "8.0;9.0a;10.0a" ("+PTX" suffix adds PTX)
    skip_cuda: bool               # WAN_SKIP_CUDA_BUILD=1: C++ CPU kernels only
    jobs: int | None              # WAN_BUILD_JOBS: parallel compile jobs (ninja)
    nvcc_threads: int             # WAN_NVCC_THREADS: nvcc --threads (archs compiled in parallel)
    debug: bool                   # WAN_DEBUG_BUILD=1: -O0 -g
    no_ext: bool                  # WAN_NO_EXT=1: install the Python package only (the Makefile then
                                  # builds _C in place, incrementally, with `setup.py build_ext --inplace`)

    @staticmethod
    def from_env() -> "BuildConfig":
        archs = os.environ.get("WAN_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        jobs = os.environ.get("WAN_BUILD_JOBS")
        return BuildConfig(
            cuda_archs=tuple(a.strip() for a in archs.replace(",", ";").split(";") if a.strip()),
            skip_cuda=os.environ.get("WAN_SKIP_CUDA_BUILD", "0") == "1",
            jobs=int(jobs) if jobs else None,
            nvcc_threads=int(os.environ.get("WAN_NVCC_THREADS", "1")),
            debug=os.environ.get("WAN_DEBUG_BUILD", "0") == "1",
            no_ext=os.environ.get("WAN_NO_EXT", "0") == "1",
        )


def gencode_flags(archs: tuple[str, ...]) -> list[str]:
    """"8.0" -> sm_80 SASS; "9.0a" -> sm_90a; "10.0a+PTX" -> sm_100a SASS + compute_100a PTX."""
    flags = []
    for arch in archs:
        ptx = arch.endswith("+PTX")
        arch = arch.removesuffix("+PTX")
        major, _, minor = arch.partition(".")
        suffix = minor[1:] if minor[1:] in ("a", "f") else ""
        if not (major.isdigit() and minor[:1].isdigit()):
            raise SystemExit(f"WAN_CUDA_ARCHS: cannot parse arch {arch!r} (expected e.g. 8.0, 9.0a, 10.0a)")
        num = f"{major}{minor[0]}{suffix}"
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


def find_cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home is None and Path("/usr/local/cuda/bin/nvcc").exists():
        home = "/usr/local/cuda"
    if home is None and shutil.which("nvcc"):
        home = str(Path(shutil.which("nvcc")).resolve().parent.parent)
    return home


def nvidia_wheel_includes() -> list[str]:
    """CUDA library headers (cublas_v2.h, cusparse.h, ...) that torch's headers include ship in the
    nvidia-* wheels torch depends on (site-packages/nvidia/cu13/include), not in /usr/local/cuda."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for base in spec.submodule_search_locations:
        found += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    return found


def cutlass_includes() -> tuple[list[str], str]:
    """CUTLASS/CuTe headers from the `nvidia-cutlass` PyPI package, found by import."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        return [], ""
    base = Path(spec.origin).parent / "source"
    dirs = [base / "include", base / "tools" / "util" / "include"]
    if not (dirs[0] / "cutlass" / "cutlass.h").exists():
        return [], ""
    return [str(d) for d in dirs], importlib.metadata.version("nvidia-cutlass")


def _arch(a: str) -> str:
    return a.removesuffix("+PTX")


def arch_specific_sources(cfg: BuildConfig, with_cuda: bool) -> dict[str, tuple[str, ...]]:
    if not with_cuda:
        return {}
    return {a: srcs for a, srcs in ARCH_SPECIFIC_SOURCES.items() if a in {_arch(x) for x in cfg.cuda_archs}}


def _up_to_date(obj: Path, dep: Path) -> bool:
    """True when obj is newer than every file its nvcc -MD dependency list names."""
    if not obj.exists() or not dep.exists():
        return False
    deps = dep.read_text().replace("\\\n", " ").split(":", 1)[-1].split()
    mtime = obj.stat().st_mtime
    return all(Path(d).exists() and Path(d).stat().st_mtime <= mtime for d in deps)


def compile_arch_specific(sources: dict[str, tuple[str, ...]], include_dirs: list[str], opt: list[str],
                          out_dir: Path, nvcc: str) -> list[str]:
    """nvcc each arch-specific source for its own arch (in parallel, skipping up-to-date objects)."""
    import subprocess

    out_dir.mkdir(parents=True, exist_ok=True)
    jobs, objs = [], []
    for arch, srcs in sources.items():
        for src in srcs:
            obj = out_dir / (Path(src).stem + ".o")
            objs.append(str(obj))
            dep = obj.with_suffix(".d")
            if _up_to_date(obj, dep):
                continue
            cmd = [nvcc, "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", "-lineinfo", *opt,
                   *gencode_flags((arch,)), *[f"-I{d}" for d in include_dirs], "-MD", "-MF", str(dep),
                   "-c", str(ROOT / src), "-o", str(obj)]
            print(f"wan_kernels: nvcc {src} for {arch} only", flush=True)
            jobs.append((src, subprocess.Popen(cmd)))
    for src, proc in jobs:
        if proc.wait() != 0:
            raise SystemExit(f"wan_kernels: nvcc failed on {src}")
    return objs


def write_build_info(path: Path, with_cuda: bool, archs: str, cuda_version: str, cutlass_version: str,
                     sm100_gemm: bool = False) -> None:
    import torch

    text = (
        "// Generated by setup.py: how this build of wan_kernels._C was configured.\n#pragma once\n"
        f"#define WAN_BUILD_WITH_CUDA {int(with_cuda)}\n"
        f'#define WAN_BUILD_CUDA_ARCHS "{archs}"\n'
        f'#define WAN_BUILD_CUDA_VERSION "{cuda_version}"\n'
        f'#define WAN_BUILD_CUTLASS_VERSION "{cutlass_version}"\n'
        f'#define WAN_BUILD_TORCH_VERSION "{torch.__version__}"\n'
        f"#define WAN_BUILD_SM100_GEMM {int(sm100_gemm)}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:  # keep the mtime: no needless ninja rebuilds
        path.write_text(text)


def extensions(cfg: BuildConfig, cuda_home: str | None):
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = not cfg.skip_cuda and torch.version.cuda is not None and cuda_home is not None
    if not cfg.skip_cuda and not with_cuda:
        print(f"wan_kernels: building C++ CPU kernels only (torch CUDA={torch.version.cuda}, nvcc home={cuda_home})")

    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp") if "tests" not in p.parts)
    gen_dir = ROOT / "build" / "wan_generated"
    include_dirs = [str(ROOT / "csrc"), str(gen_dir)]
    opt = ["-O0", "-g"] if cfg.debug else ["-O3"]
    # -fopenmp: at::parallel_for is a header template that runs serially in a translation unit compiled
    # without OpenMP (torch's own CPU kernels are built with it; torch links libgomp).
    # -ffp-contract=off: a * b + c stays two roundings in the AVX512 (FMA-capable) paths, as torch computes it
    cxx = opt + ["-Wall", "-Wno-unused-function", "-fopenmp", "-ffp-contract=off"]
    cutlass_dirs, cutlass_version = cutlass_includes()
    if with_cuda:
        special = {src for srcs in ARCH_SPECIFIC_SOURCES.values() for src in srcs}
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu")
                          if "tests" not in p.parts and str(p.relative_to(ROOT)) not in special)
        include_dirs += nvidia_wheel_includes() + cutlass_dirs
        nvcc = opt + ["-lineinfo", "--expt-relaxed-constexpr", "--expt-extended-lambda",
                      f"--threads={cfg.nvcc_threads}"] + gencode_flags(cfg.cuda_archs)
        arch_sources = arch_specific_sources(cfg, with_cuda)
        if arch_sources and not cutlass_dirs:
            raise SystemExit("wan_kernels: the sm_100a NVFP4 GEMM needs CUTLASS: pip install nvidia-cutlass")
        write_build_info(gen_dir / "wan_build_info.h", True, ";".join(cfg.cuda_archs), torch.version.cuda,
                         cutlass_version, sm100_gemm="10.0a" in arch_sources)
        # libcudart.so sits in $CUDA_HOME/lib on this toolkit layout, lib64 on others.
        library_dirs = [d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")) if os.path.isdir(d)]
        ext = CUDAExtension("wan_kernels._C", sources, include_dirs=include_dirs, library_dirs=library_dirs,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])
        # compiled by WanBuildExt right before the extension, then linked into it
        ext.wan_arch_sources = (arch_sources, include_dirs, opt, ROOT / "build" / "wan_arch_objects",
                                os.path.join(cuda_home, "bin", "nvcc"))
        return [ext]
    write_build_info(gen_dir / "wan_build_info.h", False, "", "", cutlass_version)
    return [CppExtension("wan_kernels._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
                         extra_link_args=["-fopenmp"])]


def main() -> None:
    cfg = BuildConfig.from_env()
    cuda_home = find_cuda_home()
    if cuda_home and "CUDA_HOME" not in os.environ:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import: set it first
    if cfg.jobs:
        os.environ["MAX_JOBS"] = str(cfg.jobs)
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension

    class WanBuildExt(BuildExtension):
        def build_extensions(self):
            for ext in self.extensions:
                if getattr(ext, "wan_arch_sources", None):
                    ext.extra_objects = list(ext.extra_objects or []) + compile_arch_specific(*ext.wan_arch_sources)
            super().build_extensions()

    setup(
        ext_modules=[] if cfg.no_ext else extensions(cfg, cuda_home),
        cmdclass={"build_ext": WanBuildExt.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    sys.exit(main())
