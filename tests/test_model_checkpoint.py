"""Checkpoint formats: diffusers dir / original file / ComfyUI file, round trips, fp8 side-car keys,
diffusers' own loader and converter, error paths, atomic saving, two-expert dirs, the convert CLI."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import VARIANTS, diffusers_from_pretrained, make_inputs
from wan_model import checkpoint as ckpt
from wan_model.checkpoint import CheckpointError, WanExperts, load_model, native_to_diffusers
from wan_model.cli import main as cli_main, random_model
from wan_model.config import WanConfig
from wan_model.model import WanModel

FP32_TOL = 1e-5


def _out(model, cfg, dtype=torch.float32):
    x, t, text, img = make_inputs(cfg, dtype)
    with torch.no_grad():
        return model(x, t, text, img)


def _diffusers_sd(model):
    return native_to_diffusers(dict(model.state_dict()), model.config)


def _assert_same_weights(a, b):
    sa, sb = _diffusers_sd(a), _diffusers_sd(b)
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_formats_round_trip_and_match_diffusers(fp32_models, variant, tmp_path):
    model, ref = fp32_models[variant]
    cfg = model.config
    expected = _out(ref_wrap(ref), cfg)

    # (1) diffusers dir, sharded; diffusers' own from_pretrained reads it back to identical weights
    d = tmp_path / "diffusers"
    model.save_pretrained(d, format="diffusers", max_shard_size="200KB")
    assert (d / ckpt.INDEX_NAME).exists() and len(list(d.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    theirs = diffusers_from_pretrained(d)
    for k, v in ref.state_dict().items():
        assert torch.equal(theirs.state_dict()[k], v), k

    # (2) original file, (3) ComfyUI file (prefixed), each loaded by us, and saved again from the loaded model
    loaded = {"diffusers": WanModel.from_pretrained(d, dtype=torch.float32, impl="ref")}
    for fmt in ("original", "comfyui"):
        path = tmp_path / f"{fmt}.safetensors"
        loaded["diffusers"].save_pretrained(path, format=fmt)
        keys = set(load_file(path))
        assert all(k.startswith("model.diffusion_model.") for k in keys) == (fmt == "comfyui")
        assert ckpt.detect_format(keys) == fmt
        loaded[fmt] = WanModel.from_pretrained(path, dtype=torch.float32, impl="ref")
    again = tmp_path / "again"
    loaded["comfyui"].save_pretrained(again, format="diffusers")
    loaded["round trip"] = WanModel.from_pretrained(again, dtype=torch.float32, impl="ref")

    for name, m in loaded.items():
        assert m.config == cfg.replace(expand_timesteps=False) if cfg.expand_timesteps else m.config == cfg
        _assert_same_weights(m, model)
        if cfg.expand_timesteps:  # per-token timesteps are a pipeline field: not stored in weights
            m.config = cfg
        err = (_out(m, cfg) - expected).abs().max().item()
        assert err <= FP32_TOL, (name, err)

    # bf16 loads of every format hold identical weights (dtypes as diffusers' from_pretrained(bf16))
    bf = {fmt: WanModel.from_pretrained(p, dtype=torch.bfloat16)
          for fmt, p in (("diffusers", d), ("original", tmp_path / "original.safetensors"),
                         ("comfyui", tmp_path / "comfyui.safetensors"))}
    for m in bf.values():
        _assert_same_weights(m, bf["diffusers"])
    assert bf["diffusers"].blocks[0].norm2.weight.dtype == torch.float32
    assert bf["diffusers"].blocks[0].attn1.to_qkv.weight.dtype == torch.bfloat16


def ref_wrap(ref):
    """diffusers model called like ours (returns the sample tensor)."""
    def run(x, t, text, img):
        return ref(x, t, text, img, return_dict=False)[0]
    return run


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_keys_convert_with_diffusers_converter(fp32_models, variant, tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model, ref = fp32_models[variant]
    for fmt in ("original", "comfyui"):
        path = tmp_path / f"{variant}-{fmt}.safetensors"
        model.save_pretrained(path, format=fmt)
        converted = convert_wan_transformer_to_diffusers(load_file(path))
        expected = ref.state_dict()
        if model.config.pos_embed_seq_len is not None:
            # diffusers' converter does not rename img_emb.emb_pos (REFERENCE.md section 3)
            assert torch.equal(converted.pop("img_emb.emb_pos"), expected["condition_embedder.image_embedder.pos_embed"])
            expected = {k: v for k, v in expected.items() if k != "condition_embedder.image_embedder.pos_embed"}
        assert set(converted) == set(expected)
        for k, v in expected.items():
            assert torch.equal(converted[k], v), k


def test_comfyui_fp8_scaled_applied(tmp_path):
    model = random_model(WanConfig.from_preset("tiny-t2v"), seed=3)
    path = tmp_path / "plain.safetensors"
    model.save_pretrained(path, format="comfyui")
    sd = load_file(path)
    scaled, deq = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max().float() / 448
            q = (v.float() / scale).to(torch.float8_e4m3fn)
            scaled[k], scaled[k[:-7] + ".scale_weight"] = q, scale.reshape(1)
            scaled[k[:-7] + ".scale_input"] = torch.ones(1)
            deq[k] = q.float() * scale
        else:
            scaled[k] = v
            deq[k] = v
    fp8_path, ref_path = tmp_path / "fp8.safetensors", tmp_path / "deq.safetensors"
    save_file(scaled, fp8_path)
    save_file(deq, ref_path)
    m8 = WanModel.from_pretrained(fp8_path, dtype=torch.float32)
    _assert_same_weights(m8, WanModel.from_pretrained(ref_path, dtype=torch.float32))
    assert not torch.equal(m8.blocks[0].attn1.to_qkv.weight, model.blocks[0].attn1.to_qkv.weight)  # really fp8

    # the newer comfy_quant side car: fp8 with a per-tensor weight_scale is applied, fp4 rejected
    k = "model.diffusion_model.blocks.0.ffn.0"
    quant = dict(scaled)
    del quant["scaled_fp8"]
    for name in [n for n in quant if n.endswith((".scale_weight", ".scale_input"))]:
        layer = name.rsplit(".", 1)[0]
        quant[layer + (".weight_scale" if name.endswith("scale_weight") else ".input_scale")] = quant.pop(name)
        spec = json.dumps({"format": "float8_e4m3fn"}).encode()
        quant[layer + ".comfy_quant"] = torch.tensor(list(spec), dtype=torch.uint8)
    save_file(quant, tmp_path / "quant.safetensors")
    _assert_same_weights(WanModel.from_pretrained(tmp_path / "quant.safetensors", dtype=torch.float32), m8)
    quant[k + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    save_file(quant, tmp_path / "fp4.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.0: ComfyUI quantized weight format .*nvfp4.*not supported"):
        WanModel.from_pretrained(tmp_path / "fp4.safetensors")


# ---------------------------------------------------------------------------------------------
# errors

@pytest.fixture
def saved_t2v(tmp_path):
    model = random_model(WanConfig.from_preset("tiny-t2v"), seed=1)
    model.save_pretrained(tmp_path / "orig.safetensors", format="original")
    model.save_pretrained(tmp_path / "dir", format="diffusers")
    return model, tmp_path


def test_truncated_and_corrupt_files(saved_t2v):
    _, tmp = saved_t2v
    data = (tmp / "orig.safetensors").read_bytes()
    (tmp / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc\.safetensors .*truncated, corrupt or not safetensors"):
        load_model(tmp / "trunc.safetensors")
    (tmp / "garbage.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_model(tmp / "garbage.safetensors")
    shard = tmp / "dir" / ckpt.WEIGHTS_NAME
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp / "dir")
    (tmp / "model.pt").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="only .safetensors"):
        load_model(tmp / "model.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp / "missing.safetensors")


def test_wrong_shapes_missing_and_unexpected_keys(saved_t2v):
    _, tmp = saved_t2v
    sd = load_file(tmp / "orig.safetensors")
    bad = dict(sd)
    bad["blocks.1.ffn.2.weight"] = torch.zeros(256, 100)
    save_file(bad, tmp / "shape.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.2\.weight: checkpoint \(256, 100\) vs model \(256, 512\)"):
        load_model(tmp / "shape.safetensors")
    bad = dict(sd)
    del bad["blocks.0.cross_attn.norm_k.weight"]
    bad["blocks.0.self_attn.extra.weight"] = torch.zeros(3)
    save_file(bad, tmp / "keys.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks\.0\.attn2\.norm_k\.weight'\]; "
                                              r"unexpected keys \['blocks\.0\.self_attn\.extra\.weight'\]"):
        load_model(tmp / "keys.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, tmp / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a Wan transformer checkpoint"):
        load_model(tmp / "other.safetensors")
    # diffusers-format dir whose config disagrees with its weights
    cfg = json.loads((tmp / "dir" / "config.json").read_text())
    cfg["ffn_dim"] = 1024
    (tmp / "dir" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"ffn\.net\.0\.proj\.weight: checkpoint \(512, 256\) vs model \(1024, 256\)"):
        load_model(tmp / "dir")


def test_unknown_format_and_variant_errors(saved_t2v, tmp_path):
    model, _ = saved_t2v
    with pytest.raises(ValueError, match="unknown checkpoint format 'gguf'"):
        model.save_pretrained(tmp_path / "x", format="gguf")
    with pytest.raises(ValueError, match="config is for 'UNet2DConditionModel'"):
        WanConfig.from_diffusers_config({"_class_name": "UNet2DConditionModel"})
    with pytest.raises(ValueError, match="cannot parse max_shard_size"):
        model.save_pretrained(tmp_path / "y", max_shard_size="lots")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _failing_save(fail_at: int):
    """save_file that raises OSError on its `fail_at`-th call (earlier calls write normally)."""
    calls = []

    def run(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == fail_at:
            raise OSError("disk full")
        return save_file(tensors, filename, metadata=metadata)

    return run


def test_failed_save_leaves_nothing(saved_t2v, monkeypatch, tmp_path):
    model, _ = saved_t2v
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(ckpt, "save_file", _failing_save(2))  # the 2nd shard fails after the 1st was written
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out / "model", format="diffusers", max_shard_size="200KB")
    monkeypatch.setattr(ckpt, "save_file", _failing_save(1))
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out / "model.safetensors", format="original")
    assert os.listdir(out) == []
    # a failed save over an existing checkpoint keeps the old one intact
    monkeypatch.undo()
    keep = tmp_path / "keep"
    model.save_pretrained(keep, format="diffusers")
    before = {p.name: p.read_bytes() for p in keep.iterdir()}
    monkeypatch.setattr(ckpt, "save_file", _failing_save(2))
    with pytest.raises(OSError, match="disk full"):
        random_model(model.config, seed=9).save_pretrained(keep, format="diffusers", max_shard_size="200KB")
    assert {p.name: p.read_bytes() for p in keep.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["dir", "keep", "orig.safetensors", "out"]


# ---------------------------------------------------------------------------------------------
# two experts, convert CLI

def test_two_expert_dir_loads_as_pair(tmp_path):
    cfg = WanConfig.from_preset("tiny-t2v-a14b")
    pair = WanExperts(random_model(cfg, seed=1), random_model(cfg, seed=2), 0.875)
    pair_path = tmp_path / "pipe"
    from wan_model.checkpoint import save_model
    save_model(pair, pair_path)
    assert (pair_path / "transformer" / "config.json").exists() and (pair_path / "transformer_2").is_dir()
    loaded = load_model(pair_path, dtype=torch.float32)
    assert isinstance(loaded, WanExperts) and loaded.boundary_ratio == 0.875
    _assert_same_weights(loaded.high, pair.high)
    _assert_same_weights(loaded.low, pair.low)
    assert loaded.expert(900.0) is loaded.high and loaded.expert(874.0) is loaded.low


def test_convert_cli_keeps_tensors(saved_t2v, tmp_path, capsys):
    model, src = saved_t2v
    assert cli_main(["convert", str(src / "dir"), str(tmp_path / "c.safetensors"), "--format", "comfyui"]) == 0
    assert cli_main(["convert", str(tmp_path / "c.safetensors"), str(tmp_path / "d"), "--format", "diffusers",
                     "--max-shard-size", "300KB"]) == 0
    assert cli_main(["convert", str(tmp_path / "d"), str(tmp_path / "o.safetensors"), "--format", "original"]) == 0
    assert load_file(tmp_path / "o.safetensors").keys() == load_file(src / "orig.safetensors").keys()
    for k, v in load_file(src / "orig.safetensors").items():
        assert torch.equal(load_file(tmp_path / "o.safetensors")[k], v), k
    assert cli_main(["convert", str(src / "dir"), str(tmp_path / "b"), "--format", "diffusers",
                     "--dtype", "bfloat16"]) == 0
    bf = load_file(tmp_path / "b" / ckpt.WEIGHTS_NAME)
    assert bf["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16 and bf["blocks.0.norm2.weight"].dtype == torch.float32
