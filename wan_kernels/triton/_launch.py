"""Where a Triton launcher runs its kernel: compiled on CUDA tensors, interpreted on CPU tensors.

TRITON_INTERPRET is read per call (not at import), so a launcher can keep both a compiled and an
interpreted copy of its kernel and pick per device; the routing reads the same switch.
"""

import os

import torch


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_interpreter(t: torch.Tensor, op: str) -> bool:
    """True when `t` is a CPU tensor to run through the Triton interpreter; CUDA tensors run compiled.
    A CPU tensor without TRITON_INTERPRET=1 raises: the compiled kernel cannot run there."""
    if t.device.type == "cuda":
        return False
    if not interpreter_enabled():
        raise RuntimeError(f"{op} (triton): CPU tensors need TRITON_INTERPRET=1")
    return True
