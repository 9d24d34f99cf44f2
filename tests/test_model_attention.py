"""The model's attention per role (wan_model/core/model.py `set_attention`): bf16 by default, int8 opt-in with
dense layers and dense steps (the sampler), no branch in forward; on CPU the int8 op runs its reference."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

import wan_kernels
from wan_kernels.triton import attention_int8 as T
from wan_model.cli import _parser
from wan_model.core import model as M
from wan_model.core.config import WanConfig
from wan_model.core.model import WanTransformer
from wan_model.core.parallel import local_attention
from wan_model.core.sampling import sample
from wan_model.model import WanModel

R = importlib.import_module("wan_kernels.ref.attention_int8")  # the module: the package attribute is the op

# tests/test_attention_int8.py OP_NRMSE: the worst-head NRMSE bound of one wan::attention_int8 call (pv auto) vs
# fp64 on Wan-like hd128 inputs. Each int8 call perturbs its branch by at most that, relative; a branch enters the
# residual stream through to_out and a gate and is at most the stream's size, so to first order the output's
# relative error is at most the sum over the int8 calls. Seen: 0.003 (T2V) / 0.004 (I2V) for 4 calls vs 0.2.
OP_NRMSE = 0.05


def _model(preset="tiny-t2v", seed=0):
    torch.manual_seed(seed)
    cfg = WanConfig.from_preset(preset)
    g = torch.Generator().manual_seed(seed)
    inputs = (torch.randn(1, cfg.in_channels, 3, 8, 8, generator=g), torch.tensor([500.0]),
              torch.randn(1, 16, cfg.text_dim, generator=g),
              torch.randn(1, 257, cfg.image_dim, generator=g) if cfg.has_image else None)
    return WanTransformer(cfg), inputs


def _spy(model) -> list[str]:
    """Record which attention op each call runs ("bf16" = wan::attention, "int8" = wan::attention_int8, or its
    form from a quantized q, wan::attention_int8_q8: the single-process self-attention's)."""
    calls = []

    def wrap(name, fn):
        return lambda *a: calls.append(name) or fn(*a)

    bound = lambda op: getattr(model._ops, op) or wan_kernels.routing.bind(op, "auto", "cpu")  # noqa: E731
    model._ops = dataclasses.replace(model._ops, attention=wrap("bf16", model._ops.attention),
                                     attention_int8=wrap("int8", bound("attention_int8")),
                                     attention_int8_q8=wrap("int8", bound("attention_int8_q8")))
    return calls


def test_default_is_bf16_and_int8_is_opt_in():
    model, _ = _model()
    assert model.attention == M.AttentionConfig() and model.attention.kind == "bf16"
    assert all(b.attn1.attend is local_attention and b.attn2.attend is M.cross_attention for b in model.blocks)
    assert model._ops.attention_int8 is None
    assert WanModel(WanConfig.from_preset("tiny-t2v")).attention.kind == "bf16"
    assert _parser().parse_args(["run", "--checkpoint", "."]).attention == "bf16"
    assert _parser().parse_args(["demo"]).attention == "int8"  # the demo compares int8 with bf16, the model is bf16


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-i2v"])
def test_int8_model_runs_close_to_bf16(preset):
    model, x = _model(preset)
    with torch.no_grad():
        want = model(*x)
        model.set_attention("int8", roles=M.ROLES, dense_layers=())
        calls = _spy(model)
        got = model(*x)
        model.set_attention("bf16")
        again = model(*x)
    assert calls == ["int8"] * 4  # 2 layers x (self, text + image in one call)
    err = ((got - want).norm() / want.norm()).item()
    assert 0 < err < OP_NRMSE * len(calls), err
    assert torch.equal(again, want)  # back to bf16: bit-identical


def test_vace_blocks_run_as_their_layer():
    """A VACE model's VACE blocks get the attention of the layer whose hint they make (tiny-vace: hints after layers
    0 and 2; layer 0 dense keeps VACE block 0 dense, VACE block 1 runs int8 with the fused q), measure in a dense
    step and fold their balance at the switch, as the blocks do; the output within the int8 bound of bf16 (diffusers'
    drop-in runs VACE blocks' self-attention 8-bit too)."""
    from wan_model.testing import make_control, make_inputs, random_model

    model = random_model(WanConfig.from_preset("tiny-vace"), seed=3).set_impl("auto")
    x, t, text, _ = make_inputs(model.config, batch=1)
    args = (x, t, text)
    kw = dict(control_hidden_states=make_control(model.config, x))
    with torch.no_grad():
        want = model(*args, **kw)
        model.set_attention("int8")
        calls = _spy(model)
        got = model(*args, **kw)
    vace = model.vace_blocks
    assert [b.attn1.project_qkv for b in vace] == [M.qkv_fused_dense, M.qkv_fused_dense_int8]
    assert vace[1].attn1.attend.func is M.self_attention_int8 and vace[0].attn1.attend is local_attention
    # int8: the self-attention of blocks 1-3 and VACE block 1; bf16: block 0's, VACE block 0's, every cross-attention
    assert calls.count("int8") == 3 + 1 and calls.count("bf16") == 1 + 1 + 4 + 2
    err = ((got - want).norm() / want.norm()).item()
    assert 0 < err < OP_NRMSE * 4, err
    with torch.no_grad():
        model.dense_attention(True)(*args, **kw)
    assert vace[1].attn1.project_qkv is M.MEASURING_PROJECTIONS[M.qkv_fused_dense] and vace[0].attn1.measured is None
    model.dense_attention(False)
    ones = torch.ones_like(vace[0].attn1.balance)
    assert torch.equal(vace[0].attn1.balance, ones) and not torch.allclose(vace[1].attn1.balance, ones)
    assert vace[1].attn1.project_qkv is M.qkv_fused_dense_int8


@pytest.mark.slow
def test_dense_layers_and_steps_use_the_bf16_op():
    model, (x, _, text, _) = _model()
    model.set_attention("int8")
    assert model.attention.roles == ("self",)  # default: self-attention only (M.INT8_ROLES: cross pays q's quantization)
    model.set_attention("int8", roles=M.ROLES)  # layer 0 dense, first and last steps dense
    calls = _spy(model)
    sample(model, x, text, None, num_steps=3, progress=False)
    per_step = [calls[i:i + 4] for i in range(0, len(calls), 4)]
    assert per_step == [["bf16"] * 4, ["bf16", "bf16", "int8", "int8"], ["bf16"] * 4]
    assert model.blocks[1].attn1.attend.func is M.self_attention_int8  # the configured set is bound again
    assert model.blocks[1].attn1.project_qkv is M.qkv_fused_dense_int8 and model.blocks[0].attn1.project_qkv is M.qkv_fused_dense
    calls.clear()
    sample(model, x, text, None, num_steps=3, progress=False, dense_steps=())
    assert calls == ["bf16", "bf16", "int8", "int8"] * 3
    model.set_attention("int8", roles=M.ROLES, dense_layers=(-1,))
    calls = _spy(model)
    with torch.no_grad():
        model.dense_attention(False)(x, torch.tensor([500.0]), text)
    assert calls == ["int8", "int8", "bf16", "bf16"]


@pytest.mark.slow
def test_roles_text_int8_image_bf16_sums_two_calls():
    model, x = _model("tiny-i2v")
    with torch.no_grad():
        want = model(*x)
        model.set_attention("int8", roles=("text",), dense_layers=(), pv="fp16")
        calls = _spy(model)
        got = model(*x)
    assert calls == ["bf16", "int8", "bf16"] * 2  # self bf16; text int8 + image bf16, summed
    assert model.attention.pv == "fp16" and model.attention.roles == ("text",)
    assert 0 < ((got - want).norm() / want.norm()).item() < OP_NRMSE * 2


def test_set_attention_errors_and_backends():
    model, _ = _model()
    with pytest.raises(ValueError, match="attention must be one of \\('bf16', 'int8'\\), got 'int4'"):
        model.set_attention("int4")
    with pytest.raises(ValueError, match="roles must be among"):
        model.set_attention("int8", roles=("cross",))
    with pytest.raises(ValueError, match=r"dense_layers must be layer indices in \[-2, 2\), got \[5\]"):
        model.set_attention("int8", dense_layers=(5,))
    with pytest.raises(ValueError, match="pv must be"):
        model.set_attention("int8", pv="e5m2")
    model.set_impl("cpu")
    with pytest.raises(wan_kernels.BackendUnavailableError, match="attention_int8 with impl='cpu'"):
        model.set_attention("int8")
    model.set_impl("ref").set_attention("int8")
    model.to("cpu")  # a move re-binds the ops, the int8 op included
    assert model._ops.attention_int8 is not None


def test_inference_only_inside_the_model():
    model, x = _model()
    model.set_attention("int8", dense_layers=())
    # the first 8-bit op of a block: the projection that quantizes q for the 8-bit self-attention
    with pytest.raises(RuntimeError, match="qk_norm_rope_int8 is inference only.*wan_kernels.qk_norm_rope "):
        model(*x)
    model.set_attention("int8", roles=("text",), dense_layers=())
    with pytest.raises(RuntimeError, match="attention_int8 is inference only.*wan_kernels.attention "):
        model(*x)


@pytest.mark.slow
def test_cli_demo_prints_int8_vs_bf16(capsys):
    from wan_model.cli import main

    assert main(["demo", "--steps", "3", "--frames", "1", "--height", "4", "--width", "4",
                 "--text-len", "8", "--no-progress"]) == 0  # the comparison is the demo's default
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("int8 attention ("))
    assert "roles self, dense layers [0] and each expert's first and the last step, pv auto" in line
    rel = float(line.split("relative RMS ")[1].split()[0])
    assert 0 < rel < OP_NRMSE * 2  # one int8 step of three, layer 1 only (2 calls)
    # the bf16 run is still the one compared with diffusers (when installed)
    if "max |ours - diffusers|" in out:
        assert float(out.split("max |ours - diffusers| over the final latents: ")[1].split()[0]) <= 1e-4


def test_cli_run_int8_configures_every_expert(capsys):
    """run --attention int8 sets it on every expert, also with --ulysses/--ring (the parallel self-attention then
    runs int8: tests/test_parallel.py)."""
    from types import SimpleNamespace

    from wan_model.cli import _set_attention

    def error(msg):
        raise SystemExit(msg)

    models = [_model()[0], _model()[0]]
    _set_attention(SimpleNamespace(attention="int8", ulysses=2, ring=1, error=error), models)
    assert all(m.attention.kind == "int8" for m in models)
    model = _model()[0]
    _set_attention(SimpleNamespace(attention="int8", ulysses=1, ring=1, error=error), [model])
    assert model.attention.kind == "int8" and "attention: int8: roles self, dense layers" in capsys.readouterr().out


def _unfused(model, impl):
    """Every int8 self-attention of `model` put back on the unfused path: the bf16-form projection (q, k, v) and
    wan::attention_int8's backend quantizing q itself, without its channel balance (stage 1b: it needs q's
    statistics before q is rounded, which the fused kernel cannot have)."""
    attention = {"ref": R.attention_int8, "triton": T.attention_int8}[impl]
    for b in model.blocks:
        if b.attn1.attend.func is M.self_attention_int8:
            b.attn1.project_qkv = M.base_projection(b.attn1.project_qkv)
            b.attn1.attend = lambda q, k, v, ops: attention(q, k, v, balance=False)
    return model


@pytest.mark.parametrize("impl", ["ref", pytest.param("triton", marks=pytest.mark.slow)])
def test_fused_q_quantization_changes_nothing(impl, monkeypatch):
    """The 8-bit self-attention's q comes quantized from the projection's kernel (qkv_rope_int8 -> attention_int8_q8):
    the model's output equals, bit for bit, the unfused path's (qkv_rope -> attention_int8 without the channel
    balance, which quantizes q)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # impl="triton": the interpreted kernels on CPU tensors
    model, x = _model("tiny-i2v")
    model.set_impl(impl).set_attention("int8", dense_layers=())
    assert all(b.attn1.project_qkv is M.qkv_fused_dense_int8 for b in model.blocks)
    with torch.no_grad():
        fused = model(*x)
        unfused = _unfused(model, impl)(*x)
        model.dense_attention(False)
        assert torch.equal(model(*x), fused)  # the binding is the configuration's, re-applied
    assert torch.equal(fused, unfused)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["quantize first", "attention first"])
def test_quantized_projection_gets_its_int8_form(order):
    """A quantized QKV (FP8 here) runs `qk_norm_rope_int8` after its own GEMM, whichever of quantize and
    set_attention comes first; the output equals the unfused 8-bit path's."""
    torch.manual_seed(0)
    t = WanModel(WanConfig.from_preset("tiny-t2v"))
    _, x = _model()
    if order == "quantize first":
        t.quantize("fp8").set_attention("int8", dense_layers=())
    else:
        t.set_attention("int8", dense_layers=()).quantize("fp8")
    assert all(b.attn1.project_qkv is M.qkv_module_then_norm_rope_int8 for b in t.blocks)
    with torch.no_grad():
        fused = t(*x[:3])
        assert torch.equal(fused, _unfused(t, "ref")(*x[:3]))  # CPU: the reference backend
    t.set_attention("bf16")
    assert all(b.attn1.project_qkv is M.qkv_module_then_norm_rope for b in t.blocks)
