"""Benchmark of wan::attention_int8 (8-bit, SageAttention2-class) against our bf16 kernel and SDPA on Wan-14B shapes.

Shapes (REFERENCE §2/§6): 40 heads x head_dim 128, bf16 inputs; self-attention at 480p (32,760 tokens) and 720p
(75,600), cross-attention to 512 text keys (T2V) and 512 text + 257 image keys (I2V).
Providers:
  int8-fp16       wan_kernels.attention_int8(pv="fp16"), the Triton kernel (quantization included)     GPU only
  int8-fp8        wan_kernels.attention_int8(pv="fp8"); listed only on sm_89+ (FP8 MMA)              GPU only
  int8-nobalance  the device's default pv without the quantizer's channel balance (stage 1b: a statistics
                  pass over q), the Triton function itself: what the balance costs                 GPU only
  wan-triton      wan_kernels.attention, our bf16 Triton kernel                                       GPU only
  sdpa            F.scaled_dot_product_attention, flash backend (I2V: two calls summed)               GPU only
  sdpa-cudnn      the same, cuDNN backend                                                             GPU only
  sage            sageattention's `sageattn` (NHD, its own dispatch per arch), when importable: the peer
                  users run (I2V: two calls summed; given its own copies of k, which it writes)      GPU only
  int8-quantize   the quantizer alone (wan_kernels/triton/attention_int8_quant.py), as its own row: GB/s of
                  the bytes `wan_model.cost.int8_quantization_bytes` counts; its share of int8-fp8     GPU only
  int8-ref-fp16   the int8 reference (the exact emulation, CPU backend), pv="fp16"
  int8-ref-fp8    the same, pv="fp8"
  ref-eager       wan_kernels.ref.attention (fp32 math), where its score matrix fits (REF_MAX_BYTES)
Correctness gate, before any timing: every int8 provider's (sage's too) worst-head NRMSE vs fp32 attention (ref-eager where it
fits, else SDPA) must be below NRMSE_GATE and its worst-head cosine above 0.999 (tests/test_attention_int8.py's
practice; the outputs are not allclose to bf16 by design); the bf16 providers are checked with the harness's
allclose against the same reference. FLOPs and bytes: the op spec's (`SPECS["attention_int8"].cost`, the one
attention FLOP formula); %peak is against the bf16 peak (the int8/fp8 peaks are 2x it). Speedup column: vs sdpa on
a GPU, vs ref-eager on CPU. On CPU, --quick runs tiny shapes with the reference providers (the GPU providers are
reported skipped).

    python bench/bench_attention_int8.py [--quick] [--json out.json] [--csv out.csv]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import wan_kernels  # noqa: E402
from bench import harness  # noqa: E402
from bench.bench_attention import HEAD_DIM, HEADS, IMAGE, REF_MAX_BYTES, TEXT, TOKENS, _sdpa  # noqa: E402
from wan_kernels import ref  # noqa: E402
from wan_kernels._spec import SPECS  # noqa: E402
from wan_kernels.hardware import default_pv  # noqa: E402
from wan_kernels.triton import attention_int8 as attention_int8_triton  # noqa: E402

NRMSE_GATE = 0.06  # random Gaussian V: fp8 P.V alone costs ~3.6-4.2% (REFERENCE §10), fp16 ~1%


def worst_head(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(worst-head NRMSE, worst-head cosine) over [B, S, H, D] outputs."""
    d, w = got.double(), want.double()
    err = (d - w).pow(2).sum((1, 3)).sqrt() / w.pow(2).sum((1, 3)).sqrt()
    cos = (d * w).sum((1, 3)) / (d.pow(2).sum((1, 3)).sqrt() * w.pow(2).sum((1, 3)).sqrt())
    return err.max().item(), cos.min().item()


def make_case(label: str, B: int, Sq: int, Sk: int, Si: int | None, H: int, D: int, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    q, k, v = r(B, Sq, H, D), r(B, Sk, H, D), r(B, Sk, H, D)
    ki, vi = (r(B, Si, H, D), r(B, Si, H, D)) if Si else (None, None)
    cost = SPECS["attention_int8"].cost(q, k, v, ki, vi, None, "auto")
    on_gpu = device == "cuda"
    providers, int8 = [], []
    if on_gpu:
        cap = torch.cuda.get_device_capability()
        for pv in ("fp16", "fp8") if default_pv(cap) == "fp8" else ("fp16",):
            p = harness.Provider(f"int8-{pv}", lambda pv=pv: wan_kernels.attention_int8(q, k, v, ki, vi, pv=pv),
                                 gpu_only=True)
            providers.append(p)
            int8.append(p)
        p = harness.Provider("int8-nobalance", lambda: attention_int8_triton.attention_int8(
            q, k, v, ki, vi, pv=default_pv(cap), balance=False), gpu_only=True)
        providers.append(p)
        int8.append(p)
        sage = _sage(q, k, v, ki, vi)
        if sage is not None:
            providers.append(sage)
            int8.append(sage)
    providers += [harness.Provider("wan-triton", lambda: wan_kernels.attention(q, k, v, ki, vi, impl="triton"),
                                   gpu_only=True),
                  harness.Provider("sdpa", lambda: _sdpa(q, k, v, ki, vi), gpu_only=True),
                  harness.Provider("sdpa-cudnn", lambda: _sdpa(q, k, v, ki, vi, backend="cudnn"), gpu_only=True)]
    fits = 4.0 * B * H * Sq * max(Sk, Si or 0) <= REF_MAX_BYTES
    if fits:
        for pv in ("fp16", "fp8"):
            p = harness.Provider(f"int8-ref-{pv}", lambda pv=pv: wan_kernels.attention_int8(q, k, v, ki, vi, pv=pv,
                                                                                             impl="ref"))
            providers.append(p)
            int8.append(p)
        providers.append(harness.Provider("ref-eager", lambda: ref.attention(q, k, v, ki, vi)))
    shape = f"{label} B{B} q{Sq} k{Sk}{f'+i{Si}' if Si else ''} H{H} d{D}"
    case = harness.Case(shape, float(cost["flops"]), float(cost["read"] + cost["write"]), providers)
    quant = None
    if on_gpu:
        from wan_kernels.triton.attention_int8_quant import quantize
        from wan_model.cost import int8_quantization_bytes

        pv = default_pv(torch.cuda.get_device_capability())
        nbytes = int8_quantization_bytes(B, Sq, [Sk] + ([Si] if Si else []), H, D, pv)
        quant = harness.Case(f"{shape} quantize", 0.0, float(nbytes), [harness.Provider(
            "int8-quantize", lambda: quantize(q, k, v, ki, vi, D ** -0.5, pv, False,
                                              torch.cuda.get_device_capability()), gpu_only=True)])
    return case, int8, fits, quant


def _sage(q, k, v, ki, vi):
    """sageattention's `sageattn` as a provider, or None when it is not installed (it writes the smoothed k into
    its argument: it gets copies, made here, outside the timed call)."""
    try:
        from sageattention import sageattn
    except ImportError:
        return None
    sets = [(k.clone(), v)] + ([(ki.clone(), vi)] if ki is not None else [])

    def run():
        out = sageattn(q, *sets[0], tensor_layout="NHD")
        return out if len(sets) == 1 else out + sageattn(q, *sets[1], tensor_layout="NHD")

    return harness.Provider("sage", run, gpu_only=True)


def gate(case: harness.Case, int8: list[harness.Provider], reference: str) -> list[str]:
    """The correctness gate of the int8 providers (raises); returns one note per provider."""
    want = next(p for p in case.providers if p.name == reference).fn()
    notes = []
    for p in int8:
        err, cos = worst_head(p.fn(), want)
        assert err < NRMSE_GATE and cos > 0.999, f"{case.shape} {p.name}: worst-head NRMSE {err:.4f}, cos {cos:.6f}"
        notes.append(f"{case.shape} {p.name}: worst-head NRMSE {err:.4f}, cos {cos:.6f} vs {reference}")
    return notes


def wan_cases(device: str, quick: bool):
    if quick:
        return [make_case("self", 1, 300, 300, None, 2, 128, torch.bfloat16, device),
                make_case("i2v", 1, 200, TEXT, IMAGE, 2, 128, torch.bfloat16, device),
                make_case("self-hd64", 1, 256, 256, None, 2, 64, torch.bfloat16, device)]
    out = []
    for res, n in TOKENS.items():
        out += [make_case(f"self-{res}", 1, n, n, None, HEADS, HEAD_DIM, torch.bfloat16, device),
                make_case(f"t2v-cross-{res}", 1, n, TEXT, None, HEADS, HEAD_DIM, torch.bfloat16, device),
                make_case(f"i2v-cross-{res}", 1, n, TEXT, IMAGE, HEADS, HEAD_DIM, torch.bfloat16, device)]
    return out


def main(argv=None) -> None:
    args = harness.arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.quick:
        print("bench_attention_int8: no GPU; the Wan shapes need one. Run with --quick for the CPU run (the "
              "correctness gate on tiny shapes, reference providers).", file=sys.stderr)
        sys.exit(2)
    notes = [] if on_gpu else ["CPU: tiny shapes, reference providers only; int8-fp16 / int8-fp8 / int8-nobalance / "
                               "sage / wan-triton / sdpa / sdpa-cudnn / int8-quantize (GPU providers) skipped"]
    if on_gpu and default_pv(torch.cuda.get_device_capability()) != "fp8":
        notes.append("int8-fp8 not listed: this GPU has no FP8 MMA (sm_80/86)")
    rows = []
    for case, int8, fits, quant in wan_cases("cuda" if on_gpu else "cpu", args.quick):
        reference = "ref-eager" if fits else "sdpa"
        notes += gate(case, int8, reference)
        # the bf16 providers vs the reference (the harness's allclose); the int8 ones were gated above
        checked = harness.run([_with(case, [p for p in case.providers if p not in int8])], reference=reference,
                              baseline="sdpa" if on_gpu else "ref-eager")
        timed = harness.run([_with(case, int8)], reference="none", baseline="none")
        base = next((r for r in checked if r.provider == ("sdpa" if on_gpu else "ref-eager") and r.ms), None)
        for r in timed:
            r.speedup = base.ms / r.ms if base is not None and r.ms else None
        rows += timed + checked
        if quant is not None:
            q_rows = harness.run([quant], reference="none", baseline="none")
            fp8 = next((r for r in timed if r.provider == f"int8-{default_pv(torch.cuda.get_device_capability())}"
                        and r.ms), None)
            if fp8 is not None and q_rows[0].ms:
                notes.append(f"{case.shape}: the quantizer takes {q_rows[0].ms:.3f} ms of "
                             f"{fp8.provider}'s {fp8.ms:.3f} ms ({100 * q_rows[0].ms / fp8.ms:.1f} %; bar 10 % at 480p)")
            rows += q_rows
    harness.report(rows, args, "wan::attention_int8 (INT8 Q.K^T, fp16/fp8 P.V) vs bf16 (non-causal; I2V = two "
                   "softmaxes summed)", notes + [f"speedup column is vs {'sdpa' if on_gpu else 'ref-eager'}"])


def _with(case: harness.Case, providers) -> harness.Case:
    return harness.Case(case.shape, case.flops, case.bytes, list(providers), case.peak_kind)


if __name__ == "__main__":
    main()
