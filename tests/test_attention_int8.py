"""wan::attention_int8 and wan::attention_int8_lse (8-bit, SageAttention2-class): the Triton kernel under the
interpreter vs its stage-by-stage reference (wan_kernels/ref/attention_int8.py), its accuracy vs fp64 attention and
vs the peer sageattention 1.0.6 on the same inputs (Wan-like generator and comfy-kitchen's two recipes,
wan_kernels/testing.py), and the op: opcheck, compile, routing per device class (simulated capabilities), pv per
arch, the inference-only error, the LSE vs fp64 logsumexp, error messages, `python -m wan_kernels`.

Kernel == reference: the quantized operands are bit-exact (same torch ops); the outputs agree to fp32 summation
order once the reference uses the interpreter's exp2 (numpy's float32 exp2, which differs from torch's in ~20% of
values by an ulp: an ulp can flip an e4m3 rounding of p, a 1/16 change of that weight, so the comparison passes
the exp2 in; everything else, e4m3 rounding included, is the reference's own code).
Accuracy rule (issue 23): worst-head NRMSE vs fp64 no worse than sageattention 1.0.6's (SageAttention 1 in Triton,
per-block int8 Q/K, fp16 P.V; image set: called twice and summed): pv="fp16" <= 1.05x, pv="fp8" <= 1.3x, and
cos >= 0.999; the cases that miss a bar are strict xfails with their measured cause (`MISSED`).
Interpreter cost: ~1-3 s per call at 2 heads x 300 queries x ~600 keys x hd 128.
"""

import importlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from _helpers import TRITON_FROM_SM80, assert_dispatch_per_device_class, bit_equal, opcheck
import wan_kernels
from wan_kernels import ref, samples
from wan_kernels._spec import SPECS
from wan_kernels.hardware import pv_acc16
from wan_kernels.testing import comfy_bias, comfy_channel, e4m3_sweep, stats_per_head, wan_like
from wan_kernels.triton import attention_int8 as T
from wan_kernels.triton import attention_int8_quant as Q
from wan_kernels.triton._launch import run

R = importlib.import_module("wan_kernels.ref.attention_int8")  # the module: the package attribute is the op


pytestmark = pytest.mark.usefixtures("triton_interpreter")


def np_exp2(x: torch.Tensor) -> torch.Tensor:
    """The interpreter's tl.math.exp2 (numpy, float32)."""
    return torch.from_numpy(np.exp2(x.numpy()))


def ref64(q, k, v, ki=None, vi=None, scale=None):
    return ref.attention_forward(*[None if t is None else t.double() for t in (q, k, v, ki, vi)], scale=scale)


# ---------------------------------------------------------------------------------------------
# e4m3 software encoder (the interpreted kernel's cast)

def test_e4m3_encoder_matches_torch_on_a_dense_sweep():
    x = e4m3_sweep()
    got = T.e4m3_encode(x)
    want = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert x.numel() > 1_200_000
    bad = (got.view(torch.uint8) != want.view(torch.uint8)).nonzero().reshape(-1)
    assert bad.numel() == 0, [(x[i].item(), got[i].item(), want[i].item()) for i in bad[:5]]
    nan = T.e4m3_encode(torch.tensor([float("nan")]))
    assert torch.isnan(nan.float()).all()


def test_e4m3_encoder_fixes_the_interpreters_cast():
    """The interpreter's .to(tl.float8e4nv) rounds 7.91 to 4.0 (REFERENCE §10): the encoder gives torch's 8.0."""
    x = torch.tensor([7.91, 127.47, -7.91, 0.3])
    assert T.e4m3_encode(x).float().tolist() == x.to(torch.float8_e4m3fn).float().tolist() == [8.0, 128.0, -8.0,
                                                                                              0.3125]


# ---------------------------------------------------------------------------------------------
# Kernel == reference, stage by stage

def test_token_means_agree_to_summation_order():
    """Stage 1's and 1b's statistics: the quantizer's chunked fp32 sums (of x, of x^2) vs torch's means, within the
    fp32 summation bound (S ulps of max|x| (max x^2): any order's error is below (S - 1) u sum|x| / S); everything
    after them is compared bit for bit with the reference fed the quantizer's (`kernel_means`)."""
    for S in (1, 77, 1500):
        x = wan_like(2, 5, S, 3, 64, seed=S, dtype=torch.bfloat16)[1]
        for got, want, top in ((Q.token_mean(x), R.token_mean(x), x.float().abs().max().item()),
                               (Q.token_sqmean(x), R.token_sqmean(x), x.float().square().max().item())):
            assert got.shape == want.shape == (2, 3, 64) and got.dtype == torch.float32
            assert (got - want).abs().max().item() <= S * 2.0 ** -24 * top


@pytest.fixture
def kernel_means(monkeypatch):
    """The reference with the quantizer's token means and mean squares (compared on their own above)."""
    monkeypatch.setattr(R, "token_mean", Q.token_mean)
    monkeypatch.setattr(R, "token_sqmean", Q.token_sqmean)


@pytest.mark.slow
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_quantized_operands_bit_exact(pv, kernel_means):
    q, k, v, ki, vi = wan_like(2, 77, 133, 2, 64, Si=41, seed=5, dtype=torch.bfloat16)
    v, vi = v * 1e5, vi * 1e5  # channels beyond fp16's range at pv="fp16" (power-of-two scales > 1)
    s = 0.3
    before = [t.clone() for t in (q, k, v, ki, vi)]
    qz = Q.quantize(q, k, v, ki, vi, s, pv, lse=True)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v, ki, vi)))
    # stage 1b from the reference's own maxima and the kernel's mean squares: q's and both sets' smoothed keys
    smoothed = [R.smooth_k(kt) for kt in (k, ki)]
    k_sq = [R.smoothed_sqmean(R.token_sqmean(kt), mean) for kt, (_, mean) in zip((k, ki), smoothed)]
    b, k_mul = R.channel_balance(q.float().abs().amax(1), R.token_sqmean(q),
                                 torch.maximum(*[R.smoothed_amax(t) for t, _ in smoothed]), torch.maximum(*k_sq))
    assert torch.equal(qz.balance, b) and b.shape == (2, 2, 64) and (b != 1).all()
    q8, qs = R.quantize_int8(q.float() * b[:, None], R.Q_GROUP)
    assert qz.q.dtype == torch.int8 and torch.equal(qz.q, q8)
    assert torch.equal(qz.q_scale, qs * (s * R.LOG2E)) and qz.q_scale.shape == (2, 2, 77)  # per row
    for (k8, ks, km, v8, vs, vm), (ksm, mean), vt in zip(qz.sets, smoothed, (v, vi)):
        rk8, rks = R.quantize_int8(ksm * k_mul[:, None], R.K_GROUP)
        rv8, rvs, rvm = R.quantize_v_fp8(vt) if pv == "fp8" else R.quantize_v_fp16(vt)
        assert torch.equal(k8, rk8) and torch.equal(ks, rks) and torch.equal(km, mean)
        assert v8.dtype == rv8.dtype and torch.equal(v8.view(torch.uint8 if pv == "fp8" else torch.int16),
                                                     rv8.view(torch.uint8 if pv == "fp8" else torch.int16))
        assert torch.equal(vs, rvs) and torch.equal(vm, rvm)
        assert pv == "fp8" or vs.max().item() > 1  # the fp16 scales did leave 1
    # the LSE's correction s q.mean(k) per set: fp32 dot products in another order
    shift = torch.stack([torch.einsum("bshd,bhd->bhs", q.float(), st[2]) * s for st in qz.sets])
    assert qz.shift.shape == (2, 2, 2, 77)
    bound = 64 * 2.0 ** -24 * s * (q.float().abs() @ torch.ones(64)).max().item() * max(st[2].abs().max().item()
                                                                                      for st in qz.sets)
    assert (qz.shift - shift).abs().max().item() <= bound


def test_int8_rounding_is_half_away_from_zero():
    x = torch.tensor([127.0, 63.5, -63.5, 0.5, -0.5, 0.49999997, 1.5, 2.5, -2.5]).reshape(1, 9, 1, 1)
    x8, scale = R.quantize_int8(x, 16)
    assert scale.item() == 1.0
    assert x8.reshape(-1).tolist() == [127, 64, -64, 1, -1, 0, 2, 3, -3]
    # the quantizer's kernel: the same values as one row (per-token scale = 127 / 127 = 1)
    qz = Q.quantize(x.reshape(1, 1, 1, 9), x.reshape(1, 1, 1, 9), x.reshape(1, 1, 1, 9), None, None, 1.0, "fp16")
    assert qz.q.reshape(-1).tolist() == [127, 64, -64, 1, -1, 0, 2, 3, -3]
    assert qz.q_scale.item() == pytest.approx(R.LOG2E)


@pytest.mark.slow
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_quantizer_launches_move_each_argument_once(pv, monkeypatch):
    """What the cost model counts (`launch_bytes`: each distinct tensor argument of a quantizer launch, whole) is
    what the kernels touch: the interpreter's loads and stores, recorded by byte address, cover exactly the
    arguments' bytes (nothing outside them, nothing of them left unread)."""
    import triton.runtime.interpreter as I

    q, k, v, ki, vi = wan_like(2, 70, 90, 2, 64, Si=33, seed=3, dtype=torch.bfloat16)
    touched: set[int] = set()

    def recorder(original, value_first: bool):
        def record(self, ptrs, *args):
            mask = args[1 if value_first else 0]
            size = np.dtype(I._get_np_dtype(ptrs.get_element_ty())).itemsize
            for a in ptrs.data[mask.data.astype(bool)].reshape(-1).tolist():
                touched.update(range(a, a + size))
            return original(self, ptrs, *args)
        return record

    for name in ("create_masked_load", "create_masked_store"):
        monkeypatch.setattr(I.InterpreterBuilder, name, recorder(getattr(I.InterpreterBuilder, name),
                                                                 name.endswith("store")))
    kernels = []

    def run_and_check(launch):
        touched.clear()
        run(launch)
        named = set()
        for t in {id(t): t for t in launch.args if isinstance(t, torch.Tensor)}.values():
            first = torch.zeros((), dtype=torch.int64)  # each element's byte offset (e4m3 V: strided, padded rows)
            for n, st in zip(t.shape, t.stride()):
                first = first[..., None] + torch.arange(n) * st * t.element_size()
            for a in (t.data_ptr() + first.unique()).tolist():
                named.update(range(a, a + t.element_size()))
        assert touched == named, launch.kernel.fn.__name__
        assert Q.launch_bytes(launch) == len(named)
        kernels.append(launch.kernel.fn.__name__)

    Q.quantize(q, k, v, ki, vi, 0.125, pv, lse=True, launch=run_and_check)
    assert sorted(set(kernels)) == ["_quantize_int8_kernel", "_quantize_v_kernel", "_token_stats_kernel"]


@pytest.mark.slow
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
@pytest.mark.parametrize("shape", [(1, 150, 333, 0, 2, 128), (1, 100, 200, 57, 2, 64), (1, 70, 128, 64, 2, 64)],
                         ids=["hd128", "hd64-i2v", "hd64-i2v-whole-tiles"])  # 64-key tiles: with and without tails
def test_kernel_equals_reference_emulation(pv, shape, kernel_means):
    B, Sq, Sk, Si, H, D = shape
    x = wan_like(B, Sq, Sk, H, D, Si=Si, seed=7, dtype=torch.float32)
    out, lse = T.attention_int8_sets(*x, pv=pv)
    want, want_lse = R.attention_int8_sets(*x, pv=pv, block_n=T.INTERPRETER_CONFIG.BLOCK_N, exp2=np_exp2)
    # fp32 summation order of the P.V dots and row sums (numpy vs torch): a few ulps of max|v|.
    bound = 64 * 2.0 ** -24 * max(t.abs().max().item() for t in x[2::2] if t is not None)
    assert (out - want).abs().max().item() <= bound
    assert lse.shape == want_lse.shape == (2 if Si else 1, B, H, Sq)
    assert (lse - want_lse).abs().max().item() <= 16 * 2.0 ** -24 * (1 + want_lse.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_fp16_accumulated_pv_kernel_equals_reference_emulation(pv, monkeypatch, kernel_means):
    """The P.V of sm_86 / sm_89 / sm_12x (`hardware.pv_acc16`: each key tile's dot accumulated in fp16, then added
    into the fp32 total), forced on the interpreter: equal to the reference's acc16 emulation to summation order,
    and within a few 1e-4 of the fp32-accumulated result (it rounds each tile's P.V to 11 bits)."""
    monkeypatch.setattr(T, "pv_acc16", lambda capability: True)
    x = wan_like(1, 100, 200, 2, 64, seed=7, dtype=torch.float32)  # one key set (with an image set: fp32, below)
    out, lse = T.attention_int8_sets(*x, pv=pv)
    want, want_lse = R.attention_int8_sets(*x, pv=pv, block_n=T.INTERPRETER_CONFIG.BLOCK_N, exp2=np_exp2,
                                          acc16=True)
    bound = 64 * 2.0 ** -24 * max(t.abs().max().item() for t in x[2::2] if t is not None)
    assert (out - want).abs().max().item() <= bound
    assert (lse - want_lse).abs().max().item() <= 16 * 2.0 ** -24 * (1 + want_lse.abs().max().item())
    f32 = R.attention_int8(*x, pv=pv, block_n=T.INTERPRETER_CONFIG.BLOCK_N, exp2=np_exp2)
    rel = ((out - f32).norm() / f32.norm()).item()
    assert 0 < rel < 5e-4, rel


@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_launches_accumulate_pv_in_fp16_on_geforce_class_archs_without_an_image_set(pv):
    """The launcher's PV_ACC16 per arch (`hardware.pv_acc16`) and kind: an I2V launch (two key sets) keeps fp32."""
    meta = [torch.empty(1, n, 4, 128, dtype=torch.bfloat16, device="meta") for n in (256, 512, 512, 257, 257)]
    for cap in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):
        if pv == "fp8" and cap < (8, 9):
            continue
        for img in (False, True):
            sets = meta[1:] if img else meta[1:3] + [None, None]
            launch = T.prepare(meta[0], *sets, None, pv, False, None, cap, lambda launch: None)[0]
            assert launch.kwargs["PV_ACC16"] == (pv_acc16(cap) and not img), (cap, img)


@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_fp16_accumulator_holds_the_largest_tile(pv):
    """The worst 64-key tile for the fp16 accumulator: every weight at P's maximum (448 as e4m3, 1 as fp16: equal
    scores) and every V code at the top of its range (+V_E4M3_MAX = 1.75 / +FP16_V_MAX = 512: a ring block's keys
    all at the top of the group's range, quantized with the group's statistics): 64 x 448 x 1.75 = 50,176 and
    64 x 512 = 32,768 < 65,504, so the output is that V exactly, finite, with the P.V accumulated in fp16 or fp32
    on the interpreter. (With SageAttention's 448-scaled e4m3 V or our former fp16 bound 32,768 it would be inf.)"""
    top = {"fp8": T.E4M3_MAX * R.V_E4M3_MAX, "fp16": R.FP16_V_MAX}[pv]  # one key's largest p v in the codes
    assert 64 * top < T.FP16_MAX < 128 * top
    B, S, H, D = 1, 64, 1, 64
    q8, qs = torch.zeros(B, 16, H, D, dtype=torch.int8), torch.ones(B, H, 16)
    k, v = torch.randn(B, S, H, D), torch.full((B, S, H, D), 3.0)
    code = R.V_E4M3_MAX if pv == "fp8" else R.FP16_V_MAX
    stats = (torch.zeros(B, H, D), torch.zeros(B, H, D), torch.full((B, H, D), 3.0 / code))
    kv = wan_kernels.quantize_kv_int8(k, v, pv=pv, k_mean=stats[0], v_mean=stats[1], v_scale=stats[2],
                                      impl="triton")
    assert (kv[3].float() == code).all()
    for acc16 in (True, False):
        T.pv_acc16, saved = (lambda capability: acc16), T.pv_acc16
        try:
            out = wan_kernels.attention_int8_quantized_lse(q8, qs, *kv, impl="triton")[0]
        finally:
            T.pv_acc16 = saved
        assert torch.equal(out, torch.full_like(out, 3.0)), acc16


def test_kernel_equals_reference_at_coarser_groups(monkeypatch):
    """The scale indexing (row // group, key // group) with groups that do not divide the lengths or the tiles."""
    monkeypatch.setattr(T, "Q_GROUP", 32)
    monkeypatch.setattr(T, "K_GROUP", 24)
    x = wan_like(1, 90, 150, 2, 64, Si=40, seed=11, dtype=torch.float32)
    out, lse = T.attention_int8_sets(*x, pv="fp16")
    want, want_lse = R.attention_int8_sets(*x, pv="fp16", q_group=32, k_group=24,
                                          block_n=T.INTERPRETER_CONFIG.BLOCK_N, exp2=np_exp2)
    assert (out - want).abs().max().item() <= 64 * 2.0 ** -24 * max(x[2].abs().max().item(), x[4].abs().max().item())
    assert (lse - want_lse).abs().max().item() <= 16 * 2.0 ** -24 * (1 + want_lse.abs().max().item())
    assert not torch.equal(out, R.attention_int8(*x, pv="fp16", exp2=np_exp2))  # the groups did change the result


@pytest.mark.slow
def test_per_token_scales_beat_sageattentions_blocks():
    """The granularity decision (kernel header): per-token Q and K scales vs SageAttention's 128-row / 64-key
    blocks, mean worst-head NRMSE over seeds (one seed's reading is noise: the header)."""
    errs = {(128, 64): [], (1, 1): []}
    for seed in range(3):
        x = wan_like(1, 130, 200, 2, 128, seed=seed)
        want = ref64(*x)[0]
        for (qg, kg), e in errs.items():
            e.append(stats_per_head(R.attention_int8(*x, pv="fp16", q_group=qg, k_group=kg), want)[0])
    assert (R.Q_GROUP, R.K_GROUP) == (T.Q_GROUP, T.K_GROUP) == (1, 1)
    assert sum(errs[1, 1]) < 0.8 * sum(errs[128, 64]), errs


# ---------------------------------------------------------------------------------------------
# Accuracy vs fp64 and vs sageattention 1.0.6

SAGE_SCRIPT = """
import sys, torch
from sageattention.attn_qk_int8_per_block import forward
from sageattention.quant_per_block import per_block_int8
cases = torch.load(sys.argv[1])
out = {}
for name, (q, k, v, ki, vi) in cases.items():
    o = 0
    for kt, vt in ((k, v),) if ki is None else ((k, v), (ki, vi)):
        q8, qs, k8, ks = per_block_int8(q, kt - kt.mean(1, keepdim=True), tensor_layout="NHD")
        o = o + forward(q8, k8, vt.half(), qs, ks, tensor_layout="NHD", output_dtype=q.dtype).float()
    out[name] = o
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def sage_outputs(tmp_path_factory):
    """sageattention 1.0.6's pipeline (sageattn minus its CUDA assert; k smoothed into a copy; image set: two calls
    summed) on every case, in a subprocess with TRITON_INTERPRET=1 set before triton is imported (its kernels call
    tl.max, a @jit function of triton.language that runs interpreted only when the interpreter was on at import)."""
    d = tmp_path_factory.mktemp("sage")
    torch.save({name: make() for name, make in CASES.items()}, d / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", SAGE_SCRIPT, str(d / "in.pt"), str(d / "out.pt")], env=env, check=True,
                   timeout=300)
    return torch.load(d / "out.pt")


# Key lengths are multiples of 64: sageattention 1.0.6's kernel does not mask the keys of a last partial tile (they
# load as 0 and get score 0, not -inf, so they add to the softmax denominator: at 333 keys its output shrinks by
# ~8.5%, NRMSE 0.086 with cos 0.9999 on comfy-bias vs 0.013 at 320 or 384). Comparing there would make the bar
# the peer's bug; our ragged tails are covered by the kernel == reference tests above. Query lengths stay ragged.
CASES = {
    "wan-hd128-self": lambda: wan_like(1, 300, 384, 2, 128, seed=0),
    "wan-hd128-i2v": lambda: wan_like(1, 150, 512, 2, 128, Si=256, seed=2),
    "wan-hd64-i2v": lambda: wan_like(1, 200, 512, 2, 64, Si=256, seed=1),
    "comfy-bias": lambda: comfy_bias(1, 300, 384, 2, 128, seed=3),
    "comfy-channel": lambda: comfy_channel(1, 300, 384, 2, 64, seed=4),
}
RATIO = {"fp16": 1.05, "fp8": 1.3}
# Bars missed, cause understood (issue 23; the bars stand, strict: a pass is reported as a failure to revisit).
_E4M3_V = ("e4m3 P and V on zero-mean Gaussian V: 3 mantissa bits cost ~3.6-4.2% NRMSE whatever the Q/K scales, vs "
           "sageattention's fp16 P.V at 0.013 / 0.021 (our fp16 P.V: 0.009 / 0.013)")
MISSED = {("comfy-bias", "fp8"): _E4M3_V, ("comfy-channel", "fp8"): _E4M3_V}


def _accuracy_cases():
    return [pytest.param(case, pv, id=f"{case}-{pv}", marks=[pytest.mark.xfail(strict=True, reason=MISSED[case, pv])]
                         if (case, pv) in MISSED else []) for case in CASES for pv in ("fp16", "fp8")]


@pytest.mark.subprocess
@pytest.mark.parametrize("case,pv", _accuracy_cases())
def test_accuracy_vs_fp64_and_sageattention(case, pv, sage_outputs):
    x = CASES[case]()
    clones = [None if t is None else t.clone() for t in x]
    want = ref64(*x)[0]
    err_sage, cos_sage = stats_per_head(sage_outputs[case], want)
    out = T.attention_int8(*x, pv=pv)
    err, cos = stats_per_head(out, want)
    report = f"{case} NRMSE/cos sage {err_sage:.4f}/{cos_sage:.6f} {pv} {err:.4f}/{cos:.6f}"
    print(report)
    assert out.dtype == x[0].dtype and out.shape == want.shape
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(x, clones))
    assert err <= RATIO[pv] * err_sage, report
    assert cos >= 0.999, report


def test_channel_balance_factors():
    """Stage 1b's b = (ra rr)^(1/4) per (batch, head, channel), ra = k_amax / q_amax, rr = sqrt(k_sqmean / q_sqmean);
    sqrt(ra) where the mean squares are unusable (0: K's cancelled to 0 under a large mean), 1 where a channel is
    empty in q or k or a ratio is not finite; 1 / b is its fp32 reciprocal (what multiplies k)."""
    qa = torch.tensor([4.0, 1.0, 16.0, 1.0, 0.0, 2.0, 1e-30, float("nan"), 1.0])
    qs = torch.tensor([1.0, 1.0, 16.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    ka = torch.tensor([1.0, 9.0, 1.0, 4.0, 3.0, 0.0, 1e30, 1.0, float("inf")])
    ks = torch.tensor([1.0, 81.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    b, inv = R.channel_balance(qa, qs, ka, ks)
    assert torch.equal(b, torch.tensor([2 ** -0.5, 3.0, 2 ** -1.5, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]))  # fp32 roots
    assert torch.equal(inv, torch.reciprocal(b))
    assert R.smoothed_sqmean(torch.tensor([5.0, 4.0]), torch.tensor([2.0, 2.0000002])).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("pv", ["fp16", "fp8"])
def test_channel_balance_is_what_meets_the_bar_on_wan_like_gains(pv):
    """The draw that missed cos 0.999 before stage 1b (scores spanning ~89 nats, sink keys |k| ~124, log-normal
    channel gains on q and k): with q b and k / b the per-token INT8 grids of both operands fit their channels, and
    the worst-head NRMSE falls to 0.4-0.6x (reference, seen 0.053 -> 0.022 fp16, 0.057 -> 0.033 fp8), the cosine
    past 0.999; without it, it stays below. Scores are the same in exact arithmetic, so the LSE (of scores up to
    ~93 here) moves only by quantization error, which falls too (worst row vs fp64, seen 1.47 -> 0.87)."""
    x = CASES["wan-hd128-self"]()
    want, want_lse = ref64(*x)
    (on, lse_on), (off, lse_off) = (R.attention_int8_sets(*x, pv=pv, balance=bal) for bal in (True, False))
    (err_on, cos_on), (err_off, cos_off) = stats_per_head(on, want), stats_per_head(off, want)
    assert err_on < 0.65 * err_off and cos_on >= 0.999 > cos_off, (err_on, err_off, cos_on, cos_off)
    lse_err_on, lse_err_off = ((lse[0].double() - want_lse).abs().max().item() for lse in (lse_on, lse_off))
    assert lse_err_on < 0.7 * lse_err_off, (lse_err_on, lse_err_off)  # seen 0.60x


def test_lse_is_that_of_the_unsmoothed_scores():
    x = comfy_bias(1, 64, 200, 2, 64, seed=9, dtype=torch.float32)
    x = x[:3] + (x[1][:, :40] * 0.5, x[2][:, :40])                          # keys with a shared bias of RMS 40 / 20
    _, lse = T.attention_int8_sets(*x)
    want = ref64(*x)[1]
    assert (lse.double() - want).abs().max().item() < 0.05  # int8 score error (seen 0.016); the shift is ~100
    smoothed = lse - torch.stack([torch.einsum("bshd,bhd->bhs", x[0], kt.mean(1)) / 8 for kt in (x[1], x[3])])
    assert (smoothed.double() - want).abs().max().item() > 1


# ---------------------------------------------------------------------------------------------
# Contract

def test_inputs_untouched_noncontiguous_bf16_and_large_v():
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(1, 70, 3, 2, 64, generator=g).to(torch.bfloat16)
    q, k, v = qkv.unbind(2)                                                  # packed views: strides of 3 * H * D
    v = v * 1000
    before = [t.clone() for t in (q, k, v)]
    out = T.attention_int8(q, k, v, pv="fp16")
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before))
    want = ref64(q, k, v)[0]
    assert stats_per_head(out, want)[0] < 0.05


def test_fp16_v_beyond_fp16_range_is_scaled():
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 40, 1, 64, generator=g), torch.randn(1, 50, 1, 64, generator=g)
    v = torch.randn(1, 50, 1, 64, generator=g) * 1e6
    out = T.attention_int8(q, k, v, pv="fp16")
    assert torch.isfinite(out).all() and stats_per_head(out, ref64(q, k, v)[0])[0] < 0.05


def test_empty_and_bad_pv():
    q = torch.zeros(1, 0, 2, 64)
    k = torch.randn(1, 5, 2, 64)
    assert T.attention_int8(q, k, k).shape == (1, 0, 2, 64)
    with pytest.raises(ValueError, match="pv must be 'fp8', 'fp16' or 'auto', got 'int4'"):
        T.attention_int8(k, k, k, pv="int4")
    with pytest.raises(ValueError, match="pv must be"):
        R.attention_int8(k, k, k, pv="e5m2")


def test_default_pv_by_arch():
    assert [T.default_pv(c) for c in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0), None)] == \
        ["fp16", "fp16", "fp8", "fp8", "fp8", "fp8", "fp8"]
    assert math.isclose(T.LOG2_448, math.log2(448))
    # P.V tiles accumulate in fp16 where fp32 accumulation runs at half rate (GeForce Ampere / Ada / Blackwell)
    caps = ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0), (12, 1), None)
    assert [pv_acc16(c) for c in caps] == [False, True, True, False, False, False, True, True, False]


# ---------------------------------------------------------------------------------------------
# The op: wan::attention_int8 / wan::attention_int8_lse

OPS = ("attention_int8", "attention_int8_lse", "attention_int8_q8", "attention_int8_q8_lse", "quantize_kv_int8",
       "attention_int8_quantized_lse", "kv_stats")
# Worst-head NRMSE vs fp64 that the op's default (pv="auto" = fp8 on CPU) reaches on Wan-like hd128 inputs with an
# image set (CASES["wan-hd128-i2v"], measured 0.026), with ~2x headroom: the bound the model test multiplies out.
OP_NRMSE = 0.05


def _args(op, pv="auto"):
    """The op's samples with this pv (attention_int8_quantized_lse: its K/V set quantized for it, out_dtype None;
    kv_stats has no pv)."""
    if op == "kv_stats":
        return samples.op_inputs()[op]
    if op == "attention_int8_quantized_lse":
        q8, qs, k, v, scale, _ = samples.op_inputs()["attention_int8_q8_lse"]
        return (q8, qs, *R.quantize_kv_int8(k, v, pv), scale, None)
    return samples.op_inputs()[op][:-1] + (pv,)


@pytest.mark.slow
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_both_pv_modes(op, pv):
    opcheck(op, _args(op, pv))


def test_compile_fullgraph_wrappers():
    q, k, v, ki, vi, s, _ = samples.op_inputs()["attention_int8"]

    def f(q, k, v, ki, vi):
        o = wan_kernels.attention_int8(q, k, v, ki, vi, s, pv="fp16")
        o2, lse = wan_kernels.attention_int8_lse(q, k, v, s)
        return o * 2, o2 + 1, lse

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(q, k, v, ki, vi)
    for a, b in zip(got, f(q, k, v, ki, vi)):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["auto", "ref", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_backends_agree_on_the_samples(op, impl):
    """The samples' scores are exact powers of two (wan_kernels/ops/attention_int8.py `int8_samples`): every backend
    gives the reference's result to fp32 summation order, whichever exp2 it uses (the self-check's premise)."""
    for pv in ("fp8", "fp16"):
        args = _args(op, pv)
        got, want = wan_kernels.resolve(op, impl, "cpu")(*args), SPECS[op].ref(*args)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert a.dtype == b.dtype and (a.float() - b.float()).abs().max().item() <= 1e-6


@pytest.mark.parametrize("op", OPS)
def test_route_table_and_dispatcher_per_device_class(op, capability, monkeypatch):
    assert_dispatch_per_device_class(op, _args(op), TRITON_FROM_SM80, capability, monkeypatch)


def _meta(*shape):
    return torch.empty(shape, dtype=torch.bfloat16, device="meta")


@pytest.mark.parametrize("cap, pv", [((8, 0), "fp16"), ((8, 6), "fp16"), ((8, 9), "fp8"), ((9, 0), "fp8"),
                                     ((10, 0), "fp8"), ((12, 0), "fp8"), (None, "fp8")])
def test_auto_pv_per_arch_and_fp8_refused_below_sm89(cap, pv):
    q, k = _meta(1, 300, 2, 128), _meta(1, 512, 2, 128)
    launch = T.prepare(q, k, k, None, None, None, "auto", False, None, cap, lambda quantizer_launch: None)[0]
    assert launch.kwargs["PV_FP8"] == (pv == "fp8")
    if pv == "fp16" and cap is not None:
        with pytest.raises(ValueError, match=r"pv='fp8' needs fp8 tensor cores \(sm_89 or later\)"):
            T.prepare(q, k, k, None, None, None, "fp8", False, None, cap)
    assert wan_kernels.hardware.default_pv(cap) == pv
    # the reference resolves "auto" from the tensors' device the same way (impl="ref" emulates the device)
    assert R.resolve_pv("auto", torch.device("cpu")) == "fp8"


def test_cpu_auto_is_the_fp8_emulation():
    args = _args("attention_int8")
    assert torch.equal(wan_kernels.attention_int8(*args[:6]), R.attention_int8(*args[:6], pv="fp8"))
    x = wan_like(1, 40, 64, 2, 64, seed=1, dtype=torch.float32)
    assert not torch.equal(wan_kernels.attention_int8(*x), wan_kernels.attention_int8(*x, pv="fp16"))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["auto", "ref", "triton"])
@pytest.mark.parametrize("op, training", [("attention_int8", "attention"), ("attention_int8_lse", "attention_lse")])
def test_requires_grad_names_the_bf16_op(op, training, impl):
    args = list(_args(op))
    args[1] = args[1].clone().requires_grad_()
    call = getattr(wan_kernels, op)
    n = 6 if op == "attention_int8" else 4
    with pytest.raises(RuntimeError) as e:
        call(*args[:n], impl=impl)
    msg = str(e.value)
    assert "\n" not in msg and f"wan::{op} is inference only" in msg and "k requires grad" in msg
    assert f"wan_kernels.{training} (wan::{training}, bf16)" in msg
    with pytest.raises(RuntimeError, match="inference only"):
        getattr(torch.ops.wan, op)(*args)
    with torch.no_grad():  # inference on tensors that require grad is fine
        call(*args[:n], impl=impl)


def test_lse_vs_fp64_logsumexp_with_smoothing_corrected():
    """The op's LSE is that of the real scores: keys with a shared bias (comfy's RMS 40) shift it by ~s q.mean(k);
    the op adds that back. Bound: the int8 score error (seen 0.016 with fp8, 0.009 with fp16)."""
    q, k, v, _, _ = comfy_bias(1, 64, 200, 2, 64, seed=9, dtype=torch.float32)
    want = ref.attention_lse(q.double(), k.double(), v.double())
    for impl in ("auto", "triton"):
        for pv in ("fp8", "fp16"):
            out, lse = wan_kernels.attention_int8_lse(q, k, v, pv=pv, impl=impl)
            assert lse.shape == (1, 2, 64) and lse.dtype == torch.float32
            assert (lse.double() - want[1]).abs().max().item() < 0.05
            assert (lse.double() - want[1]).abs().max().item() < 0.05
            assert stats_per_head(out, want[0])[0] < OP_NRMSE
    smoothed = lse - torch.einsum("bshd,bhd->bhs", q, k.mean(1)) / 8
    assert (smoothed.double() - want[1]).abs().max().item() > 1


def test_lse_merges_two_key_blocks():
    """Ring attention's merge (wan::attention_lse's formula) of two int8 key blocks: each block has its own smoothing
    and V scales, the merged output is within the op's error of fp64 over all keys, and its LSE within the score
    error of the full logsumexp."""
    q, k, v, _, _ = comfy_bias(1, 90, 256, 2, 128, seed=3, dtype=torch.float32)
    oa, la = wan_kernels.attention_int8_lse(q, k[:, :128], v[:, :128])
    ob, lb = wan_kernels.attention_int8_lse(q, k[:, 128:], v[:, 128:])
    w = torch.sigmoid(lb - la).transpose(1, 2)[..., None]                              # [B, Sq, H, 1]
    out = oa - w * (oa - ob)
    lse = la - torch.nn.functional.logsigmoid(la - lb)
    want_o, want_l = ref.attention_lse(q.double(), k.double(), v.double())
    whole = stats_per_head(wan_kernels.attention_int8(q, k, v), want_o)[0]
    assert stats_per_head(out, want_o)[0] < max(OP_NRMSE, 1.5 * whole)
    assert (lse.double() - want_l).abs().max().item() < 0.05  # as the one-block LSE test


# ---------------------------------------------------------------------------------------------
# wan::attention_int8_q8_lse: a ring's blocks on the fused q (quantized once, never again per block)

@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_q8_lse_kernel_equals_reference_emulation(pv, kernel_means):
    """The kernel's output is attention_int8_q8's (the same launch, bit for bit); its LSE, whose smoothing correction
    it adds in the kernel from the int8 tile (sum_d q8 mean_k times the folded scale), equals the reference's
    (s (q8 q_scale) . mean_k, einsum) to fp32 rounding of the terms: a few ulps of the largest of |lse| and the
    correction (~100 here: the keys share a bias of RMS 40)."""
    q, k, v, _, _ = comfy_bias(1, 90, 150, 2, 64, seed=9, dtype=torch.float32)
    q8, qs = R.quantize_int8(q, 1)
    out, lse = T.attention_int8_q8_lse(q8, qs, k, v, pv=pv)
    want, want_lse = R.attention_int8_q8_lse(q8, qs, k, v, pv=pv, block_n=T.INTERPRETER_CONFIG.BLOCK_N, exp2=np_exp2)
    assert torch.equal(out, T.attention_int8_q8(q8, qs, k, v, pv=pv))
    assert (out - want).abs().max().item() <= 64 * 2.0 ** -24 * v.abs().max().item()
    shift = R.lse_shift(q8.float() * qs.transpose(1, 2)[..., None], R.token_mean(k), 0.125)
    assert lse.shape == want_lse.shape == (1, 2, 90) and shift.abs().max().item() > 50
    assert (lse - want_lse).abs().max().item() <= 16 * 2.0 ** -24 * (want_lse.abs().max() + shift.abs().max()).item()


def test_q8_lse_is_that_of_the_dequantized_queries_scores():
    """The LSE is logsumexp_n(s q^ . k_n) of q^ = q8 * q_scale (the scores the output was computed from), not of the
    float q that no longer exists: with keys sharing a bias of RMS 40 the two differ by s (q - q^) . mean(k) (~0.7
    here), and a ring merges its blocks exactly only with the former. Bound: the int8 K score error (as the
    float-q LSE test's)."""
    q, k, v, _, _ = comfy_bias(1, 64, 200, 2, 64, seed=9, dtype=torch.float32)
    q8, qs = R.quantize_int8(q, 1)
    q_hat = q8.double() * qs.double().transpose(1, 2)[..., None]
    want = ref.attention_lse(q_hat, k.double(), v.double())
    real = ref.attention_lse(q.double(), k.double(), v.double())[1]
    assert (want[1] - real).abs().max().item() > 0.3
    for impl in ("auto", "triton"):
        for pv in ("fp8", "fp16"):
            out, lse = wan_kernels.attention_int8_q8_lse(q8, qs, k, v, pv=pv, impl=impl)
            assert lse.shape == (1, 2, 64) and lse.dtype == torch.float32 and out.dtype == k.dtype
            assert (lse.double() - want[1]).abs().max().item() < 0.05
            assert stats_per_head(out, want[0])[0] < OP_NRMSE


def test_q8_lse_merges_key_blocks_as_one_call():
    """Ring attention's merge of three key blocks on one quantized q: each block smoothed and quantized on its own,
    the merged output within the op's error of fp64 over all keys (of q^), the merged LSE within the score error
    of the full logsumexp of q^."""
    q, k, v, _, _ = comfy_bias(1, 90, 300, 2, 128, seed=3, dtype=torch.float32)
    q8, qs = R.quantize_int8(q, 1)
    out = lse = None
    for lo, hi in ((0, 128), (128, 256), (256, 300)):
        o, l = wan_kernels.attention_int8_q8_lse(q8, qs, k[:, lo:hi], v[:, lo:hi])
        if out is None:
            out, lse = o, l
        else:
            w = torch.sigmoid(l - lse).transpose(1, 2)[..., None]                        # [B, Sq, H, 1]
            out, lse = out - w * (out - o), lse - torch.nn.functional.logsigmoid(lse - l)
    q_hat = q8.double() * qs.double().transpose(1, 2)[..., None]
    want_o, want_l = ref.attention_lse(q_hat, k.double(), v.double())
    whole = stats_per_head(wan_kernels.attention_int8_q8(q8, qs, k, v), want_o)[0]
    assert stats_per_head(out, want_o)[0] < max(OP_NRMSE, 1.5 * whole)
    assert (lse.double() - want_l).abs().max().item() < 0.05


def _ring(q, k, v, R, lse_op):
    """Ring attention's merge over R key blocks, one `lse_op(k_block, v_block)` -> (out, lse) per block."""
    out = lse = None
    for kb, vb in zip(k.chunk(R, dim=1), v.chunk(R, dim=1)):
        o, l = lse_op(kb, vb)
        if out is None:
            out, lse = o.float(), l
        else:
            w = torch.sigmoid(l - lse).transpose(1, 2)[..., None]
            out, lse = out - w * (out - o.float()), lse - torch.nn.functional.logsigmoid(lse - l)
    return out


@pytest.mark.parametrize("case", ["comfy-bias", "wan"])
def test_a_ring_on_the_quantized_q_is_as_accurate_as_on_the_float_q(case):
    """A ring on q8 (attention_int8_q8_lse: q quantized once, each block's LSE corrected with q^ = q8 * q_scale)
    vs on the float q (attention_int8_lse without the channel balance: q quantized per block to the same codes,
    its LSE corrected with q):
    the blocks' outputs are the same, only the merge weights differ, by s (q - q^) . (mean_b - mean_b') between
    blocks. Worst-head NRMSE vs fp64 of the two rings within 1e-4 (seen <= 5e-5, on 0.009 / 0.04), R = 2, 4, 8;
    the float q's ring with the channel balance (each block's own) no worse."""
    q, k, v = (comfy_bias(1, 256, 1024, 2, 128, seed=3) if case == "comfy-bias" else
               wan_like(1, 256, 1024, 2, 128, seed=0))[:3]
    q, k, v = q.float(), k.float(), v.float()
    q8, qs = R.quantize_int8(q, 1)
    want = ref.attention_forward(q.double(), k.double(), v.double())[0]
    for n in (2, 4, 8):
        on_q8 = stats_per_head(_ring(q, k, v, n, lambda kb, vb: R.attention_int8_q8_lse(q8, qs, kb, vb, pv="fp16")),
                               want)[0]
        on_q = stats_per_head(_ring(q, k, v, n, lambda kb, vb: R.attention_int8_lse(q, kb, vb, pv="fp16",
                                                                                    balance=False)), want)[0]
        assert abs(on_q8 - on_q) < 1e-4, (n, on_q8, on_q)
        balanced = stats_per_head(_ring(q, k, v, n, lambda kb, vb: R.attention_int8_lse(q, kb, vb, pv="fp16")),
                                  want)[0]
        # with the balance (per block: each block's keys set their b): on Wan-like channel gains about half the
        # error (seen 0.39-0.55x); on comfy-bias's i.i.d. channels b ~ 1 only re-rounds the codes (seen 0.988-0.995x)
        assert balanced <= (0.7 if case == "wan" else 1.01) * on_q, (n, balanced, on_q)


def test_q8_lse_errors_quote_the_op():
    q8, qs, k, v, scale, _ = samples.op_inputs()["attention_int8_q8_lse"]
    with pytest.raises(ValueError, match=r"attention_int8_q8_lse: q8 must be int8 \[B, Sq, H, D\], got torch.float32"):
        wan_kernels.attention_int8_q8_lse(q8.float(), qs, k, v)
    with pytest.raises(ValueError, match=r"attention_int8_q8_lse: q_scale must be float32 \[B, H, Sq\]"):
        wan_kernels.attention_int8_q8_lse(q8, qs.transpose(1, 2), k, v)
    with pytest.raises(ValueError, match="attention_int8_q8_lse: pv must be one of"):
        wan_kernels.attention_int8_q8_lse(q8, qs, k, v, pv="int4")
    with pytest.raises(ValueError, match="attention_int8_q8_lse \\(triton\\): one key set"):
        T.prepare((q8, qs), k, v, k, v, None, "fp16", True, None, None)


# ---------------------------------------------------------------------------------------------
# wan::quantize_kv_int8 + wan::attention_int8_quantized_lse: a ring block quantized once by its owner

@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_quantize_kv_kernel_equals_reference_stages(pv, kernel_means):
    """The Triton quantizer's K/V set is the reference's stages 1-3 bit for bit (given its token means), on inputs
    that are never written; bf16 V beyond fp16's range gets power-of-two scales at pv="fp16"."""
    _, k, v, _, _ = wan_like(2, 5, 133, 2, 64, seed=5, dtype=torch.bfloat16)
    v = v * 1e5
    before = (k.clone(), v.clone())
    got, want = T.quantize_kv_int8(k, v, pv), R.quantize_kv_int8(k, v, pv)
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])
    assert all(bit_equal(a, b) for a, b in zip(got, want))
    assert got[3].dtype == (torch.float8_e4m3fn if pv == "fp8" else torch.float16)
    assert pv == "fp8" or got[4].max().item() > 1


@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_quantized_lse_is_q8_lse_on_the_quantized_block(pv, kernel_means):
    """attention_int8_quantized_lse on quantize_kv_int8's set is attention_int8_q8_lse, bit for bit (the same kernel
    launch after the same quantizer), in k's dtype; in float32 (the ring's default) it is the reference's emulation
    on the same operands to fp32 summation order (bounds of the q8_lse test above). fp16 inputs: the interpreter's
    fp32 -> bf16 cast truncates (REFERENCE §1's bf16 gap), its fp16 cast rounds to nearest as the GPU's."""
    q, k, v, _, _ = comfy_bias(1, 90, 150, 2, 64, seed=9, dtype=torch.float16)
    q8, qs = R.quantize_int8(q, 1)
    kv = T.quantize_kv_int8(k, v, pv)
    out, lse = T.attention_int8_quantized_lse(q8, qs, *kv, None, k.dtype)
    want_out, want_lse = T.attention_int8_q8_lse(q8, qs, k, v, pv=pv)
    assert bit_equal(out, want_out) and bit_equal(lse, want_lse)
    out32, lse32 = T.attention_int8_quantized_lse(q8, qs, *kv)
    ref_out, ref_lse = R.attention_int8_quantized_lse(q8, qs, *kv, block_n=T.INTERPRETER_CONFIG.BLOCK_N,
                                                      exp2=np_exp2)
    assert out32.dtype == ref_out.dtype == torch.float32 and bit_equal(lse32, lse)
    assert (out32 - ref_out).abs().max().item() <= 64 * 2.0 ** -24 * v.float().abs().max().item()
    assert (lse32 - ref_lse).abs().max().item() <= 16 * 2.0 ** -24 * (ref_lse.abs().max() + 100).item()
    assert torch.equal(out32.to(k.dtype), out)  # the bf16 output is the fp32 one rounded once


@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_a_key_set_quantized_in_parts_equals_the_whole(pv):
    """What Ulysses does per rank: kv_stats of each part of a key set, summed / maxed / mined (the all-reduces),
    kv_stats_finish, quantize_kv_int8 of each part with those statistics: concatenated, the codes and scales are
    those of quantizing the whole set with the same statistics, bit for bit, on both backends (and the Triton
    quantizer's equal the reference's); the statistics are the whole set's own to fp32 summation order."""
    _, k, v, _, _ = wan_like(2, 5, 333, 2, 64, seed=3, dtype=torch.bfloat16)
    v = v * (1e5 if pv == "fp16" else 1)          # bf16 V beyond fp16's range: power-of-two scales
    parts = [(0, 100), (100, 256), (256, 333)]
    for impl in ("ref", "triton"):
        stats = [wan_kernels.kv_stats(k[:, a:b], v[:, a:b], impl=impl) for a, b in parts]
        k_sum, v_sum = sum(st[0] for st in stats), sum(st[1] for st in stats)
        v_max = torch.stack([st[2] for st in stats]).amax(0)
        v_min = torch.stack([st[3] for st in stats]).amin(0)
        k_mean, v_mean, v_scale = R.kv_stats_finish(k_sum, v_sum, v_max, v_min, 333, pv)
        own = R.kv_stats_finish(*R.kv_stats(k, v), 333, pv)
        for a, b in zip((k_mean, v_mean, v_scale), own):
            assert (a - b).abs().max().item() <= 333 * 2.0 ** -24 * (1 + b.abs().max().item())
        kw = dict(pv=pv, k_mean=k_mean, v_mean=v_mean, v_scale=v_scale, impl=impl)
        pieces = [wan_kernels.quantize_kv_int8(k[:, a:b], v[:, a:b], **kw) for a, b in parts]
        whole = wan_kernels.quantize_kv_int8(k, v, **kw)
        assert bit_equal(torch.cat([p[0] for p in pieces], 1), whole[0])
        assert bit_equal(torch.cat([p[3] for p in pieces], 1), whole[3])
        assert bit_equal(torch.cat([p[1] for p in pieces], -1), whole[1])
        assert all(bit_equal(p[i], whole[i]) for p in pieces for i in (2, 4, 5))
        assert all(not any(t is x for x in (k_mean, v_mean, v_scale)) for t in whole)  # outputs alias no input
        if impl == "triton":
            assert all(bit_equal(a, b) for a, b in zip(whole, R.quantize_kv_int8(k, v, pv, k_mean, v_mean, v_scale)))
        assert pv == "fp8" or (whole[5] == 0).all() and whole[4].max().item() > 1


def test_kv_stats_kernel_equals_reference_to_summation_order():
    _, k, v, _, _ = wan_like(2, 5, 1500, 3, 64, seed=2, dtype=torch.bfloat16)
    got, want = T.kv_stats(k, v), R.kv_stats(k, v)
    assert all(a.dtype == torch.float32 and a.shape == b.shape == (2, 3, 64) for a, b in zip(got, want))
    for a, b, x in zip(got, want, (k, v, v, v)):
        bound = 1500 * 2.0 ** -24 * x.float().abs().max().item() if a is got[0] or a is got[1] else 0.0
        assert (a - b).abs().max().item() <= bound


def test_quantized_lse_reads_a_ring_buffers_views_in_place():
    """A ring block of fewer valid keys than its buffer's rows: k8 / v8 [B, Sb, H, D] sliced to the valid keys and
    k_scale [B, H, Sb] sliced likewise (row stride Sb, not Sk) give the result of the same operands made contiguous,
    on both backends; so do scales and statistics in other layouts (copied by the launcher)."""
    q, k, v, _, _ = wan_like(2, 40, 96, 2, 64, seed=4, dtype=torch.float32)
    q8, qs = R.quantize_int8(q, 1)
    valid = 70
    k8, ks, km, v8, vs, vm = R.quantize_kv_int8(k[:, :valid], v[:, :valid], "fp16")
    buf_k8, buf_v8 = torch.zeros(2, 96, 2, 64, dtype=torch.int8), torch.zeros(2, 96, 2, 64, dtype=torch.float16)
    buf_ks = torch.full((2, 2, 96), float("nan"))
    buf_k8[:, :valid], buf_v8[:, :valid], buf_ks[..., :valid] = k8, v8, ks
    views = (buf_k8[:, :valid], buf_ks[..., :valid], km, buf_v8[:, :valid], vs, vm)
    assert views[1].stride() == (192, 96, 1) and not views[1].is_contiguous()
    strided = (k8, ks.transpose(1, 2).contiguous().transpose(1, 2), km.transpose(1, 2).contiguous().transpose(1, 2),
               v8, vs.transpose(1, 2).contiguous().transpose(1, 2), vm)
    for impl in ("ref", "triton"):
        want = wan_kernels.attention_int8_quantized_lse(q8, qs, k8, ks, km, v8, vs, vm, impl=impl)
        for operands in (views, strided):
            got = wan_kernels.attention_int8_quantized_lse(q8, qs, *operands, impl=impl)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), impl


@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_quantized_lse_reads_the_ulysses_exchange_in_place(pv):
    """Ulysses' 8-bit exchange (wan_model/core/parallel.py): q8, k8, v8 packed in 16-byte aligned pieces of rows of
    W bytes, then read through views of the received buffer (token stride h W, head stride W bytes; the scales'
    token stride h W / 4 floats). The op on those views equals the op on the same operands made contiguous, on
    both backends (the all-to-all between moves whole rows: the views' layout is the received one)."""
    from wan_model.core.parallel import pack_qkv8, qkv8_row, unpack_qkv8

    q, k, v, _, _ = wan_like(2, 70, 70, 2, 64, seed=6, dtype=torch.float32)
    q8, qs = R.quantize_int8(q, 1)
    k8, ks, km, v8, vs, vm = R.quantize_kv_int8(k, v, pv)
    x = pack_qkv8(q8, qs, k8, ks, v8)
    assert x.shape[-1] == qkv8_row(64, 64, pv)[1] == (208 if pv == "fp8" else 272)  # 3 x 64 (+ 64) + 8, to 16
    g8, gs, gk8, gks, gv8 = unpack_qkv8(x, 64, 64, pv)
    assert all(bit_equal(a, b) for a, b in ((g8, q8), (gs, qs), (gk8, k8), (gks, ks), (gv8, v8)))
    W = x.shape[-1]
    assert gk8.stride() == (70 * 2 * W, 2 * W, W, 1) and gks.stride(-1) == 2 * W // 4
    for impl in ("ref", "triton"):
        want = wan_kernels.attention_int8_quantized_lse(q8, qs, k8, ks, km, v8, vs, vm, impl=impl)
        got = wan_kernels.attention_int8_quantized_lse(g8, gs, gk8, gks, km, gv8, vs, vm, impl=impl)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), impl


@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_quantized_v_has_the_kernels_layout_on_every_backend(pv):
    """wan::quantize_kv_int8's v8 is laid out as `hardware.empty_v8` by every backend and by its fake (opcheck holds
    the fake to the reference): e4m3 token-contiguous with (batch, head, channel) rows of 16 bytes (70 tokens ->
    80), the K-major operand of the fp8 MMAs, read by the kernel in place; fp16 contiguous. A V in the other layout
    gives the same bits on both backends (the launcher copies it into the kernel's: `_v_operand`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, _, _ = wan_like(2, 40, 70, 2, 64, seed=1, dtype=torch.float32)
    want = (2 * 64 * 80, 1, 64 * 80, 80) if pv == "fp8" else (70 * 2 * 64, 2 * 64, 64, 1)
    kv = {impl: wan_kernels.quantize_kv_int8(k, v, pv=pv, impl=impl) for impl in ("ref", "triton")}
    with FakeTensorMode() as mode:
        fake = torch.ops.wan.quantize_kv_int8(mode.from_tensor(k), mode.from_tensor(v), pv)[3]
    assert kv["ref"][3].stride() == kv["triton"][3].stride() == fake.stride() == want
    assert T._v_operand(kv["triton"][3]) is kv["triton"][3]
    v8 = kv["ref"][3]
    other = v8.contiguous() if pv == "fp8" else v8.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert other.stride() != want and bit_equal(other, kv["ref"][3])
    q8, qs = R.quantize_int8(q, 1)
    for impl in ("ref", "triton"):
        a = wan_kernels.attention_int8_quantized_lse(q8, qs, *kv["ref"], impl=impl)
        b = wan_kernels.attention_int8_quantized_lse(q8, qs, *kv["ref"][:3], other, *kv["ref"][4:], impl=impl)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), impl


def test_quantized_lse_errors_quote_the_operand():
    args = list(_args("attention_int8_quantized_lse"))
    cases = [(2, args[2].float(), r"k8 must be int8 \[B, Sk, H, D\] = \[2, 8, 2, 64\], got torch.float32"),
             (3, args[3][..., :5], r"k_scale must be float32 \[B, H, Sk\] = \[2, 2, 8\], got torch.float32 shape "
                                   r"\(2, 2, 5\)"),
             (5, args[5].float(), r"v8 must be float8_e4m3fn/float16 \[B, Sk, H, Dv\] = \[2, 8, 2, 64\], got "
                                  r"torch.float32"),
             (4, args[4][:, :1], r"k_mean must be float32 \[B, H, D\] = \[2, 2, 64\]"),
             (9, torch.int32, "out_dtype must be float32/float16/bfloat16, got torch.int32")]
    for i, bad, pattern in cases:
        x = list(args)
        x[i] = bad
        with pytest.raises(ValueError, match=pattern):
            wan_kernels.attention_int8_quantized_lse(*x[:9], out_dtype=x[9])
        with pytest.raises(ValueError, match=pattern):
            torch.ops.wan.attention_int8_quantized_lse(*x)
    k, v, _ = samples.op_inputs()["quantize_kv_int8"]
    with pytest.raises(ValueError, match=r"quantize_kv_int8: v must be \[B, S, H, Dv\] = \[2, 8, 2, Dv\] matching k "
                                         r"\(2, 8, 2, 64\), got shape \(2, 7, 2, 64\)"):
        wan_kernels.quantize_kv_int8(k, v[:, :7])
    with pytest.raises(ValueError, match="quantize_kv_int8: pv must be one of"):
        wan_kernels.quantize_kv_int8(k, v, pv="int4")
    mean = torch.zeros(2, 2, 64)
    with pytest.raises(ValueError, match=r"quantize_kv_int8: k_mean, v_mean and v_scale go together, each float32 "
                                         r"\[B, H, D or Dv\] on k's device: v_mean must be \[2, 2, 64\], got None"):
        wan_kernels.quantize_kv_int8(k, v, k_mean=mean)
    with pytest.raises(ValueError, match=r"v_scale must be \[2, 2, 64\], got torch.float64 shape \(2, 2, 64\)"):
        torch.ops.wan.quantize_kv_int8(k, v, "auto", mean, mean, mean.double())
    with pytest.raises(ValueError, match=r"kv_stats: v must be \[B, S, H, Dv\]"):
        wan_kernels.kv_stats(k, v[:, :7])
    with pytest.raises(ValueError, match=r"pv='fp8' needs fp8 tensor cores \(sm_89 or later\), got sm_80"):
        T._resolve_pv("fp8", (8, 0))


def test_op_accuracy_bound_of_the_model_test():
    """OP_NRMSE (the model test's per-head bound) holds for the op's default on Wan-like hd128 I2V inputs."""
    x = CASES["wan-hd128-i2v"]()
    err, cos = stats_per_head(wan_kernels.attention_int8(*x), ref64(*x)[0])
    assert err < OP_NRMSE and cos > 0.999


@pytest.mark.parametrize("op, args, pattern", [
    ("attention_int8", lambda a: (a[0], a[1][:, :, :1], *a[2:]),
     r"attention_int8: k must be \[2, Sk, 2, 64\] for q of shape \(2, 17, 2, 64\), got shape \(2, 8, 1, 64\)"),
    ("attention_int8", lambda a: (*(t.double() for t in a[:5]), *a[5:]), r"attention_int8: q must be "
     r"float16/bfloat16/float32, got torch.float64 \(shape \(2, 17, 2, 64\)\)"),
    ("attention_int8", lambda a: (*a[:6], "int4"), r"attention_int8: pv must be one of \('auto', 'fp8', 'fp16'\), "
     r"got 'int4'"),
    ("attention_int8", lambda a: (*a[:3], a[3], None, *a[5:]), "k_img and v_img must be given together"),
    ("attention_int8_lse", lambda a: (a[0], a[1], a[2][:, :5], *a[3:]), r"attention_int8_lse: v must be \[2, 8, 2, "
     r"Dv\] matching k \(2, 8, 2, 64\) and v, got shape \(2, 5, 2, 64\)"),
])
def test_bad_inputs_quote_shapes_and_dtypes(op, args, pattern):
    bad = args(samples.op_inputs()[op])
    with pytest.raises(ValueError, match=pattern):
        getattr(wan_kernels, op)(*bad[:-1], pv=bad[-1])
    with pytest.raises(ValueError, match=pattern):
        getattr(torch.ops.wan, op)(*bad)


def test_python_m_wan_kernels_lists_the_ops(capsys):
    from wan_kernels.__main__ import main

    assert main(["--no-check"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.strip().startswith(("attention_int8", "quantize_kv_int8", "kv_stats"))}
    assert rows == {op: list(TRITON_FROM_SM80.values()) for op in OPS}  # its self-check: tests/test_library.py
