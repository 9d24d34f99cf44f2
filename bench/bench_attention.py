"""Benchmark of wan::attention (non-causal, [B, S, H, D], optional image key/value set) on Wan-14B shapes.

Shapes (REFERENCE §2/§6): 40 heads x head_dim 128, bf16;
  self-attention at 480p (32,760 tokens) and 720p (75,600 tokens), q = k = v length;
  cross-attention from the 480p/720p latents to the 512 text keys (T2V) and to 512 text + 257 image keys (I2V).
Providers:
  wan-triton      the Triton kernel (one launch, also for I2V)                                  GPU only
  wan-triton-2x   I2V only: two Triton launches (text, image) summed, what one launch replaces  GPU only
  wan-ws          the Hopper/Blackwell path (wan_kernels/triton/attention_ws.py: TMA, warp-        sm_90/sm_100
                  specialised KV loop, persistent grid; I2V in one launch), called directly: listed only
                  where it serves the device (`attention_ws.supports`), else it would silently be wan-triton
  sdpa            F.scaled_dot_product_attention with the flash backend (I2V: two calls summed)  GPU only
  ref-eager       wan_kernels.ref.attention (the spec; correctness reference)
  ref-compile     torch.compile(wan_kernels.ref.attention) (the speedup baseline)
The references materialise the [B, H, Sq, Sk] fp32 score matrix (self-attention at 480p: 171 GB), so they
run only where that fits in REF_MAX_BYTES; elsewhere SDPA is the correctness reference and the baseline (the
table's "vs ref-compile" column then reads "vs sdpa", said in a note).
FLOPs and bytes: the op spec's (`SPECS["attention"].cost`): 4 * B * H * Sq * (Sk + Si) * D (QK^T and PV); q, k, v
(and k_img, v_img) read once and the output written once (the flash-attention minimum).
On CPU, --quick runs tiny shapes with the ref providers (the GPU providers are reported skipped), and --cpu
runs the shapes of bench/bench_model.py (batch 2, 1280 tokens, 4 heads x 128, bf16) with the CPU providers:
  wan-cpu         the C++ CPU kernel (impl="cpu": the AVX512-BF16 kernel where the CPU has it)
  sdpa            F.scaled_dot_product_attention in bf16 (ATen's CPU flash kernel; what diffusers runs)

With --backward, every provider runs forward + backward (the gradients of q, k, v and k_img, v_img for a fixed
random cotangent; correctness is checked on the gradients): wan (wan_kernels.attention, impl="auto": on a GPU the
Triton forward saving the LSEs + the Triton backward; on CPU the reference forward/backward ops), sdpa (its own
backward: FlashAttention-2 on a GPU, ATen's CPU flash backward on CPU; I2V two calls summed), ref-eager,
ref-compile. FLOPs: 3.5x the forward's (FlashAttention's convention: the backward's 5 products vs the forward's
2, the recomputed q k^T not counted). --backward --quick runs tiny shapes on CPU.

    python bench/bench_attention.py [--quick | --cpu] [--backward] [--json out.json] [--csv out.csv]
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness  # noqa: E402
from wan_kernels import ref  # noqa: E402
from wan_kernels._spec import SPECS  # noqa: E402
from wan_kernels.triton import attention_ws  # noqa: E402
from wan_kernels.triton.attention import attention as triton_attention  # noqa: E402

HEADS, HEAD_DIM = 40, 128
TEXT, IMAGE = 512, 257
TOKENS = {"480p": 32760, "720p": 75600}
REF_MAX_BYTES = 8 * 2**30  # fp32 score matrix the reference may allocate (it also keeps its softmax)


def _sdpa(q, k, v, k_img=None, v_img=None, backend: str = "flash"):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def one(k_, v_):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2)).transpose(1, 2)

    with sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]):
        out = one(k, v)
        return out if k_img is None else out + one(k_img, v_img)


def make_case(label: str, B: int, Sq: int, Sk: int, Si: int | None, H: int, D: int, dtype, device) -> harness.Case:
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    q, k, v = r(B, Sq, H, D), r(B, Sk, H, D), r(B, Sk, H, D)
    ki, vi = (r(B, Si, H, D), r(B, Si, H, D)) if Si else (None, None)
    cost = SPECS["attention"].cost(q, k, v, ki, vi, None)  # one fused kernel: q, k, v read once, out written once
    flops, nbytes = float(cost["flops"]), float(cost["read"] + cost["write"])
    providers = [harness.Provider("wan-triton", lambda: triton_attention(q, k, v, ki, vi), gpu_only=True)]
    if Si:
        providers.append(harness.Provider(
            "wan-triton-2x", lambda: triton_attention(q, k, v) + triton_attention(q, ki, vi), gpu_only=True))
    if q.is_cuda and attention_ws.supports(q, k, v, ki, vi):
        providers.append(harness.Provider("wan-ws", lambda: attention_ws.attention(q, k, v, ki, vi), gpu_only=True))
    providers.append(harness.Provider("sdpa", lambda: _sdpa(q, k, v, ki, vi), gpu_only=True))
    if 4.0 * B * H * Sq * max(Sk, Si or 0) <= REF_MAX_BYTES:
        compiled = torch.compile(ref.attention)
        providers.append(harness.Provider("ref-eager", lambda: ref.attention(q, k, v, ki, vi)))
        providers.append(harness.Provider("ref-compile", lambda: compiled(q, k, v, ki, vi)))
    shape = f"{label} B{B} q{Sq} k{Sk}{f'+i{Si}' if Si else ''} H{H} d{D}"
    return harness.Case(shape, flops, nbytes, providers)


def make_backward_case(label: str, B: int, Sq: int, Sk: int, Si: int | None, H: int, D: int, dtype,
                       device) -> harness.Case:
    """Forward + backward of every provider; each returns the gradients (q, k, v[, k_img, v_img])."""
    import wan_kernels

    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    q, k, v = r(B, Sq, H, D), r(B, Sk, H, D), r(B, Sk, H, D)
    ki, vi = (r(B, Si, H, D), r(B, Si, H, D)) if Si else (None, None)
    dout = r(B, Sq, H, D)
    inputs = [t for t in (q, k, v, ki, vi) if t is not None]

    def fwd_bwd(fn):
        def run():
            xs = [t.detach().requires_grad_() for t in inputs]
            out = fn(*xs)
            return torch.autograd.grad(out, xs, dout)
        return run

    def with_img(fn):
        return lambda q, k, v, ki=None, vi=None: fn(q, k, v, ki, vi)

    compiled = torch.compile(ref.attention)
    providers = [harness.Provider("wan", fwd_bwd(with_img(wan_kernels.attention))),
                 harness.Provider("sdpa", fwd_bwd(_sdpa if device == "cuda" else with_img(_sdpa_math_free)))]
    if 4.0 * B * H * Sq * max(Sk, Si or 0) <= REF_MAX_BYTES:
        providers += [harness.Provider("ref-eager", fwd_bwd(with_img(ref.attention))),
                      harness.Provider("ref-compile", fwd_bwd(with_img(compiled)))]
    keys = Sk + (Si or 0)
    flops = 3.5 * SPECS["attention"].cost(q, k, v, ki, vi, None)["flops"]
    nbytes = float(dtype.itemsize) * B * H * D * (4 * Sq + 4 * keys)  # q, k, v, dout read; dq, dk, dv written
    shape = f"{label} B{B} q{Sq} k{Sk}{f'+i{Si}' if Si else ''} H{H} d{D}"
    return harness.Case(shape, flops, nbytes, providers)


def _sdpa_math_free(q, k, v, k_img=None, v_img=None):
    """SDPA with the backend it picks (CPU: ATen's flash kernel and its backward)."""
    def one(k_, v_):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2)).transpose(1, 2)

    return one(k, v) if k_img is None else one(k, v) + one(k_img, v_img)


def backward_main(args) -> None:
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.quick:
        print("bench_attention --backward: no GPU; run with --quick for the CPU run at small shapes.", file=sys.stderr)
        sys.exit(2)
    device = "cuda" if on_gpu else "cpu"
    if on_gpu:
        specs = [(f"self {res}", 1, n, n, None) for res, n in TOKENS.items()]
        specs += [("cross-t2v 720p", 1, TOKENS["720p"], TEXT, None), ("cross-i2v 720p", 1, TOKENS["720p"], TEXT, IMAGE)]
        H = HEADS
    else:
        specs = [("self", 1, 512, 512, None), ("cross-t2v", 1, 512, 128, None), ("cross-i2v", 1, 512, 128, 65)]
        H = 4
    rows, notes = [], [f"{torch.get_num_threads()} threads" if not on_gpu else "GPU"]
    for label, B, Sq, Sk, Si in specs:
        case = make_backward_case(label, B, Sq, Sk, Si, H, HEAD_DIM, torch.bfloat16, device)
        has_ref = any(p.name == "ref-eager" for p in case.providers)
        rows += harness.run([case], reference="ref-eager" if has_ref else "sdpa", baseline="sdpa")
    harness.report(rows, args, "wan::attention forward + backward (bf16; gradients of q, k, v[, k_img, v_img])",
                   notes + ["speedup column is vs sdpa (forward + backward)"])


def wan_cases(device: str, quick: bool) -> list[tuple[harness.Case, bool]]:
    """(case, has_reference) for the Wan-14B shapes, or tiny shapes with the same structure under --quick."""
    dt = torch.bfloat16
    if quick:
        specs = [("self", 1, 256, 256, None, 2), ("cross-t2v", 1, 256, 64, None, 2), ("cross-i2v", 1, 256, 64, 33, 2)]
    else:
        specs = []
        for res, n in TOKENS.items():
            specs += [(f"self {res}", 1, n, n, None, HEADS), (f"cross-t2v {res}", 1, n, TEXT, None, HEADS),
                      (f"cross-i2v {res}", 1, n, TEXT, IMAGE, HEADS)]
    cases = []
    for label, B, Sq, Sk, Si, H in specs:
        case = make_case(label, B, Sq, Sk, Si, H, HEAD_DIM, dt, device)
        cases.append((case, any(p.name == "ref-eager" for p in case.providers)))
    return cases


def cpu_cases() -> list[harness.Case]:
    """bench_model.py's attention calls: self (1280 keys), cross T2V (512 text keys), cross I2V (+257 image)."""
    import wan_kernels

    cases = []
    for label, Sk, Si in (("self", 1280, None), ("cross-t2v", TEXT, None), ("cross-i2v", TEXT, IMAGE)):
        B, Sq, H, D = 2, 1280, 4, HEAD_DIM
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, n, H, D, generator=g, dtype=torch.bfloat16) for n in (Sq, Sk, Sk))
        ki, vi = (torch.randn(B, Si, H, D, generator=g, dtype=torch.bfloat16) for _ in range(2)) if Si else (None, None)
        keys = Sk + (Si or 0)

        def sdpa(q=q, k=k, v=v, ki=ki, vi=vi):
            def one(k_, v_):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k_.transpose(1, 2),
                                                      v_.transpose(1, 2)).transpose(1, 2)
            return one(k, v) if ki is None else one(k, v) + one(ki, vi)

        compiled = torch.compile(ref.attention)
        providers = [
            harness.Provider("wan-cpu", lambda q=q, k=k, v=v, ki=ki, vi=vi: wan_kernels.attention(q, k, v, ki, vi,
                                                                                                  impl="cpu")),
            harness.Provider("sdpa", sdpa),
            harness.Provider("ref-eager", lambda q=q, k=k, v=v, ki=ki, vi=vi: ref.attention(q, k, v, ki, vi)),
            harness.Provider("ref-compile", lambda q=q, k=k, v=v, ki=ki, vi=vi: compiled(q, k, v, ki, vi)),
        ]
        shape = f"{label} B{B} q{Sq} k{Sk}{f'+i{Si}' if Si else ''} H{H} d{D}"
        cases.append(harness.Case(shape, 4.0 * B * H * Sq * keys * D, 2.0 * B * H * D * (2 * Sq + 2 * keys),
                                  providers))
    return cases


def main(argv=None) -> None:
    p = harness.arg_parser(__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="bench_model.py's shapes on the CPU kernels")
    p.add_argument("--backward", action="store_true", help="forward + backward (training) instead of the forward")
    args = p.parse_args(argv)
    if args.backward:
        backward_main(args)
        return
    if args.cpu:
        from wan_kernels import _C

        rows = harness.run(cpu_cases(), reference="ref-eager", baseline="sdpa")
        harness.report(rows, args, "wan::attention on CPU (bf16, non-causal; I2V = two softmaxes summed)",
                       [f"C++ CPU kernel for bf16: {_C.cpu_attention_bf16_kernel()}, {torch.get_num_threads()} threads; "
                        "speedup column is vs sdpa"])
        return
    on_gpu = torch.cuda.is_available()
    notes = []
    if not on_gpu and not args.quick:
        print("bench_attention: no GPU; the Wan shapes need one (the CPU reference would materialise a "
              "171 GB score matrix). Run with --quick for the CPU smoke run.", file=sys.stderr)
        sys.exit(2)
    if not on_gpu:
        notes.append("CPU: tiny shapes, reference providers only; wan-triton / sdpa (GPU providers) skipped")
    device = "cuda" if on_gpu else "cpu"
    rows = []
    for case, has_ref in wan_cases(device, args.quick):
        if has_ref:
            rows += harness.run([case], reference="ref-eager", baseline="ref-compile")
        else:
            rows += harness.run([case], reference="sdpa", baseline="sdpa")
            notes.append(f"{case.shape}: reference too large (score matrix > {REF_MAX_BYTES >> 30} GB); checked "
                         f"against sdpa, speedup column is vs sdpa")
    harness.report(rows, args, "wan::attention (bf16, non-causal; I2V = two softmaxes summed)", notes)


if __name__ == "__main__":
    main()
