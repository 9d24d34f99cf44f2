"""NVFP4 checkpoint formats (wan_model.io.formats / wan_model.quant.nvfp4's file layouts), each checked against its consumer:
ComfyUI's layout with comfy-kitchen itself (its QuantizedTensor / eager CPU quantizer, as ComfyUI's
MixedPrecisionOps loader builds them), ModelOpt's and LightX2V's with independent spec-level readers and
writers written here from the published layouts (REFERENCE.md section 7). Plus: one model saved in every
format gives the same values (bit-exact round trips), detection and its ambiguity errors, the CLI."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


from wan_kernels import nvfp4 as fmt
from wan_kernels.linear import NVFP4Linear
from wan_model.quant import nvfp4 as layouts
from wan_model.io.checkpoint import COMFY_PREFIX, CheckpointError, model_from_state_dict, native_to_diffusers
from wan_model.cli import main as cli_main
from wan_model.testing import make_inputs, random_model
from wan_model.core.config import WanConfig
from wan_model.io.formats import FORMATS, HF_QUANT_CONFIG, REGISTRY
from wan_model.compat.layouts import diffusers_to_original_key
from wan_model.quant.nvfp4 import decode_to_encode, encode_to_decode
from wan_model.model import WanModel
from wan_model.compat.quantize import layer_groups

ck = pytest.importorskip("comfy_kitchen")  # a test dependency (requirements.txt); runs on CPU
from comfy_kitchen.tensor import QuantizedTensor, TensorCoreNVFP4Layout  # noqa: E402

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _snr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    return 10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum()).item()


def _run(model, dtype=torch.float32):
    x, t, text, img = make_inputs(model.config, dtype)
    with torch.no_grad():
        return model(x, t, text, img)


def _bits(t):
    return t.reshape(-1).view(torch.uint8)


def _same_state(a: WanModel, b: WanModel):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(_bits(sa[k]), _bits(sb[k])), k


@pytest.fixture(scope="module")
def dense():
    return random_model(WanConfig.from_preset("tiny-i2v"), seed=3).eval()


@pytest.fixture(scope="module")
def quantized(dense):
    return copy.deepcopy(dense).set_impl("ref").quantize("nvfp4")


def _ours(model: WanModel) -> dict[str, torch.Tensor]:
    """diffusers-named tensors of a model, NVFP4 layers in our layout."""
    return native_to_diffusers(dict(model.state_dict()), model.config)


def _our_dequantized(sd: dict, layer: str) -> torch.Tensor:
    """Reference dequantization of one of our layers, from the spec (low nibble = element 2i)."""
    w, s, g = sd[layer + ".weight"], sd[layer + ".weight_scale"], sd[layer + ".weight_scale_2"]
    n, k = w.shape[0], w.shape[1] * 2
    codes = torch.stack([w & 0xF, w >> 4], -1).reshape(n, k).long()
    block = fmt.unswizzle_scales(s.float(), n, k // 16).repeat_interleave(16, dim=1)
    return E2M1[codes] * block * g.float()


LAYERS = ("blocks.0.attn1.to_q", "blocks.1.attn1.to_v", "blocks.0.attn2.to_k", "blocks.1.attn2.add_v_proj",
          "blocks.0.ffn.net.0.proj", "blocks.1.ffn.net.2", "condition_embedder.time_proj")


# ---------------------------------------------------------------------------------------------
# conventions

def test_scale_conventions_both_ways():
    amax = torch.tensor([1e-6, 0.37, 1.0, 17.5, 3.1e4])
    decode = (amax / 2688.0).float()
    encode = (2688.0 / amax).float()
    for d, e in zip(decode, encode):
        # one fp32 division each way: the conversion is the reciprocal to <= 1 ulp (2^-23 relative, x2 margin)
        torch.testing.assert_close(decode_to_encode(d), e, rtol=2**-22, atol=0)
        torch.testing.assert_close(encode_to_decode(e), d, rtol=2**-22, atol=0)
        torch.testing.assert_close(encode_to_decode(decode_to_encode(d)), d, rtol=2**-22, atol=0)
    assert decode_to_encode(torch.tensor(0.0)) == 0 and encode_to_decode(torch.tensor(0.0)) == 0  # all-zero tensor
    p = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(layouts.swap_nibbles(layouts.swap_nibbles(p)), p)
    assert layouts.swap_nibbles(torch.tensor([0x21], dtype=torch.uint8)).item() == 0x12


def test_registry_drives_the_cli_choices(tmp_path, capsys):
    assert FORMATS == tuple(n for n, f in REGISTRY.items() if f.writable) and "lightx2v" not in FORMATS
    assert {"diffusers", "original", "comfyui", "modelopt"} <= set(FORMATS)
    with pytest.raises(SystemExit):
        cli_main(["convert", str(tmp_path), str(tmp_path / "y"), "--format", "lightx2v"])
    assert "invalid choice: 'lightx2v'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# ComfyUI: comfy-kitchen is the consumer

@pytest.mark.slow
def test_comfyui_file_read_by_comfy_kitchen(quantized, tmp_path):
    path = tmp_path / "comfy.safetensors"
    quantized.save_pretrained(path, format="comfyui")
    sd, ours = load_file(path), _ours(quantized)
    for layer in LAYERS:
        key = COMFY_PREFIX + diffusers_to_original_key(layer)
        marker = sd[key + ".comfy_quant"]
        # what ComfyUI's MixedPrecisionOps._load_from_state_dict does with it
        assert marker.dtype == torch.uint8 and json.loads(marker.numpy().tobytes()) == {"format": "nvfp4"}
        w, s, s2 = sd[key + ".weight"], sd[key + ".weight_scale"], sd[key + ".weight_scale_2"]
        n, k = w.shape[0], 2 * w.shape[1]
        assert s.dtype == torch.float8_e4m3fn and tuple(s.shape) == (math.ceil(n / 128) * 128, math.ceil(k / 64) * 4)
        assert s2.dtype == torch.float32 and s2.shape == ()
        params = TensorCoreNVFP4Layout.Params(scale=s2, orig_dtype=torch.float32, orig_shape=(n, k), block_scale=s)
        theirs = QuantizedTensor(w, "TensorCoreNVFP4Layout", params).dequantize()
        # comfy-kitchen rounds (global * block) then * e2m1, we (e2m1 * block, exact) * global: <= 2 ulp apart.
        # A wrong nibble order is off by up to the block's amax (seen: 43 on values ~10).
        torch.testing.assert_close(theirs, _our_dequantized(ours, layer), rtol=2**-22, atol=0)
        assert torch.equal(ck.dequantize_nvfp4(w, s2, s, torch.float32), theirs)


def _comfy_kitchen_file(model: WanModel, path):
    """A ComfyUI NVFP4 file made by comfy-kitchen's quantizer (as ComfyUI's own state_dict() writes it):
    each quantizable Linear of `model` (fp32) quantized with ck.quantize_nvfp4; the members of one of our
    fused groups get the group's per-tensor scale (max amax / 2688), which is what our fused GEMM needs.
    Returns the dense model holding comfy-kitchen's dequantized weights."""
    sd = _ours(model)
    out, ref = {}, dict(sd)
    for _, members in layer_groups(model.config):
        if members[0].startswith(("condition_embedder.text", "condition_embedder.image", "proj_out")):
            continue  # our default keep list
        gs = torch.stack([sd[m + ".weight"].abs().amax() for m in members]).amax().float() / (6 * 448)
        for m in members:
            q, bs = ck.quantize_nvfp4(sd[m + ".weight"].float(), gs)
            key = COMFY_PREFIX + diffusers_to_original_key(m)
            out[key + ".weight"], out[key + ".weight_scale"], out[key + ".weight_scale_2"] = q, bs, gs.clone()
            out[key + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode("utf-8")),
                                                      dtype=torch.uint8)
            ref[m + ".weight"] = ck.dequantize_nvfp4(q, gs, bs, torch.float32)
    for k, v in sd.items():
        key = COMFY_PREFIX + diffusers_to_original_key(k)
        out.setdefault(key, v.contiguous())
    save_file(out, path)  # no metadata: the markers alone tell the layout
    return model_from_state_dict(ref, model.config, torch.float32, impl="ref")


@pytest.mark.slow
def test_comfy_kitchen_quantized_file_loads(dense, tmp_path):
    path = tmp_path / "ck.safetensors"
    ref = _comfy_kitchen_file(dense, path)
    got = WanModel.from_pretrained(path, dtype=torch.float32, impl="ref")
    assert got.quantization is not None and isinstance(got.blocks[0].attn1.to_qkv, NVFP4Linear)
    q = got.blocks[1].ffn["proj_out"]
    torch.testing.assert_close(q.dequantized_weight(torch.float32), ref.blocks[1].ffn["proj_out"].weight,
                               rtol=2**-22, atol=0)  # the two dequantizers' rounding order, as above
    out, want = _run(got), _run(ref)
    # same weights to 2 ulp, fp32 model; W4A16 vs dense GEMM order (test_quant_nvfp4's bound): 1e-5
    err = (out - want).abs().max().item()
    print(f"comfy-kitchen NVFP4 file in our model vs dense with comfy-kitchen's dequantized weights: {err:.2e}")
    assert err <= 1e-5
    # the nibble order is what makes this work: the same file read as low-nibble-first is far off
    sd = load_file(path)
    save_file(sd, tmp_path / "low.safetensors", metadata={"nvfp4_layout": "ours"})
    with pytest.raises(CheckpointError, match="ambiguous NVFP4 layout"):
        WanModel.from_pretrained(tmp_path / "low.safetensors")
    swapped = {k: layouts.swap_nibbles(v) if k.endswith(".weight") and v.dtype == torch.uint8 else v
               for k, v in sd.items() if not k.endswith(".comfy_quant")}
    save_file(swapped, tmp_path / "wrong.safetensors", metadata={"nvfp4_layout": "ours"})
    wrong = _run(WanModel.from_pretrained(tmp_path / "wrong.safetensors", dtype=torch.float32, impl="ref"))
    assert torch.equal(wrong, out)  # ours-layout (low nibble) of the swapped bytes: the same values
    save_file({k: v for k, v in sd.items() if not k.endswith(".comfy_quant")}, tmp_path / "unswapped.safetensors",
              metadata={"nvfp4_layout": "ours"})
    bad = _run(WanModel.from_pretrained(tmp_path / "unswapped.safetensors", dtype=torch.float32, impl="ref"))
    assert _snr_db(want, bad) < 10  # high-nibble bytes read low-nibble first: garbage


# ---------------------------------------------------------------------------------------------
# ModelOpt / vLLM: a spec-level reader

def _modelopt_reader(directory) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a ModelOpt NVFP4 export as vLLM's ModelOptNvFp4LinearMethod lays it out: hf_quant_config.json
    {"quantization": {"quant_algo", "group_size", "exclude_modules"}}; per layer `weight` uint8 [N, K/2]
    (element 2i in the low nibble), `weight_scale` float8_e4m3fn [N, K/16] row-major, `weight_scale_2` fp32
    scalar: w = e2m1 * weight_scale * weight_scale_2. Returns (config, {layer: dequantized fp32 weight})."""
    cfg = json.loads((directory / HF_QUANT_CONFIG).read_text())
    q = cfg["quantization"]
    assert q["quant_algo"] in ("NVFP4", "W4A16_NVFP4") and q["group_size"] == 16
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    out = {}
    for key in [k for k in tensors if k.endswith(".weight_scale_2")]:
        layer = key[: -len(".weight_scale_2")]
        w, s, g = tensors[layer + ".weight"], tensors[layer + ".weight_scale"], tensors[key]
        n, k = w.shape[0], 2 * w.shape[1]
        assert w.dtype == torch.uint8 and s.dtype == torch.float8_e4m3fn and tuple(s.shape) == (n, k // 16)
        assert g.dtype == torch.float32 and g.numel() == 1
        assert (layer + ".input_scale" in tensors) == (q["quant_algo"] == "NVFP4")  # W4A4 needs a static one
        codes = torch.stack([w & 0xF, w >> 4], -1).reshape(n, k).long()
        out[layer] = E2M1[codes] * s.float().repeat_interleave(16, dim=1) * g.float()
    assert not set(out) & set(q["exclude_modules"])
    return q, out


@pytest.mark.slow
def test_modelopt_layout_spec_reader_and_round_trip(quantized, tmp_path):
    d = tmp_path / "modelopt"
    quantized.save_pretrained(d, format="modelopt", max_shard_size="300KB")
    q, layers = _modelopt_reader(d)
    ours = _ours(quantized)
    assert set(layers) == {k[: -len(".weight_scale_2")] for k in ours if k.endswith(".weight_scale_2")}
    for layer, w in layers.items():
        assert torch.equal(w, _our_dequantized(ours, layer)), layer  # same formula and order: exact
    linears = {m for _, ms in layer_groups(quantized.config) for m in ms}
    assert q["quant_algo"] == "W4A16_NVFP4"  # no activation calibration: weights-only NVFP4
    assert set(q["exclude_modules"]) >= (linears - set(layers)) and "proj_out" in q["exclude_modules"]
    back = WanModel.from_pretrained(d, dtype=torch.float32, impl="ref")
    _same_state(back, quantized)
    assert torch.equal(_run(back), _run(quantized))


# ---------------------------------------------------------------------------------------------
# LightX2V: a spec-level writer

def _lightx2v_file(model: WanModel, path, input_gs: float = 0.5):
    """Write the model's NVFP4 layers as LightX2V stores them: original names, `weight` low nibble first,
    `weight_scale` swizzled, ENCODE-convention `weight_global_scale` = 2688 / amax (= 1 / our decode
    scale), `input_global_scale`, `alpha` = 1 / (input_global_scale * weight_global_scale)."""
    out = {}
    for k, v in _ours(model).items():
        layer, _, suffix = k.rpartition(".")
        if suffix == "weight_scale_2":
            enc = (1.0 / v.double()).float()
            out[diffusers_to_original_key(layer) + ".weight_global_scale"] = enc
            out[diffusers_to_original_key(layer) + ".input_global_scale"] = torch.tensor(input_gs)
            out[diffusers_to_original_key(layer) + ".alpha"] = (1.0 / (input_gs * enc.double())).float()
        else:
            out[diffusers_to_original_key(k)] = v.contiguous()
    save_file(out, path)


@pytest.mark.slow
def test_lightx2v_layout_read(quantized, tmp_path):
    path = tmp_path / "lightx2v.safetensors"
    _lightx2v_file(quantized, path)
    got = WanModel.from_pretrained(path, dtype=torch.float32, impl="ref")
    a, b = got.state_dict(), quantized.state_dict()
    assert set(a) == set(b)
    for k in a:
        if k.endswith("weight_scale_2"):  # 1/(1/x) in fp32: <= 1 ulp (2^-23 relative, x2 margin)
            torch.testing.assert_close(a[k], b[k], rtol=2**-22, atol=0)
        else:
            assert torch.equal(_bits(a[k]), _bits(b[k])), k
    # encode read as decode would be wrong by a factor (2688/amax)^2: the convention is what is checked
    torch.testing.assert_close(_run(got), _run(quantized), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="read only"):
        got.save_pretrained(tmp_path / "x.safetensors", format="lightx2v")


# ---------------------------------------------------------------------------------------------
# every format: the same values

@pytest.mark.slow
def test_every_format_same_values_and_snr(dense, quantized, tmp_path):
    want = _run(quantized)
    snr = _snr_db(_run(dense), want)
    print(f"tiny-i2v NVFP4 (fp32 activations, W4A16 ref) vs dense output SNR: {snr:.2f} dB")
    for name in FORMATS:
        path = tmp_path / (name if REGISTRY[name].directory else f"{name}.safetensors")
        quantized.save_pretrained(path, format=name)
        got = WanModel.from_pretrained(path, dtype=torch.float32, impl="ref")
        _same_state(got, quantized)  # bit-exact round trip: every layout holds the same values
        out = _run(got)
        print(f"  {name}: SNR vs dense {_snr_db(_run(dense), out):.2f} dB, identical to in-memory: "
              f"{torch.equal(out, want)}")
        assert torch.equal(out, want)
    assert snr >= 18.0  # test_quant_nvfp4.test_snr_vs_bf16_model's floor (random weights, 2 blocks)


def test_dense_modelopt_refused(dense, tmp_path):
    with pytest.raises(ValueError, match="'modelopt' holds NVFP4 checkpoints"):
        dense.save_pretrained(tmp_path / "m", format="modelopt")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------
# detection

def test_ambiguous_layouts_refused(quantized, tmp_path):
    quantized.save_pretrained(tmp_path / "o.safetensors", format="original")
    sd = load_file(tmp_path / "o.safetensors")
    with safe_open(tmp_path / "o.safetensors", "pt") as f:
        assert f.metadata()["nvfp4_layout"] == "ours"
    save_file(sd, tmp_path / "bare.safetensors")  # NVFP4 tensors, nothing telling the layout
    with pytest.raises(CheckpointError, match=r"ambiguous NVFP4 checkpoint: .*comfy_quant.*hf_quant_config"):
        WanModel.from_pretrained(tmp_path / "bare.safetensors")
    quantized.save_pretrained(tmp_path / "c.safetensors", format="comfyui")
    save_file(load_file(tmp_path / "c.safetensors"), tmp_path / "c2.safetensors", metadata={"nvfp4_layout": "ours"})
    with pytest.raises(CheckpointError, match=r"ambiguous NVFP4 layout: comfyui .*ours"):
        WanModel.from_pretrained(tmp_path / "c2.safetensors")
    d = tmp_path / "dir"
    quantized.save_pretrained(d)
    (d / HF_QUANT_CONFIG).write_text(json.dumps({"quantization": {"quant_algo": "NVFP4", "group_size": 16}}))
    with pytest.raises(CheckpointError, match="ambiguous NVFP4 layout.*ModelOpt"):
        WanModel.from_pretrained(d)
    (d / HF_QUANT_CONFIG).write_text(json.dumps({"quantization": {"quant_algo": "FP8"}}))
    with pytest.raises(CheckpointError, match="only ModelOpt NVFP4"):
        WanModel.from_pretrained(d)


# ---------------------------------------------------------------------------------------------
# CLI: streaming quantize into every format == in-memory quantize saved there

@pytest.mark.slow
@pytest.mark.parametrize("name", ["comfyui", "modelopt"])
def test_cli_convert_quantize_every_format(dense, tmp_path, name, capsys):
    src = tmp_path / "bf16"
    bf16 = copy.deepcopy(dense).to_dtype(torch.bfloat16)
    bf16.save_pretrained(src)
    directory = REGISTRY[name].directory
    out = tmp_path / (name if directory else f"{name}.safetensors")
    assert cli_main(["convert", str(src), str(out), "--format", name, "--quantize", "nvfp4",
                     "--max-shard-size", "300KB", "--no-progress"]) == 0
    mem = tmp_path / ("mem" if directory else "mem.safetensors")
    WanModel.from_pretrained(src, dtype=torch.bfloat16).quantize("nvfp4").save_pretrained(mem, format=name)

    def tensors(p):
        files = sorted(p.glob("*.safetensors")) if directory else [p]
        return {k: v for f in files for k, v in load_file(f).items()}

    a, b = tensors(out), tensors(mem)
    assert set(a) == set(b) and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)
    if directory:
        assert len(list(out.glob("diffusion_pytorch_model-*.safetensors"))) > 2
        assert json.loads((out / HF_QUANT_CONFIG).read_text()) == json.loads((mem / HF_QUANT_CONFIG).read_text())
    # and converting between the NVFP4 layouts keeps the values exactly (no re-quantization)
    other = tmp_path / ("x.safetensors" if directory else "x")
    assert cli_main(["convert", str(out), str(other), "--format", "comfyui" if directory else "modelopt"]) == 0
    _same_state(WanModel.from_pretrained(other, dtype=torch.bfloat16), WanModel.from_pretrained(out, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# scale values, checked on load in every layout

def _saved_file(model, tmp_path, name):
    """(what to load, the safetensors file holding the layers) of `model` saved in format `name`."""
    src = tmp_path / (name if REGISTRY[name].directory else f"{name}.safetensors")
    if name == "lightx2v":
        _lightx2v_file(model, src)
    else:
        model.save_pretrained(src, format=name)
    return src, (src / "diffusion_pytorch_model.safetensors" if REGISTRY[name].directory else src)


def _rewrite(file, **tensors):
    with safe_open(file, "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    sd.update(tensors)
    save_file(sd, file, metadata=meta)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["diffusers", "original", "comfyui", "modelopt", "lightx2v"])
@pytest.mark.parametrize("layer", ["blocks.0.attn1.to_q", "blocks.1.ffn.net.0.proj"])  # fused into QKV / unfused
def test_bad_nvfp4_scales_refused_on_load(quantized, tmp_path, name, layer):
    """A per-tensor scale (weight_scale_2; LightX2V's encode-convention weight_global_scale, a reciprocal) of 0,
    < 0, NaN or inf, or block scales holding an e4m3 NaN code (0x7F, 0xFF), used to load and zero, sign-flip or
    NaN the layer: CheckpointError naming the file, the key and the value, for a layer fused into the QKV GEMM
    and an unfused one alike."""
    src, file = _saved_file(quantized, tmp_path, name)
    fmt_ = REGISTRY[name]
    base = fmt_.file_key(layer + ".weight").removesuffix(".weight")
    gkey = f"{base}.{fmt_.nvfp4.global_key}"
    with safe_open(file, "pt") as f:
        block, good = f.get_tensor(base + ".weight_scale"), f.get_tensor(gkey)
    for bad in (0.0, -0.5, float("nan"), float("inf")):
        _rewrite(file, **{gkey: torch.tensor(bad)})
        with pytest.raises(CheckpointError, match=re.escape(f"{file}: {gkey}: a scale must be finite and > 0, "
                                                            f"got {bad}")):
            WanModel.from_pretrained(src, dtype=torch.float32, impl="ref")
    _rewrite(file, **{gkey: good})
    for byte in (0x7F, 0xFF):
        bad = block.clone()
        bad.view(torch.uint8)[1, 2] = byte
        _rewrite(file, **{base + ".weight_scale": bad})
        with pytest.raises(CheckpointError, match=re.escape(f"{file}: {base}.weight_scale: NVFP4 block scales are "
                                                            f"non-negative e4m3, got NaN byte 0x{byte:02X} at [1, 2]")):
            WanModel.from_pretrained(src, dtype=torch.float32, impl="ref")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["diffusers", "comfyui", "lightx2v"])
def test_zero_global_scale_of_all_zero_layer_loads(quantized, tmp_path, name):
    """An all-zero weight's per-tensor scale is amax / 2688 = 0: accepted where every code is +-0 (it dequantizes
    to 0 either way), whatever the block scale bytes of its all-zero blocks (0x00, 0x08 or 0x38 by producer)."""
    layer = "blocks.1.ffn.net.0.proj"
    src, file = _saved_file(quantized, tmp_path, name)
    fmt_ = REGISTRY[name]
    base = fmt_.file_key(layer + ".weight").removesuffix(".weight")
    with safe_open(file, "pt") as f:
        w, s = f.get_tensor(base + ".weight"), f.get_tensor(base + ".weight_scale")
    _rewrite(file, **{base + ".weight": torch.full_like(w, 0x88), f"{base}.{fmt_.nvfp4.global_key}": torch.tensor(0.0),
                      base + ".weight_scale": torch.full_like(s.view(torch.uint8), 0x38).view(s.dtype)})
    got = WanModel.from_pretrained(src, dtype=torch.float32, impl="ref")
    assert got.blocks[1].ffn["proj_in"].dequantized_weight().eq(0).all()
