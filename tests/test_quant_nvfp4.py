"""NVFP4-quantized WanModel (wan_model/compat/quantize.py): structure and keep-list, W4A16 == dense model with
dequantized weights, SNR vs the bf16 model, checkpoint round trips, streaming convert == in-memory
quantize, torch.compile."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


from wan_kernels.linear import NVFP4Linear
from wan_model.io import checkpoint as ckpt
from wan_model.io.checkpoint import CheckpointError
from wan_model.cli import main as cli_main
from wan_model.testing import make_inputs, random_model
from wan_model.core.config import WanConfig
from wan_model.core.model import StackedKV, qkv_fused_dense, qkv_module_then_norm_rope
from wan_model.model import WanModel
from wan_model.io.convert import convert_nvfp4
from wan_model.io.formats import SafetensorsStreamWriter
from wan_model.compat.quantize import DEFAULT_KEEP, NVFP4Config, NVFP4StackedKV, layer_groups


def _snr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    return 10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum()).item()


def _run(model, cfg, dtype=torch.float32):
    x, t, text, img = make_inputs(cfg, dtype)
    with torch.no_grad():
        return model(x, t, text, img)


@pytest.fixture(scope="module")
def models():
    """{variant: fp32 random model} for the two structures (T2V; I2V with the image K/V group)."""
    return {v: random_model(WanConfig.from_preset(v), seed=i).eval() for i, v in enumerate(("tiny-t2v", "tiny-i2v"))}


@pytest.fixture(scope="module")
def bf16_ckpt(models, tmp_path_factory):
    """A dense bf16 tiny-i2v checkpoint (diffusers dir), the source of the conversion tests."""
    path = tmp_path_factory.mktemp("dense") / "i2v"
    copy.deepcopy(models["tiny-i2v"]).to_dtype(torch.bfloat16).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# structure

def test_default_keep_list_and_modules(models):
    model = copy.deepcopy(models["tiny-i2v"]).quantize("nvfp4")
    assert model.quantization == NVFP4Config() and model.quantization.keep == DEFAULT_KEEP
    ce = model.condition_embedder
    kept = [ce.time_embedder["linear_1"], ce.time_embedder["linear_2"], ce.text_embedder["linear_1"],
            ce.text_embedder["linear_2"], ce.image_embedder.ff["proj_in"], ce.image_embedder.ff["proj_out"],
            model.proj_out]
    assert all(type(m) is torch.nn.Linear for m in kept)
    assert isinstance(model.patch_embedding, torch.nn.Conv3d)
    assert isinstance(ce.time_proj, NVFP4Linear)  # outside the blocks, not an embedder: quantized
    for b in model.blocks:
        for m in (b.attn1.to_qkv, b.attn1.to_out, b.attn2.to_q, b.attn2.to_out, b.ffn["proj_in"], b.ffn["proj_out"]):
            assert isinstance(m, NVFP4Linear) and m.weight.dtype == torch.uint8
        assert b.attn1.project_qkv is qkv_module_then_norm_rope
    for kv in (model.cross_kv, model.cross_kv_img):
        assert isinstance(kv, NVFP4StackedKV) and kv.weight.shape == (2 * 2 * 256, 128)
    assert not any(isinstance(m, torch.nn.Linear) and not isinstance(m, NVFP4Linear)
                   for n, m in model.blocks.named_modules())
    # the dense model still runs the fused qkv_rope op
    assert models["tiny-i2v"].blocks[0].attn1.project_qkv is qkv_fused_dense


@pytest.mark.slow
def test_custom_keep_list_and_errors(models):
    keep = ("condition_embedder.time_proj", "blocks.1.ffn.*", "blocks.0.attn1.to_[qkv]")
    model = copy.deepcopy(models["tiny-t2v"]).quantize("nvfp4", NVFP4Config(keep=keep))
    ce = model.condition_embedder
    assert type(ce.time_proj) is torch.nn.Linear
    assert isinstance(ce.text_embedder["linear_1"], NVFP4Linear) and isinstance(model.proj_out, NVFP4Linear)
    assert type(ce.time_embedder["linear_1"]) is torch.nn.Linear  # never quantized
    assert type(model.blocks[1].ffn["proj_in"]) is torch.nn.Linear and isinstance(model.blocks[0].ffn["proj_in"],
                                                                                  NVFP4Linear)
    assert type(model.blocks[0].attn1.to_qkv) is torch.nn.Linear
    assert model.blocks[0].attn1.project_qkv is qkv_fused_dense
    assert isinstance(model.blocks[1].attn1.to_qkv, NVFP4Linear)
    _run(model, model.config)  # mixed dense / NVFP4 runs

    with pytest.raises(ValueError, match="ONE GEMM"):  # part of a fused group
        copy.deepcopy(models["tiny-t2v"]).quantize("nvfp4", NVFP4Config(keep=("blocks.0.attn1.to_q",)))
    with pytest.raises(ValueError, match="ONE GEMM"):  # the stacked K/V spans all layers
        copy.deepcopy(models["tiny-t2v"]).quantize("nvfp4", NVFP4Config(keep=("blocks.0.*",)))
    with pytest.raises(ValueError, match="not quantizable"):
        copy.deepcopy(models["tiny-t2v"]).quantize("nvfp4", NVFP4Config(layers=("condition_embedder.time_embedder"
                                                                                ".linear_1",)))
    with pytest.raises(ValueError, match="unknown quantization method 'int4'"):
        copy.deepcopy(models["tiny-t2v"]).quantize("int4")
    with pytest.raises(ValueError, match="already quantized"):
        copy.deepcopy(models["tiny-t2v"]).quantize("nvfp4").quantize("nvfp4")


def test_fused_groups_share_one_global_scale(models):
    model = models["tiny-i2v"]
    q = copy.deepcopy(model).quantize("nvfp4")
    C = model.config.dim
    for i, b in enumerate(model.blocks):
        parts = b.attn1.to_qkv.weight.split(C)
        want = torch.stack([p.abs().amax() for p in parts]).amax() / (6 * 448)
        assert torch.equal(q.blocks[i].attn1.to_qkv.weight_scale_2, want.float())
    want = model.cross_kv.weight.abs().amax() / (6 * 448)  # all layers' K and V together
    assert torch.equal(q.cross_kv.weight_scale_2, want.float())


# ---------------------------------------------------------------------------------------------
# numerics

def _dequantized_dense(model: WanModel, quantized: WanModel) -> WanModel:
    """The dense fp32 model with every quantized weight replaced by dequantize(quantize(w))."""
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, NVFP4Linear):
                target = dense.get_submodule(name)
                assert isinstance(target, (torch.nn.Linear, StackedKV))
                target.weight.copy_(m.dequantized_weight(torch.float32))
    return dense


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny-t2v", "tiny-i2v"])
@pytest.mark.parametrize("impl", ["ref", "auto"])
def test_w4a16_equals_dequantized_weight_model(models, variant, impl):
    model = copy.deepcopy(models[variant]).set_impl(impl)
    q = copy.deepcopy(model).quantize("nvfp4")
    dense = _dequantized_dense(model, q)
    out, want = _run(q, model.config), _run(dense, model.config)
    # W4A16 is exactly "matmul with the dequantized weight": both models compute in fp32 and differ only in
    # GEMM summation order (dequantize-then-matmul vs addmm), ~1e-7 relative per GEMM. Seen: <= 2e-6 on
    # outputs of magnitude ~5 (ref and auto). Bound: 1e-5 (the fp32 tolerance of the model tests), which is
    # 4 orders of magnitude below the quantization error itself (~20 dB SNR => ~0.5 abs here).
    err = (out - want).abs().max().item()
    print(f"{variant} impl={impl}: NVFP4 model vs dequantized-weight dense model: max diff {err:.2e}")
    assert err <= 1e-5
    assert _snr_db(_run(model, model.config), out) < 40  # and quantization did change the model


def test_gemm_snr_random_weights():
    """One NVFP4 W4A16 GEMM on Gaussian weights/activations (the per-GEMM figure the model SNR builds on)."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(1536, 1536, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1536, 1536, generator=g) / 1536 ** 0.5)
    x = torch.randn(64, 1536, generator=g)
    q = NVFP4Linear.from_linear(lin, impl="ref")
    snr = _snr_db(lin(x).detach(), q(x).detach())
    print(f"NVFP4 W4A16 GEMM SNR, Gaussian 1536x1536 weight: {snr:.2f} dB")
    # E2M1 (1 mantissa bit) with E4M3 scales per 16 values: ~20 dB on Gaussian data. Seen 20.5 dB; floor
    # 19 dB (deterministic seed; a wrong scale convention or layout gives < 0 dB).
    assert 19.0 <= snr <= 22.0


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny-t2v", "tiny-i2v"])
def test_snr_vs_bf16_model(models, variant):
    model = copy.deepcopy(models[variant]).to_dtype(torch.bfloat16).set_impl("auto")
    cfg = model.config
    ref32 = _run(models[variant], cfg)
    ref = _run(model, cfg, torch.bfloat16)
    q = copy.deepcopy(model).quantize("nvfp4")
    out = _run(q, cfg, torch.bfloat16)
    snr, snr_bf16 = _snr_db(ref, out), _snr_db(ref32, ref)
    print(f"{variant}: NVFP4 (bf16 activations) vs bf16 model output SNR {snr:.2f} dB "
          f"(bf16 vs fp32: {snr_bf16:.2f} dB)")
    # Random (untrained) weights, 2 blocks: 8 quantized GEMM kinds in series (+ time_proj): ~20 dB per GEMM
    # and the errors partly average out. Seen 19.9 dB (t2v) / 19.6 dB (i2v) on these seeds. Floor 18 dB:
    # deterministic inputs, so this catches a regression of ~1.5 dB (e.g. a lost shared scale or a wrong
    # layer quantized twice); a format bug gives ~0 dB.
    assert snr >= 18.0
    assert snr_bf16 > snr + 15  # the quantization error dominates bf16 rounding


# ---------------------------------------------------------------------------------------------
# checkpoints

def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(_bits(a[k]), _bits(b[k])), k


def _assert_same_state(a: WanModel, b: WanModel):
    _assert_same_tensors(a.state_dict(), b.state_dict())


@pytest.mark.slow
def test_save_load_round_trip_exact(models, tmp_path):
    model = copy.deepcopy(models["tiny-i2v"]).to_dtype(torch.bfloat16).set_impl("auto").quantize("nvfp4")
    cfg = model.config
    want = _run(model, cfg, torch.bfloat16)
    d = tmp_path / "q"
    model.save_pretrained(d, max_shard_size="300KB")
    assert (d / ckpt.INDEX_NAME).exists()
    config = json.loads((d / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "nvfp4"
    tensors = {}
    for f in d.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            assert h.metadata()["quantization"] == "nvfp4"
        tensors.update(load_file(f))
    # ModelOpt-style per-layer keys, diffusers names
    for layer in ("blocks.1.attn1.to_k", "blocks.0.attn2.to_v", "blocks.1.attn2.add_k_proj", "blocks.0.ffn.net.2"):
        w, s, s2 = (tensors[f"{layer}.{n}"] for n in ("weight", "weight_scale", "weight_scale_2"))
        assert w.dtype == torch.uint8 and s.dtype == torch.float8_e4m3fn and s2.dtype == torch.float32
        assert s2.shape == () and w.shape[1] * 2 == (512 if "ffn.net.2" in layer else 256)
    assert torch.equal(tensors["blocks.0.attn2.to_k.weight_scale_2"], tensors["blocks.1.attn2.to_v.weight_scale_2"])
    assert tensors["proj_out.weight"].dtype == torch.bfloat16 and "proj_out.weight_scale_2" not in tensors

    loaded = {"diffusers": WanModel.from_pretrained(d, dtype=torch.bfloat16)}
    for fmt in ("original", "comfyui"):
        p = tmp_path / f"{fmt}.safetensors"
        loaded["diffusers"].save_pretrained(p, format=fmt)
        keys = set(load_file(p))
        prefix = "model.diffusion_model." if fmt == "comfyui" else ""
        assert prefix + "blocks.0.self_attn.q.weight_scale_2" in keys and prefix + "blocks.0.ffn.0.weight_scale" in keys
        loaded[fmt] = WanModel.from_pretrained(p, dtype=torch.bfloat16)
    for name, m in loaded.items():
        assert m.config == cfg and m.quantization is not None, name
        _assert_same_state(m, model)
        assert torch.equal(_run(m, cfg, torch.bfloat16), want), name


def test_mismatched_group_scales_refused(models, tmp_path):
    model = copy.deepcopy(models["tiny-t2v"]).quantize("nvfp4")
    model.save_pretrained(tmp_path / "q")
    path = tmp_path / "q" / ckpt.WEIGHTS_NAME
    sd = load_file(path)
    sd["blocks.1.attn2.to_v.weight_scale_2"] = sd["blocks.1.attn2.to_v.weight_scale_2"] * 2
    save_file(sd, path)
    with pytest.raises(CheckpointError, match="weight_scale_2 differ"):
        WanModel.from_pretrained(tmp_path / "q")


@pytest.mark.slow
def test_streaming_convert_equals_in_memory_quantize(bf16_ckpt, tmp_path, capsys):
    expected = WanModel.from_pretrained(bf16_ckpt, dtype=torch.bfloat16).quantize("nvfp4")
    # CLI, sharded diffusers output (shards bounded by --max-shard-size)
    out = tmp_path / "nvfp4"
    assert cli_main(["convert", str(bf16_ckpt), str(out), "--format", "diffusers", "--quantize", "nvfp4",
                     "--max-shard-size", "300KB", "--no-progress"]) == 0
    assert "NVFP4 weights" in capsys.readouterr().out
    shards = sorted(out.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 2 and (out / ckpt.INDEX_NAME).exists()
    got = WanModel.from_pretrained(out, dtype=torch.bfloat16)
    _assert_same_state(got, expected)
    # the streamed files hold exactly the tensors save_pretrained writes
    expected.save_pretrained(tmp_path / "mem")
    mem = load_file(tmp_path / "mem" / ckpt.WEIGHTS_NAME)
    streamed = {}
    for f in shards:
        streamed.update(load_file(f))
    _assert_same_tensors(mem, streamed)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["keep"] == list(DEFAULT_KEEP)

    # ComfyUI naming, a custom keep list, an fp32 cast: the same as loading in fp32 and quantizing
    keep = ("condition_embedder.*", "proj_out", "blocks.*.ffn.*")
    convert_nvfp4(bf16_ckpt, tmp_path / "c.safetensors", "comfyui", NVFP4Config(keep=keep), dtype=torch.float32,
                  progress=False)
    got = WanModel.from_pretrained(tmp_path / "c.safetensors", dtype=torch.float32)
    want = WanModel.from_pretrained(bf16_ckpt, dtype=torch.float32).quantize("nvfp4", NVFP4Config(keep=keep))
    _assert_same_state(got, want)
    assert type(got.blocks[0].ffn["proj_in"]) is torch.nn.Linear

    with pytest.raises(CheckpointError, match="already NVFP4"):
        convert_nvfp4(out, tmp_path / "again", progress=False)


def test_stream_writer_checks_plan(tmp_path):
    plan = [("a", torch.bfloat16, (3, 5)), ("b", torch.float8_e4m3fn, (2,)), ("c", torch.float32, ())]
    w = SafetensorsStreamWriter(str(tmp_path / "x.safetensors"), plan, {"format": "pt"})
    a = torch.randn(3, 5).bfloat16()
    w.write("a", a)
    with pytest.raises(RuntimeError, match="does not match the planned"):
        w.write("b", torch.zeros(3, dtype=torch.float8_e4m3fn))
    b = torch.tensor([1.5, -448.0]).to(torch.float8_e4m3fn)
    w.write("b", b)
    w.write("c", torch.tensor(0.25))
    w.close()
    sd = load_file(tmp_path / "x.safetensors")
    assert torch.equal(sd["a"], a) and torch.equal(sd["b"].float(), b.float()) and sd["c"].item() == 0.25


def test_layer_groups_cover_every_linear(models):
    cfg = models["tiny-i2v"].config
    members = [m for _, ms in layer_groups(cfg) for m in ms]
    assert len(members) == len(set(members))
    # per layer: q, k, v, out (self), q, out, k, v, add_k, add_v (cross), ffn in/out; + time_proj, text x2,
    # image x2, proj_out (time_embedder excluded)
    assert len(members) == cfg.num_layers * 12 + 6


# ---------------------------------------------------------------------------------------------
# torch.compile

@pytest.mark.slow
def test_compile_fullgraph_quantized(models):
    model = copy.deepcopy(models["tiny-t2v"]).set_impl("auto").quantize("nvfp4")
    inputs = make_inputs(model.config)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager, out = model(*inputs), compiled(*inputs)
    # Inductor reorders fp32 reductions (see test_model.py): agreement to ~1e-6 relative, bound 1e-5 of scale
    err = (out - eager).abs().max().item()
    print(f"NVFP4 tiny-t2v compiled vs eager: max diff {err:.3e}")
    assert err <= 1e-5 * eager.abs().max().item()
