"""The model's 8-bit self-attention balance (wan_model/core/balance.py): a dense step measures q and k, the switch
back folds b into the norm weights of the fused q's kernel (q b, k / b per RoPE pair: the same scores), so the
fused path gets the 8-bit op's stage 1b without a pass over q."""

from __future__ import annotations

import importlib

import pytest
import torch

from wan_kernels.ref.qk_norm_rope import qk_norm_rope
from wan_model.core import model as M
from wan_model.core import balance as BAL
from wan_model.core.balance import balance_of, finish, folded_norms, measure, merge
from wan_model.core.config import WanConfig
from wan_model.core.model import WanTransformer
from wan_model.core.sampling import sample
from wan_model.io import checkpoint as ckpt

R = importlib.import_module("wan_kernels.ref.attention_int8")  # the module: the package attribute is the op


def _qk(seed=0, B=2, S=33, H=3, D=8, dtype=torch.bfloat16):
    """q, k [B, S, H, D] with uneven channels and a key bias shared by the tokens (Wan's k)."""
    g = torch.Generator().manual_seed(seed)
    gains = torch.exp(torch.randn(2, H, D, generator=g))
    q = torch.randn(B, S, H, D, generator=g) * gains[0]
    k = torch.randn(B, S, H, D, generator=g) * gains[1] + 5 * torch.randn(H, D, generator=g)
    return q.to(dtype), k.to(dtype)


@pytest.mark.parametrize("chunk_bytes", [64 << 20, 4 * 2 * 3 * 8 * 5])  # one run of tokens; runs of 5 (33 = 6 x 5 + 3)
def test_measure_is_the_statistics_over_batch_and_tokens(chunk_bytes):
    q, k = _qk()
    got = finish(measure(q, k, chunk_bytes=chunk_bytes)).unflatten(-1, (3, 8))
    q64, k64 = q.double(), k.double()
    ks = k64 - k64.mean(1, keepdim=True)  # smoothed per (batch, head, channel), as the quantizer smooths
    want = torch.stack((q64.abs().amax((0, 1)), q64.square().mean((0, 1)), ks.abs().amax((0, 1)),
                        ks.square().mean((0, 1))))
    assert got.dtype == torch.float32 and got.shape == (4, 3, 8)
    # maxima: q's are bf16 values (exact); k's centred one carries its fp32 mean's rounding (a sum of 33 terms of
    # up to ~10: <= 33 * 2^-24 relative, ~2e-5 absolute at most, against maxima of ~10). Mean squares: fp32 sums and
    # E[k^2] - mean^2 (the bias's square, ~25, cancels: 2^-24 * 25 * 33 terms ~ 5e-5 absolute, k's variance ~1)
    torch.testing.assert_close(got[[0, 2]].double(), want[[0, 2]], rtol=0, atol=2e-6 * want[2].max().item())
    torch.testing.assert_close(got[[1, 3]].double(), want[[1, 3]], rtol=1e-5, atol=1e-4)


def _added_up(parts):
    """Partial statistics of parts of a sequence added up as `merge` adds them over ranks (max / sum per row)."""
    out = parts[0].clone()
    for p in parts[1:]:
        out[BAL.MAXED] = torch.maximum(out[BAL.MAXED], p[BAL.MAXED])
        out[BAL.SUMMED] += p[BAL.SUMMED]
    return out


def test_parts_with_padding_rows_add_up_to_the_whole():
    """Sequence parallelism's view: 33 tokens on 4 ranks of 9 rows, the last with 6 tokens and 3 padding rows
    (zero q and k, as zero RoPE rows make them; `real_rows` finds them in the tables): the parts' statistics added
    up are the whole sequence's, up to the fp32 order of the sums. Counted as tokens, the padding's zero keys
    pull k's mean toward 0 and widen its centred range: with a key bias of ~5 here, up to 20x k's max |k - mean|
    (and 187x its mean square) in some channel."""
    q, k = _qk()
    angle = torch.randn(33, 4)
    cos, sin = torch.cos(angle), torch.sin(angle)
    pad = lambda t: torch.cat([t, torch.zeros_like(t[:, :3])], dim=1)  # noqa: E731
    qp, kp = pad(q), pad(k)
    tables = [torch.cat([t, torch.zeros(3, 4)]) for t in (cos, sin)]
    tokens = BAL.real_rows(*tables)
    assert tokens.tolist() == [True] * 33 + [False] * 3
    assert BAL.real_rows(torch.ones(1, 4), torch.zeros(1, 4)).tolist() == [True]  # angle 0 is a token
    parts = [measure(qp[:, i:i + 9], kp[:, i:i + 9], tokens[i:i + 9]) for i in range(0, 36, 9)]
    whole = finish(measure(q, k))
    got = finish(_added_up(parts))
    # maxima exact but for k's fp32 mean (see test_measure_...); mean squares: fp32 sums in another order
    torch.testing.assert_close(got[[0, 2]], whole[[0, 2]], rtol=0, atol=2e-6 * whole[2].max().item())
    torch.testing.assert_close(got[[1, 3]], whole[[1, 3]], rtol=1e-5, atol=1e-4)
    counted = finish(measure(qp, kp))  # the padding taken for tokens
    assert (counted[2] / whole[2]).max() > 10


def test_balance_is_the_ops_balance_of_each_rope_pair():
    g = torch.Generator().manual_seed(1)
    stats = torch.exp(torch.randn(4, 16, generator=g))
    b = balance_of(stats)
    pairs = stats.unflatten(-1, (8, 2))
    amax, sq = pairs.amax(-1), pairs.mean(-1)
    want, _ = R.channel_balance(amax[0], sq[1], amax[2], sq[3])
    torch.testing.assert_close(b, want.repeat_interleave(2), rtol=0, atol=0)
    assert torch.equal(b[0::2], b[1::2]) and not torch.allclose(b, torch.ones(16))
    assert torch.equal(balance_of(torch.zeros(2, 4, 16)), torch.ones(2, 16))  # nothing measured: b = 1


def test_folded_weights_leave_every_score_alone():
    """RMSNorm(x) (w_q b) then RoPE = (q b) when b is equal on each rotated pair (2i, 2i + 1): q b . k / b = q . k.
    A b differing inside a pair does not commute with the rotation and changes the scores (the check can fail)."""
    g = torch.Generator().manual_seed(2)
    B, S, H, D = 1, 20, 2, 16
    qkv = torch.randn(B, S, 3 * H * D, generator=g, dtype=torch.float64)
    w_q, w_k = torch.exp(torch.randn(2, H * D, generator=g, dtype=torch.float64))
    angle = torch.randn(S, D // 2, generator=g, dtype=torch.float64) * 3
    cos, sin = torch.cos(angle), torch.sin(angle)
    b = balance_of(torch.exp(torch.randn(4, H * D, generator=g))).double()
    scores = lambda q, k: torch.einsum("bshd,bthd->bhst", q, k)  # noqa: E731
    q, k, v = qk_norm_rope(qkv, w_q, w_k, cos, sin, H, 1e-6)
    qb, kb, vb = qk_norm_rope(qkv, *folded_norms(w_q, w_k, b), cos, sin, H, 1e-6)
    bh = b.view(H, D)
    # folded in fp32: each weight within 2^-24 relative, so each rotated value within 2^-24 of its pair's size (the
    # rotation's difference can cancel, hence an absolute bound at the tensor's scale)
    torch.testing.assert_close(qb, q * bh, rtol=0, atol=1e-7 * (q * bh).abs().max().item())
    torch.testing.assert_close(kb, k / bh, rtol=0, atol=1e-7 * (k / bh).abs().max().item())
    torch.testing.assert_close(scores(qb, kb), scores(q, k), rtol=1e-6, atol=1e-6)
    assert torch.equal(vb, v)
    unpaired = b.clone()
    unpaired[0::2] *= 2
    qu, ku, _ = qk_norm_rope(qkv, *folded_norms(w_q, w_k, unpaired), cos, sin, H, 1e-6)
    assert (scores(qu, ku) - scores(q, k)).abs().max() > 0.1


def _model(seed=0, preset="tiny-t2v", heavy=True):
    """A tiny model whose self-attention has log-normal RMSNorm gains and a key bias (the uneven channels the
    balance is for)."""
    torch.manual_seed(seed)
    cfg = WanConfig.from_preset(preset)
    model = WanTransformer(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for blk in model.blocks if heavy else ():
            a, C = blk.attn1, cfg.dim
            a.norm_q.copy_(torch.exp(torch.randn(C, generator=g)))
            a.norm_k.copy_(torch.exp(torch.randn(C, generator=g)))
            a.to_qkv.bias[C:2 * C] += 3 * torch.randn(C, generator=g)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, 3, 8, 8, generator=g)
    return model, x, torch.randn(1, 16, cfg.text_dim, generator=g)


def test_fused_projection_takes_the_balance():
    """The int8 projection with a balance b: its k is the bf16-form k / b and its q codes are those of q b."""
    model, x, _ = _model()
    a, cfg = model.blocks[1].attn1, model.config
    H, S = cfg.num_attention_heads, 24
    n = torch.randn(2, S, cfg.dim)
    angle = torch.randn(S, cfg.attention_head_dim // 2)
    ops = M.bind_ops("ref", "cpu", int8=True)
    with torch.no_grad():
        q, k, v = M.qkv_fused_dense(a, n, torch.cos(angle), torch.sin(angle), H, cfg.eps, ops)
        a.balance = balance_of(finish(measure(q, k)))
        (q8, qs), kb, vb = M.qkv_fused_dense_int8(a, n, torch.cos(angle), torch.sin(angle), H, cfg.eps, ops)
    bh = a.balance.view(H, -1)
    want8, want_scale = R.quantize_int8(q * bh, 1)
    # q b, k / b in fp32 against the folded kernel's: equal but for the last bit of the products (codes at a
    # rounding boundary can flip: at most one step, rarely)
    assert (q8.int() - want8.int()).abs().max() <= 1 and (q8 != want8).float().mean() < 0.01
    torch.testing.assert_close(qs, want_scale, rtol=1e-6, atol=0)
    # fp32 model: the folded weights and the kernel's fp32 arithmetic, a few ulps of the pair's size (see above)
    torch.testing.assert_close(kb, k / bh, rtol=0, atol=1e-6 * (k / bh).abs().max().item())
    assert torch.equal(vb, v)


def test_dense_step_measures_and_the_switch_folds(monkeypatch):
    model, x, text = _model()
    seen = []
    real = M.measure
    monkeypatch.setattr(M, "measure", lambda *args: seen.append(args) or real(*args))
    model.set_attention("int8")  # layer 0 dense: only layer 1 measures
    assert [b.attn1.project_qkv for b in model.blocks] == [M.qkv_fused_dense, M.qkv_fused_dense_int8]
    model.dense_attention(True)
    assert model.blocks[1].attn1.project_qkv is M.MEASURING_PROJECTIONS[M.qkv_fused_dense]
    assert model.blocks[0].attn1.project_qkv is M.qkv_fused_dense
    with torch.no_grad():
        model(x, torch.tensor([500.0]), text)
    assert len(seen) == 1 and bool(seen[0][2].all())  # one process: every row is a token
    a = model.blocks[1].attn1
    stats = a.measured
    torch.testing.assert_close(stats, real(*seen[0]), rtol=0, atol=0)
    assert model.blocks[0].attn1.measured is None  # dense layer: never measured
    assert torch.equal(a.balance, torch.ones_like(a.balance))  # folded at the switch, not before
    model.dense_attention(True)  # dense again: nothing folded
    assert torch.equal(a.balance, torch.ones_like(a.balance))
    model.dense_attention(False)
    torch.testing.assert_close(a.balance, balance_of(finish(stats)), rtol=0, atol=0)
    assert not torch.allclose(a.balance, torch.ones_like(a.balance)) and a.measured is None
    assert torch.equal(model.blocks[0].attn1.balance, torch.ones_like(a.balance))
    b = a.balance.clone()
    model.dense_attention(False)  # int8 -> int8: nothing refolded
    model.dense_attention(True).dense_attention(False)  # dense -> int8 without a forward: nothing measured, b kept
    assert torch.equal(a.balance, b)
    assert not any("balance" in key or "measured" in key for key in model.state_dict())
    model.set_attention("int8")  # a new configuration measures afresh
    assert torch.equal(a.balance, torch.ones_like(b)) and a.measured is None


def test_quantized_projection_measures_and_folds_too():
    """A quantized QKV (FP8: `qkv_module_then_norm_rope`, its GEMM then the norm + RoPE op) measures in its dense
    step and its int8 form takes the folded weights, whichever came first."""
    from wan_model.model import WanModel

    torch.manual_seed(0)
    model = WanModel(WanConfig.from_preset("tiny-t2v")).quantize("fp8").set_attention("int8", dense_layers=())
    _, x, text = _model()
    model.dense_attention(True)
    assert all(b.attn1.project_qkv is M.MEASURING_PROJECTIONS[M.qkv_module_then_norm_rope] for b in model.blocks)
    with torch.no_grad():
        model(x, torch.tensor([500.0]), text)
    model.dense_attention(False)
    for blk in model.blocks:
        assert blk.attn1.project_qkv is M.qkv_module_then_norm_rope_int8
        assert not torch.allclose(blk.attn1.balance, torch.ones_like(blk.attn1.balance))


def test_loaded_model_gets_real_balance_buffers(tmp_path):
    """The loader builds on "meta" and assigns the checkpoint's tensors: the buffers no checkpoint holds come back
    real (else .to() of the loaded model fails on a meta tensor)."""
    model, *_ = _model(heavy=False)
    ckpt.save_model(model, tmp_path / "m")
    loaded = ckpt.load_model(tmp_path / "m", dtype=torch.float32, impl="ref")
    for blk in loaded.blocks:
        assert blk.attn1.balance.device.type == "cpu" and torch.equal(blk.attn1.balance, torch.ones(model.config.dim))
    loaded.to(torch.float64)


@pytest.mark.parametrize("seed", [0, 1])
def test_balance_cuts_the_int8_error_of_a_sampled_latent(seed, monkeypatch):
    """6 Euler steps with the default dense steps (first, last: the first measures, steps 1-4 run the balanced
    fused q) against bf16: the int8 latent's error is well under the unbalanced fused q's (seeds 0-3: 0.51-0.72x;
    bar 0.85x)."""
    model, x, text = _model(seed)
    err = {}
    with torch.no_grad():
        want = sample(model, x, text, None, num_steps=6, progress=False).latents
        model.set_attention("int8", dense_layers=())
        got = sample(model, x, text, None, num_steps=6, progress=False).latents
        err["balanced"] = ((got - want).norm() / want.norm()).item()
        model.set_attention("int8", dense_layers=())
        monkeypatch.setattr(M, "balance_of", lambda s: torch.ones(s.shape[:-2] + s.shape[-1:]))
        got = sample(model, x, text, None, num_steps=6, progress=False).latents
        err["unbalanced"] = ((got - want).norm() / want.norm()).item()
    assert 0 < err["balanced"] < 0.85 * err["unbalanced"], err


def _steps_seen(experts):
    """[(expert, dense, balanced)] per step of `experts`' forwards: dense (its layer-1 self-attention's projection is
    the measuring bf16 form), balanced (its b is not 1 while it runs the int8 form)."""
    seen = []

    def hook(name, a):
        def pre(module, args, kwargs):
            p = a.project_qkv
            if p in M.MEASURING_PROJECTIONS.values() or p in M.INT8_PROJECTIONS.values():
                seen.append((name, p in M.MEASURING_PROJECTIONS.values(),
                             not torch.equal(a.balance, torch.ones_like(a.balance))))
        return pre

    for name, m in experts.items():
        m.register_forward_pre_hook(hook(name, m.blocks[1].attn1), with_kwargs=True)
    return seen


def test_each_expert_measures_in_its_own_first_step():
    """Wan2.2's two experts: by default the low-noise expert's first step is dense too, so its 8-bit steps run
    balanced in the first generation (with the first and last steps only, the low-noise expert measured nothing
    until its last step: every one of its 8-bit steps ran b = 1). 6 steps, boundary 875: high 0-2, low 3-5."""
    from wan_model.core.model import WanExperts

    high, x, text = _model(0)
    low, *_ = _model(1)
    pair = WanExperts(high, low, 0.875)
    for m in (high, low):
        m.set_attention("int8", dense_layers=(0,))
    seen = _steps_seen({"high": high, "low": low})
    with torch.no_grad():
        result = sample(pair, x, text, None, num_steps=6, progress=False)
    assert result.experts == ["high"] * 3 + ["low"] * 3
    assert seen == [("high", True, False), ("high", False, True), ("high", False, True),
                    ("low", True, False), ("low", False, True), ("low", True, True)]
    seen.clear()
    for m in (high, low):
        m.set_attention("int8", dense_layers=(0,))
    with torch.no_grad():
        sample(pair, x, text, None, num_steps=6, progress=False, dense_steps=(0, -1))  # the steps given, as given
    assert [s[1] for s in seen] == [True, False, False, False, False, True]
    assert seen[4] == ("low", False, False)  # the low-noise expert unmeasured: its 8-bit steps unbalanced
    single, *_ = _model(2)
    single.set_attention("int8")
    seen = _steps_seen({"single": single})
    with torch.no_grad():
        sample(single, x, text, None, num_steps=4, progress=False)
    assert [s[1] for s in seen] == [True, False, False, True]  # one expert: the first and the last step


def test_merge_is_identity_on_one_process(tmp_path):
    """`merge` over a group of one (gloo): the statistics as they are (the multi-rank merge: tests/test_parallel.py)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        stats = measure(*_qk())
        assert torch.equal(merge(stats), stats)
    finally:
        dist.destroy_process_group()
