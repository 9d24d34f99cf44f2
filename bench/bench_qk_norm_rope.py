"""Benchmark of wan::qk_norm_rope (RMSNorm of q/k across heads + interleaved RoPE, fused) on Wan shapes.

Shapes: Wan 1.3B (12 x 128), 5B (24 x 128), 14B (40 x 128) at 480p (32,760 tokens) and 720p (75,600 tokens),
batch 1, bf16. Providers: wan-triton (GPU), wan-triton-int8q (GPU: wan::qk_norm_rope_int8, q quantized in the
kernel for 8-bit attention; its GB/s is of the bf16 op's bytes, so it reads as the speed-up), wan-cpu (the C++ kernel, CPU), ref-eager / ref-compile (the
pure-torch reference), diffusers (its unfused sequence: norm_q, norm_k, unflatten, rope q, rope k).
Also prints the analytic bytes moved by the fused path vs diffusers' sequence (issue 3: target <= 1/3).
On CPU the token counts are divided by --cpu-token-divisor (default 16) to keep memory and time sane; the
Triton interpreter is not a performance path, so wan-triton is reported skipped without a GPU.
--backward times wan::qk_norm_rope_backward instead (grads for qkv and both norm weights): wan-triton / wan-cpu
(the backward kernels), ref-vjp (the reference's vector-Jacobian product the op replaced, `_autograd._vjp`),
ref-eager / ref-compile (the reference's closed-form backward), diffusers (autograd through its unfused sequence).

    python bench/bench_qk_norm_rope.py [--quick] [--backward] [--json out.json]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import wan_kernels  # noqa: E402
from bench.harness import Case, Provider, arg_parser, report, run  # noqa: E402
from wan_kernels import _autograd, ref  # noqa: E402
from wan_kernels._spec import SPECS  # noqa: E402

MODELS = {"1.3B": 12, "5B": 24, "14B": 40}   # heads of 128
TOKENS = {"480p": 32760, "720p": 75600}
HEAD_DIM = 128


def fused_bytes(tokens: int, C: int, D: int, elem: int = 2) -> int:
    """One pass: read the [S, 3C] qkv row and write q, k, v (v as a contiguous copy), plus the two norm
    weights and the fp32 cos/sin tables [S, D/2]: the op spec's count (`OpSpec.cost`, on meta tensors)."""
    act = {2: torch.bfloat16, 4: torch.float32}[elem]

    def meta(*shape, dtype=act):
        return torch.empty(shape, dtype=dtype, device="meta")

    table = meta(tokens, D // 2, dtype=torch.float32)
    cost = SPECS["qk_norm_rope"].cost(meta(1, tokens, 3 * C), meta(C), meta(C), table, table, C // D, 1e-6)
    return cost["read"] + cost["write"]


def diffusers_bytes(tokens: int, C: int, D: int, elem: int = 2) -> dict[str, int]:
    """Reads + writes of each op of diffusers' WanAttnProcessor between the q/k/v projections and attention
    (diffusers 0.42.1 transformer_wan.py), bf16 activations, fp32 rope tables [1, S, 1, D]:
      norm_q, norm_k: torch.nn.RMSNorm, counted as ONE fused kernel (read x + weight, write y): a lower bound;
      unflatten: a view (0 bytes);
      apply_rotary_emb per tensor: x1*cos and x2*sin (bf16 x fp32 -> fp32), their difference (fp32), the
      strided copy into out[..., 0::2] (fp32 -> bf16); the same for the odd half; cos/sin are read per product.
    v is a view of to_v's output: 0 bytes."""
    n = tokens * C
    half = n // 2
    table = tokens * (D // 2) * 4                       # one strided read of cos or sin
    prod = half * elem + table + half * 4                # x1 * cos
    diff = 2 * half * 4 + half * 4                       # t1 - t2
    copy = half * 4 + half * elem                        # out[..., 0::2] = t3
    rope = 2 * (2 * prod + diff + copy)                  # even and odd halves
    norm = n * elem + C * elem + n * elem
    return {"norm_q": norm, "norm_k": norm, "unflatten": 0, "rope_q": rope, "rope_k": rope}


def diffusers_sequence(qkv, wq, wk, cos_full, sin_full, heads, eps):
    """diffusers' unfused ops (transformer_wan.py, WanAttnProcessor + apply_rotary_emb), on the fused qkv."""
    C = qkv.shape[-1] // 3
    query, key, value = qkv.split(C, dim=-1)
    query = torch.nn.functional.rms_norm(query, (C,), wq, eps)
    key = torch.nn.functional.rms_norm(key, (C,), wk, eps)
    query, key, value = (t.unflatten(2, (heads, -1)) for t in (query, key, value))

    def apply_rotary_emb(hidden_states, freqs_cos, freqs_sin):
        x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
        cos = freqs_cos[..., 0::2]
        sin = freqs_sin[..., 1::2]
        out = torch.empty_like(hidden_states)
        out[..., 0::2] = x1 * cos - x2 * sin
        out[..., 1::2] = x1 * sin + x2 * cos
        return out.type_as(hidden_states)

    return apply_rotary_emb(query, cos_full, sin_full), apply_rotary_emb(key, cos_full, sin_full), value


def make_inputs(H: int, tokens: int, device: str, dtype) -> tuple:
    """qkv, wq, wk, cos, sin (ours) and cos_full, sin_full (diffusers' [1, S, 1, D] tables)."""
    C = H * HEAD_DIM
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, tokens, 3 * C, generator=g).to(device=device, dtype=dtype)
    wq = (torch.rand(C, generator=g) + 0.5).to(device=device, dtype=dtype)
    wk = (torch.rand(C, generator=g) + 0.5).to(device=device, dtype=dtype)
    ang = (torch.rand(tokens, HEAD_DIM // 2, generator=g) * 6.283).to(device)
    cos, sin = ang.cos(), ang.sin()
    return (qkv, wq, wk, cos, sin, cos.repeat_interleave(2, dim=-1)[None, :, None, :],
            sin.repeat_interleave(2, dim=-1)[None, :, None, :])


def make_case(model: str, res: str, tokens: int, device: str, dtype=torch.bfloat16) -> Case:
    H = MODELS[model]
    C = H * HEAD_DIM
    qkv, wq, wk, cos, sin, cos_full, sin_full = make_inputs(H, tokens, device, dtype)
    args = (qkv, wq, wk, cos, sin, H, 1e-6)
    ref_compiled = torch.compile(ref.qk_norm_rope)
    on_cpu = device == "cpu"
    providers = [
        Provider("wan-triton", lambda: wan_kernels.qk_norm_rope(*args, impl="triton"), gpu_only=True),
        # q quantized in the kernel for 8-bit attention (writes int8 q + fp32 scales instead of q: fewer bytes)
        Provider("wan-triton-int8q", lambda: wan_kernels.qk_norm_rope_int8(*args, impl="triton"), gpu_only=True),
        Provider("ref-eager", lambda: ref.qk_norm_rope(*args)),
        Provider("ref-compile", lambda: ref_compiled(*args)),
        Provider("diffusers", lambda: diffusers_sequence(qkv, wq, wk, cos_full, sin_full, H, 1e-6)),
    ]
    if on_cpu:
        providers.insert(1, Provider("wan-cpu", lambda: wan_kernels.qk_norm_rope(*args, impl="cpu")))
    return Case(f"{model} {res} S={tokens} C={C}", flops=0.0, bytes=fused_bytes(tokens, C, HEAD_DIM),
                providers=providers)


def make_backward_case(model: str, res: str, tokens: int, device: str, dtype=torch.bfloat16) -> Case:
    H = MODELS[model]
    C = H * HEAD_DIM
    qkv, wq, wk, cos, sin, cos_full, sin_full = make_inputs(H, tokens, device, dtype)
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(1, tokens, H, HEAD_DIM, generator=g).to(device=device, dtype=dtype) for _ in range(3)]
    args = (*grads, qkv, wq, wk, cos, sin, H, 1e-6)
    ref_compiled = torch.compile(ref.qk_norm_rope_backward)

    def diffusers_backward():
        leaves = [t.detach().requires_grad_() for t in (qkv, wq, wk)]
        return torch.autograd.grad(diffusers_sequence(*leaves, cos_full, sin_full, H, 1e-6), leaves, grads)

    def ref_vjp():
        with torch.no_grad():  # as autograd runs a backward
            return _autograd._vjp("qk_norm_rope", (qkv, wq, wk, cos, sin, H, 1e-6), grads,
                                  (True, True, True, False, False, False, False))[:3]

    providers = [
        Provider("wan-triton", lambda: wan_kernels.ops.qk_norm_rope_backward(*args, impl="triton"), gpu_only=True),
        Provider("ref-vjp", ref_vjp),
        Provider("ref-eager", lambda: ref.qk_norm_rope_backward(*args)),
        Provider("ref-compile", lambda: ref_compiled(*args)),
        Provider("diffusers", diffusers_backward),
    ]
    if device == "cpu":
        providers.insert(1, Provider("wan-cpu", lambda: wan_kernels.ops.qk_norm_rope_backward(*args, impl="cpu")))
    # one pass: read qkv and the three output gradients, write grad_qkv (the weight partials are negligible)
    return Case(f"backward {model} {res} S={tokens} C={C}", flops=0.0, bytes=tokens * 3 * C * 2 * 3,
                providers=providers)


def bytes_table() -> list[str]:
    lines = []
    for model, H in MODELS.items():
        for res, tokens in TOKENS.items():
            C = H * HEAD_DIM
            f = fused_bytes(tokens, C, HEAD_DIM)
            d = diffusers_bytes(tokens, C, HEAD_DIM)
            total = sum(d.values())
            ops = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in d.items())
            lines.append(f"bytes {model} {res}: fused {f / 1e9:.2f} GB vs diffusers {total / 1e9:.2f} GB ({ops}); "
                         f"ratio {f / total:.3f} (target <= 0.333)")
    return lines


def main() -> int:
    p = arg_parser(__doc__)
    p.add_argument("--cpu-token-divisor", type=int, default=16)
    p.add_argument("--backward", action="store_true", help="time wan::qk_norm_rope_backward")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    div = 1 if device == "cuda" else args.cpu_token_divisor
    shapes = [("1.3B", "480p")] if args.quick else [(m, r) for m in MODELS for r in TOKENS]
    make = make_backward_case if args.backward else make_case
    cases = [make(m, r, TOKENS[r] // div, device) for m, r in shapes]
    # backward gate: diffusers rounds the normalised rows to bf16 before its weight-gradient sum over the tokens,
    # so its grad_norm_*_weight (entries ~160 at 2,047 tokens) differ from ours by up to one bf16 ulp there (1.0)
    rows = run(cases, reference="ref-eager", baseline="ref-compile", **({"atol": 1.0} if args.backward else {}))
    notes = [] if args.backward else bytes_table()
    if div > 1:
        notes.append(f"CPU run: token counts divided by {div}; GB/s counts the fused path's bytes")
    report(rows, args, f"wan::qk_norm_rope{'_backward' if args.backward else ''}, bf16, batch 1, head_dim 128", notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
