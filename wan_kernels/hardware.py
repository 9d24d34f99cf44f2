"""Peak throughput of the GPUs this package targets: the one table the benchmarks, the cost model and the
GPU check read (REFERENCE.md section 6)."""

from __future__ import annotations

import torch

# Dense peaks from vendor spec sheets (no sparsity): TFLOP/s bf16 (tensor cores, fp32 accumulate),
# TFLOP/s fp4 (0 = no FP4 tensor cores), HBM/GDDR bandwidth GB/s.
PEAKS = {
    "H100": {"bf16": 989.0, "fp4": 0.0, "gbps": 3350.0},
    "H200": {"bf16": 989.0, "fp4": 0.0, "gbps": 4800.0},
    "B200": {"bf16": 2250.0, "fp4": 9000.0, "gbps": 7670.0},
    "A100": {"bf16": 312.0, "fp4": 0.0, "gbps": 2039.0},
    "RTX 5090": {"bf16": 209.5, "fp4": 1676.0, "gbps": 1792.0},
    "RTX 4090": {"bf16": 165.2, "fp4": 0.0, "gbps": 1008.0},   # Ada whitepaper: FP16 tensor, FP32 accumulate
}


def gpu_peak(name: str | None = None) -> tuple[str, dict] | None:
    """The peak-table entry of the current (or named) GPU, matched by substring of its name."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    for key, peak in PEAKS.items():
        if key.replace(" ", "").lower() in name.replace(" ", "").lower():
            return key, peak
    return None


# The first compute capability with FP8 (e4m3) tensor-core MMAs (Ada, sm_89; Hopper, Blackwell after it).
FP8_MMA_CAPABILITY = (8, 9)


def default_pv(capability: tuple[int, int] | None) -> str:
    """The P.V precision `pv="auto"` of wan::attention_int8 means on a device class: "fp8" (e4m3 P and V) where
    the GPU has FP8 MMAs (sm_89 and later), "fp16" below (sm_80/86). None (CPU: the reference, the Triton
    interpreter) is "fp8": the CPU emulates what the fp8 GPUs run, the accuracy most users get."""
    return "fp8" if capability is None or tuple(capability) >= FP8_MMA_CAPABILITY else "fp16"
