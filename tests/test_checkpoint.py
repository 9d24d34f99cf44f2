"""Checkpoint formats: diffusers dir / original file / ComfyUI file, round trips, fp8 side-car keys,
diffusers' own loader and converter, error paths, atomic saving, two-expert dirs, the convert CLI."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from _helpers import VARIANTS, diffusers_from_pretrained, within as _within
from wan_model.io import checkpoint as ckpt, convert
from wan_model.io import formats
from wan_model.io.checkpoint import CheckpointError, WanExperts, load_model, native_to_diffusers
from wan_model.cli import main as cli_main
from wan_model.testing import FP32_TOL, make_inputs, random_model
from wan_model.core.config import WanConfig
from wan_model.model import WanModel



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


def _assert_same_fp8_model(a, b):
    """Same state (fp8 bytes, scales, dense tensors), compared by bytes."""
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].view(torch.uint8) if sa[k].dtype.itemsize == 1
                                                          else sa[k], sb[k].view(torch.uint8)
                                                          if sb[k].dtype.itemsize == 1 else sb[k]), k


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    dense = WanModel.from_pretrained(ref_path, dtype=torch.float32)
    # the fp8 layers stay fp8 (FP8Linear, tests/test_fp8.py); their decoded weights are the dequantized file's
    qkv = m8.blocks[0].attn1.to_qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(qkv.dense_weight(torch.float32), dense.blocks[0].attn1.to_qkv.weight)
    assert not torch.equal(dense.blocks[0].attn1.to_qkv.weight, model.blocks[0].attn1.to_qkv.weight)  # really fp8
    cfg = model.config
    torch.testing.assert_close(_out(m8, cfg), _out(dense, cfg), rtol=0, atol=FP32_TOL)  # W8A16 = dense matmul

    # the newer comfy_quant side car: fp8 with a per-tensor weight_scale is applied; an nvfp4 marker on an fp8
    # layer (no weight_scale_2) is refused naming the layer
    k = "model.diffusion_model.blocks.0.ffn.0"
    quant = dict(scaled)
    del quant["scaled_fp8"]
    for name in [n for n in quant if n.endswith((".scale_weight", ".scale_input"))]:
        layer = name.rsplit(".", 1)[0]
        quant[layer + (".weight_scale" if name.endswith("scale_weight") else ".input_scale")] = quant.pop(name)
        spec = json.dumps({"format": "float8_e4m3fn"}).encode()
        quant[layer + ".comfy_quant"] = torch.tensor(list(spec), dtype=torch.uint8)
    save_file(quant, tmp_path / "quant.safetensors")
    _assert_same_fp8_model(WanModel.from_pretrained(tmp_path / "quant.safetensors", dtype=torch.float32), m8)
    quant[k + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    save_file(quant, tmp_path / "fp4.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.0: ComfyUI nvfp4 layer .*weight_scale_2 missing"):
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
    """The one writer's write_safetensors, raising OSError on its `fail_at`-th call (earlier calls write
    normally)."""
    calls, real = [], formats.write_safetensors

    def run(path, plan, tensors, metadata):
        calls.append(path)
        if len(calls) == fail_at:
            raise OSError("disk full")
        return real(path, plan, tensors, metadata)

    return run


def test_failed_save_leaves_nothing(saved_t2v, monkeypatch, tmp_path):
    model, _ = saved_t2v
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(formats, "write_safetensors", _failing_save(2))  # the 2nd shard fails after the 1st was written
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out / "model", format="diffusers", max_shard_size="200KB")
    monkeypatch.setattr(formats, "write_safetensors", _failing_save(1))
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out / "model.safetensors", format="original")
    assert os.listdir(out) == []
    # a failed save over an existing checkpoint keeps the old one intact
    monkeypatch.undo()
    keep = tmp_path / "keep"
    model.save_pretrained(keep, format="diffusers")
    before = {p.name: p.read_bytes() for p in keep.iterdir()}
    monkeypatch.setattr(formats, "write_safetensors", _failing_save(2))
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
    from wan_model.io.checkpoint import save_model
    save_model(pair, pair_path)
    assert (pair_path / "transformer" / "config.json").exists() and (pair_path / "transformer_2").is_dir()
    loaded = load_model(pair_path, dtype=torch.float32)
    assert isinstance(loaded, WanExperts) and loaded.boundary_ratio == 0.875
    _assert_same_weights(loaded.high, pair.high)
    _assert_same_weights(loaded.low, pair.low)
    assert loaded.expert(900.0) is loaded.high and loaded.expert(874.0) is loaded.low


@pytest.mark.slow
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


# ---------------------------------------------------------------------------------------------
# readers refuse what would load wrong or hang (issue 11)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_non_float_weights_refused(saved_t2v):
    _, tmp = saved_t2v
    sd = load_file(tmp / "orig.safetensors")
    for key, dtype in (("blocks.0.ffn.0.weight", torch.int32), ("blocks.1.norm3.weight", torch.bool),
                       ("head.head.bias", torch.uint16), ("patch_embedding.weight", torch.uint8)):
        bad = dict(sd)
        bad[key] = bad[key].to(dtype)
        save_file(bad, tmp / "int.safetensors")
        with pytest.raises(CheckpointError, match=rf"{key}: {dtype} \(expected a float dtype\)"):
            load_model(tmp / "int.safetensors")
    # the streaming converter reads dtypes from the headers: U16 is named (was KeyError: 'U16')
    bad = dict(sd)
    bad["head.head.bias"] = bad["head.head.bias"].to(torch.uint16)
    save_file(bad, tmp / "u16.safetensors")
    with pytest.raises(CheckpointError, match=r"'head\.head\.bias' of .*u16\.safetensors has dtype U16"):
        convert.convert_checkpoint(tmp / "u16.safetensors", tmp / "q", "diffusers", quantize="nvfp4", progress=False)
    assert not (tmp / "q").exists()


def test_nvfp4_buffers_must_have_their_dtypes(tmp_path):
    model = random_model(WanConfig.from_preset("tiny-t2v"), seed=2).quantize("nvfp4")
    model.save_pretrained(tmp_path / "q.safetensors", format="original")
    sd = load_file(tmp_path / "q.safetensors")
    assert WanModel.from_pretrained(tmp_path / "q.safetensors").quantization is not None  # the legit file loads
    key = "blocks.0.ffn.0.weight_scale"
    for name, bad_dtype in ((key, torch.uint8), ("blocks.0.ffn.0.weight", torch.int8)):
        bad = dict(sd)
        bad[name] = bad[name].view(bad_dtype)
        save_file(bad, tmp_path / "bad.safetensors", metadata={"nvfp4_layout": "ours"})
        with pytest.raises(CheckpointError, match=rf"{name}: {bad_dtype} \(expected torch\.(float8_e4m3fn|uint8)\)"):
            load_model(tmp_path / "bad.safetensors")


def test_key_in_two_places_refused(saved_t2v, tmp_path):
    model, tmp = saved_t2v
    d = tmp_path / "sharded"
    model.save_pretrained(d, max_shard_size="200KB")
    first, second = sorted(d.glob("diffusion_pytorch_model-*.safetensors"))[:2]
    key = sorted(load_file(first))[0]
    sd2 = load_file(second)
    sd2[key] = torch.zeros_like(load_file(first)[key])  # a second, different copy: last-one-wins is wrong
    save_file(sd2, second)
    with pytest.raises(CheckpointError, match=rf"{key}' is stored twice, in .*{first.name} and in .*{second.name}"):
        load_model(d)
    # one file, two names for one tensor: ComfyUI prefixed + plain, or an original + a diffusers name
    sd = load_file(tmp / "orig.safetensors")
    both = {ckpt.COMFY_PREFIX + k: v for k, v in sd.items()} | {"head.head.bias": sd["head.head.bias"] + 1}
    save_file(both, tmp / "two.safetensors")
    with pytest.raises(CheckpointError, match=r"keys '(model\.diffusion_model\.)?head\.head\.bias' and "
                                              r"'(model\.diffusion_model\.)?head\.head\.bias' both hold"):
        load_model(tmp / "two.safetensors")
    save_file(dict(sd, **{"proj_out.bias": sd["head.head.bias"] + 1}), tmp / "mixed.safetensors")
    with pytest.raises(CheckpointError, match=r"keys '(head\.head|proj_out)\.bias' and '(head\.head|proj_out)\.bias' "
                                              r"both hold tensor 'proj_out\.bias'"):
        load_model(tmp / "mixed.safetensors")


def test_duplicate_json_keys_refused(tmp_path):
    cfg = WanConfig.from_preset("tiny-t2v-a14b")
    pipe = tmp_path / "pipe"
    from wan_model.io.checkpoint import save_model
    save_model(WanExperts(random_model(cfg, seed=1), random_model(cfg, seed=2), 0.875), pipe)
    d = tmp_path / "sharded"
    random_model(cfg, seed=1).save_pretrained(d, max_shard_size="200KB")
    for path, key in ((pipe / "model_index.json", "boundary_ratio"), (pipe / "transformer" / "config.json", "ffn_dim"),
                      (d / ckpt.INDEX_NAME, "weight_map")):
        text = path.read_text()
        value = json.dumps(json.loads(text)[key])
        path.write_text(text.replace("{", "{" + json.dumps(key) + ": " + value + ", ", 1))
        with pytest.raises(CheckpointError, match=rf"{path.name}.*key '{key}' appears twice"):
            load_model(pipe if path.parent.name != "sharded" else d)
        path.write_text(text)


def test_index_entries_outside_the_directory_refused(saved_t2v, tmp_path):
    model, _ = saved_t2v
    d = tmp_path / "sharded"
    model.save_pretrained(d, max_shard_size="200KB")
    index = json.loads((d / ckpt.INDEX_NAME).read_text())
    shard = index["weight_map"]["proj_out.bias"]
    (tmp_path / "x.safetensors").write_bytes((d / shard).read_bytes())  # a readable file outside the dir
    for name in ("../x.safetensors", str(tmp_path / "x.safetensors"), "sub/../../x.safetensors"):
        index["weight_map"] = {k: name if v == shard else v for k, v in index["weight_map"].items()}
        (d / ckpt.INDEX_NAME).write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match=rf"weight_map entry '.*': '{re.escape(name)}' is not a file name"):
            load_model(d)
        shard = name
    for bad, what in (([1, 2], "expected a JSON object, got a list"), ({"weight_map": ["a"]}, "'weight_map' must be"),
                      ({"weight_map": {"proj_out.bias": 3}}, "entry 'proj_out.bias': 3 is not a file name")):
        (d / ckpt.INDEX_NAME).write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=rf"{ckpt.INDEX_NAME}.*{re.escape(what)}"):
            load_model(d)


@pytest.mark.parametrize("field, value, message", [
    ("num_layers", 200000, r"the config has 200000 layers, the checkpoint 2 blocks"),
    ("num_attention_heads", "2", r"config\.json: num_attention_heads must be a positive int, got '2'"),
    ("num_layers", 0, r"config\.json: num_layers must be a positive int, got 0"),
    ("ffn_dim", 512.5, r"config\.json: ffn_dim must be a positive int, got 512\.5"),
    ("attention_head_dim", 127, r"config\.json: attention_head_dim must be even"),
    ("patch_size", [1, 2], r"config\.json: patch_size must be 3 positive ints"),
    ("patch_size", [1, 2, 0], r"config\.json: patch_size must be 3 positive ints"),
    ("eps", -1.0, r"config\.json: eps must be a number in \(0, 1\)"),
    ("rope_max_seq_len", 10**12, r"config\.json: rope_max_seq_len must be at most"),
    ("cross_attn_norm", "yes", r"config\.json: only cross_attn_norm=True"),
])
def test_config_json_checked_before_building(saved_t2v, field, value, message):
    _, tmp = saved_t2v
    _edit_json(tmp / "dir" / "config.json", **{field: value})
    t0 = time.perf_counter()
    with _within(20), pytest.raises(CheckpointError, match=message):
        load_model(tmp / "dir")
    assert time.perf_counter() - t0 < 5  # refused before a model of the config's size is built


def test_malformed_json_files_name_file_and_field(saved_t2v, tmp_path):
    _, tmp = saved_t2v
    config = tmp / "dir" / "config.json"
    name = re.escape(str(config))
    for text, message in (("[1, 2]", f"{name}: expected a JSON object, got a list"),
                          ('{"num_layers": ', f"cannot read JSON file {name}: Expecting value"),
                          ("", f"cannot read JSON file {name}"), ('"x"', f"{name}: expected a JSON object, got a str")):
        config.write_text(text)
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp / "dir")
    config.unlink()
    with pytest.raises(CheckpointError, match=r"config\.json.*No such file"):
        load_model(tmp / "dir")
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    random_model(WanConfig.from_preset("tiny-t2v"), seed=1).save_pretrained(pipe / "transformer")
    for index, message in (([], "expected a JSON object, got a list"),
                           ({"boundary_ratio": "high"}, "boundary_ratio must be a number in"),
                           ({"boundary_ratio": 7}, "boundary_ratio must be a number in"),
                           ({"expand_timesteps": 1}, "expand_timesteps must be a bool")):
        (pipe / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match=rf"model_index\.json.*{message}"):
            load_model(pipe)


def _open_writer_later(fifo, seconds: float = 2.0) -> None:
    """Open `fifo` for writing after `seconds` if a reader blocks on it (a reader blocked in a C open() call is
    not interrupted by _within's alarm): the read then sees an empty file instead of hanging the suite."""
    def run():
        with contextlib.suppress(OSError):  # ENXIO: nobody opened it for reading
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    timer = threading.Timer(seconds, run)
    timer.daemon = True
    timer.start()


def test_non_regular_files_refused(saved_t2v):
    _, tmp = saved_t2v
    os.mkfifo(tmp / "fifo.safetensors")
    _open_writer_later(tmp / "fifo.safetensors")
    with _within(20), pytest.raises(CheckpointError, match=r"fifo\.safetensors: not a regular file"):
        load_model(tmp / "fifo.safetensors")
    for name in ("config.json", ckpt.WEIGHTS_NAME):
        path = tmp / "dir" / name
        keep = path.read_bytes()
        path.unlink()
        os.mkfifo(path)
        _open_writer_later(path)
        with _within(20), pytest.raises(CheckpointError, match=rf"{re.escape(name)}.*not a regular file"):
            load_model(tmp / "dir")
        path.unlink()
        path.write_bytes(keep)
    load_model(tmp / "dir")


def test_state_dict_config_errors(saved_t2v):
    _, tmp = saved_t2v
    sd = load_file(tmp / "orig.safetensors")
    cases = (
        ({"blocks.1000000000.ffn.0.bias": sd["blocks.1.ffn.0.bias"].clone()}, r"block indices .* not 0\.\.N-1"),
        ({"head.modulation": sd["head.modulation"].flatten()}, r"scale_shift_table has shape \(512,\), expected 3"),
        ({"patch_embedding.weight": sd["patch_embedding.weight"].flatten(1)}, r"patch_embedding\.weight has shape"),
        ({"head.head.weight": sd["head.head.weight"][:63]}, r"proj_out\.weight has 63 rows, not a multiple"),
    )
    for change, message in cases:
        save_file(dict(sd, **change), tmp / "bad.safetensors")
        with _within(20), pytest.raises(CheckpointError, match=rf"bad\.safetensors: .*{message}"):
            load_model(tmp / "bad.safetensors")


def test_comfy_quant_spec_errors(saved_t2v):
    _, tmp = saved_t2v
    sd = {ckpt.COMFY_PREFIX + k: v for k, v in load_file(tmp / "orig.safetensors").items()}
    layer = ckpt.COMFY_PREFIX + "blocks.0.ffn.0"

    def spec(obj):
        return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)

    cases = (
        ({layer + ".comfy_quant": spec(["float8_e4m3fn"]), layer + ".weight_scale": torch.ones(1)},
         r"blocks\.0\.ffn\.0: ComfyUI quantized weight format \['float8_e4m3fn'\] is not supported"),
        ({layer + ".comfy_quant": spec({"format": "float8_e4m3fn"})},
         r"blocks\.0\.ffn\.0: .*got weight_scale None"),
        ({"model.diffusion_model.blocks.0.ffn.9.comfy_quant": spec({"format": "float8_e4m3fn"}),
          "model.diffusion_model.blocks.0.ffn.9.weight_scale": torch.ones(1)}, r"missing weight blocks\.0\.ffn\.9\.weight"),
    )
    for change, message in cases:
        save_file(dict(sd, **change), tmp / "bad.safetensors")
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp / "bad.safetensors")


# ---------------------------------------------------------------------------------------------
# casts that would write inf (issue 27)

@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "nvfp4"])
def test_convert_float16_refuses_values_beyond_its_range(saved_t2v, tmp_path, capsys, quantize):
    """`convert --dtype float16` of a weight beyond fp16's range wrote inf (or, quantizing, a layer saturated
    from inf): CheckpointError naming the file, the key, its max |value| and the dtype, and the destination is
    left as it was (absent, or unchanged with overwrite). A source already non-finite is its own error."""
    _, src = saved_t2v
    sd = load_file(src / "orig.safetensors")
    key = "blocks.1.ffn.2.weight"
    big = dict(sd, **{key: sd[key].float().clone()})
    big[key][3, 4] = -7.0e4
    save_file(big, tmp_path / "big.safetensors")
    message = re.escape(f"{tmp_path / 'big.safetensors'}: {key}: values beyond float16's range (max |x| 7e+04 > "
                        "65504) would be written as inf; use --dtype bfloat16")
    run = functools.partial(convert.convert_checkpoint, tmp_path / "big.safetensors", format="diffusers",
                                dtype=torch.float16, quantize=quantize, progress=False)
    with pytest.raises(CheckpointError, match=message):
        run(dst=tmp_path / "new")
    assert not (tmp_path / "new").exists()
    convert.convert_checkpoint(src / "dir", tmp_path / "old", "diffusers", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    with pytest.raises(CheckpointError, match=message):
        run(dst=tmp_path / "old", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    big[key][3, 4] = float("inf")
    save_file(big, tmp_path / "inf.safetensors")
    if quantize is None:  # the CLI: one error line, exit 1; bfloat16 holds 7e4
        args = ["convert", str(tmp_path / "big.safetensors"), str(tmp_path / "cli.safetensors"), "--format",
                "original", "--dtype", "float16"]
        assert cli_main(args) == 1
        err = capsys.readouterr().err  # a progress bar, and one error line
        assert re.search(": error: " + message + "\n", err) and err.count("error:") == 1
        assert not (tmp_path / "cli.safetensors").exists()
        convert.convert_checkpoint(tmp_path / "big.safetensors", tmp_path / "bf", "diffusers", dtype=torch.bfloat16,
                                progress=False)
    for dtype in (torch.float16, torch.bfloat16)[: 2 if quantize is None else 1]:  # already inf: any cast refused
        with pytest.raises(CheckpointError, match=re.escape(f"{key}: the source already holds non-finite values")):
            convert.convert_checkpoint(tmp_path / "inf.safetensors", tmp_path / "x", "diffusers", dtype=dtype,
                                    quantize=quantize, progress=False)
        assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "nvfp4", "fp8"])
def test_a_load_reads_config_json_once_and_builds_one_meta_model(quantize, tmp_path, monkeypatch):
    """One from_pretrained of a diffusers directory: config.json read once (the config and the declared NVFP4
    layout come from the same read) and one model built on "meta" (the shape check and the load share it; the
    layer groups come from the layouts). A fresh config, so nothing is cached from earlier tests."""
    import wan_model.core.model as core_model
    from wan_model.core import config as config_mod
    from wan_model.io import source as source_mod

    cfg = WanConfig.from_preset("tiny-t2v").replace(num_layers=3, ffn_dim=320)
    model = random_model(cfg, seed=5)
    if quantize:
        model.quantize(quantize)
    model.save_pretrained(tmp_path / "dir")
    reads, metas = [], []
    real_read, real_init = config_mod.read_json, core_model.WanTransformer.__init__

    def read_json(path):
        reads.append(os.path.basename(os.fspath(path)))
        return real_read(path)

    def init(self, *args, **kw):
        metas.append(str(kw.get("device")))
        real_init(self, *args, **kw)

    monkeypatch.setattr(source_mod, "read_json", read_json)
    monkeypatch.setattr(config_mod, "read_json", read_json)
    monkeypatch.setattr(core_model.WanTransformer, "__init__", init)
    loaded = WanModel.from_pretrained(tmp_path / "dir", dtype=torch.float32)
    assert reads.count("config.json") == 1, reads
    assert metas == ["meta"], metas
    if quantize is None:
        _assert_same_weights(loaded, model)
