"""`python -m wan_kernels`: versions, what was compiled, the routing table and a self-check of every
available backend against the reference on small CPU (and, if present, GPU) inputs."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

import torch

import wan_kernels
from wan_kernels import routing, samples
from wan_kernels._extension import EXTENSION


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _max_diff(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(_max_diff(x, y) for x, y in zip(a, b))
    if a.dtype in (torch.uint8, torch.int8, torch.float8_e4m3fn):  # codes: count mismatching bytes
        return float((a.view(torch.uint8) != b.view(torch.uint8)).sum())
    return float((a.float() - b.float()).abs().max())


def self_check(devices: list[torch.device], namespace: str = "wan") -> bool:
    """Every public op of `namespace` (its spec's sample inputs, fp32) x every backend that can run it on each
    device, against the reference."""
    ok = True
    print("\nself-check (max |backend - ref|; NVFP4 and INT8 codes, e4m3 scales: mismatching bytes, must be 0):")
    for device in devices:
        for op, args in samples.op_inputs(torch.float32, device, namespace=namespace).items():
            expected = routing.resolve(op, "ref", device)(*args)
            for impl in ("auto",) + routing.BACKENDS[:-1]:
                if impl != "auto" and routing.unavailable_reason(op, impl, device) is not None:
                    continue
                diff = _max_diff(routing.resolve(op, impl, device)(*args), expected)
                good = diff <= 1e-4
                ok &= good
                print(f"  {device.type:4s} {op:19s} {impl:6s} {diff:10.3g}  {'ok' if good else 'FAIL'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m wan_kernels", description=__doc__)
    p.add_argument("--no-check", action="store_true", help="skip the self-check")
    args = p.parse_args(argv)

    print(f"wan-kernels {wan_kernels.__version__}  python {platform.python_version()}  torch {torch.__version__}"
          f"  triton {_version('triton')}  nvidia-cutlass {_version('nvidia-cutlass')}")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print(f"devices: cpu ({torch.get_num_threads()} threads)" + "".join(f", cuda:{i} {n}" for i, n in enumerate(gpus)))
    if EXTENSION.loaded:
        info = EXTENSION.build_info
        cuda = f"CUDA {info['cuda_version']} kernels for archs {info['cuda_archs']}" if info["with_cuda"] else \
            "no CUDA kernels (C++ CPU kernels only)"
        print(f"wan_kernels._C: built with torch {info['torch_version']}; {cuda}; "
              f"CUTLASS {info['cutlass_version'] or 'not found'}")
        from wan_kernels import _C
        print(f"C++ CPU attention for bfloat16: {_C.cpu_attention_bf16_kernel()} "
              "(aten_amx on AMX CPUs, avx512_bf16 on AVX512-BF16 ones, else aten; WAN_CPU_ATTENTION overrides)")
    else:
        print(f"wan_kernels._C: NOT BUILT, pure-torch fallback ({EXTENSION.error})")
    print(f"Triton interpreter: {'on' if routing.interpreter_enabled() else 'off'} (TRITON_INTERPRET)")

    table = routing.route_table()
    classes = list(routing.DEVICE_CLASSES)
    width = max(len(c) for c in classes) + 2
    print("\nrouting (backend used by impl='auto'):")
    op_width = max(len(op) for op in table)
    print(f"  {'op':{op_width}s}" + "".join(f"{c:>{width}s}" for c in classes))
    for op, row in table.items():
        print(f"  {op:{op_width}s}" + "".join(f"{row[c]:>{width}s}" for c in classes))
    print("  " + "; ".join(f"{c}: {gpus}" for c, gpus in routing.GPUS.items()))
    from wan_kernels.triton import attention_ws
    kernels = {c: routing.triton_kernel("attention", cap) for c, cap in routing.DEVICE_CLASSES.items()}
    print("  Triton kernel of attention / attention_forward / attention_lse: "
          + ", ".join(f"{c} {k.split('.')[-2]}" for c, k in kernels.items() if k)
          + f" (attention_ws routed on arch classes {sorted(attention_ws.ROUTED_ARCH_CLASSES) or 'none'}: "
          "enabled once the GPU check measures it)")
    if args.no_check:
        return 0
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    ok = self_check(devices)
    print("\nself-check:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
