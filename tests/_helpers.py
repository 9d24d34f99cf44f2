"""Helpers shared by test modules that are not fixtures (fixtures: tests/conftest.py; inputs: tests/_inputs.py;
model builders and inputs: wan_model/testing.py; accuracy rules: wan_kernels/testing.py): the tiny variants, one
forward of ours / of diffusers, diffusers' dtype rule and loader, NVFP4 bit-exactness, a time limit."""

from __future__ import annotations

import contextlib
import signal

import torch

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
