"""GGUF (wan_model/io/gguf.py): files we write, checked by their consumers: the gguf package's own GGUFReader (types,
arch, shapes, data) and diffusers' GGUF loader (`from_single_file` + GGUFQuantizationConfig); reading GGUF into
our model; SNR per type vs dense; bit-exact round trips; streaming, atomic saving and the error paths."""

from __future__ import annotations

import errno
import os
import re
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _helpers import within
from wan_model.io import convert as wconvert, gguf as wgguf
from wan_model.io.checkpoint import CheckpointError
from wan_model.io.convert import convert_checkpoint, convert_gguf
from wan_model.cli import main as cli_main
from wan_model.testing import FP32_TOL, make_inputs, random_model
from wan_model.core.config import WanConfig
from wan_model.model import WanModel

gguf = pytest.importorskip("gguf")

# Output SNR floors (dB) of the tiny models (2 layers, unit-variance random weights), 6 dB below what the formats
# imply. Weights of a block format with absmax scaling over 32 Gaussian values (L levels per side) have an SNR of
# about 10 log10(12 L^2 / 4.4): Q8_0 (L = 127) 46, Q5_0 (16) 28, Q4_0 (8) 22 dB; rounding to 11 (F16) / 8 (BF16)
# significant bits: ~70 / ~52 dB. Seen over the four tiny variants x 2 seeds: min F16 68.7, BF16 50.9, Q8_0 43.3,
# Q5_0 26.1, Q4_0 19.3 (the output error of two residual blocks is within a few dB of the weights').
SNR_FLOOR = {"F16": 64.0, "BF16": 46.0, "Q8_0": 40.0, "Q5_0": 22.0, "Q4_0": 16.0}


def _orig(tmp_path, model, name="src.safetensors", fmt="original"):
    path = tmp_path / name
    model.save_pretrained(path, format=fmt)
    return path


def _convert(src, dst, t, *extra):
    assert cli_main(["convert", str(src), str(dst), "--format", "gguf", "--gguf-type", t, "--no-progress",
                     *extra]) == 0
    return dst


def _out(model, cfg):
    x, t, text, img = make_inputs(cfg, torch.float32)
    with torch.no_grad():
        return model(x, t, text, img).float()


def _snr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return 10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum()).item()


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    """A tiny FLF2V model (every kind of tensor: img_emb and its 3-D emb_pos, k_img/v_img, the 5-D patch
    embedding) as an original file."""
    tmp = tmp_path_factory.mktemp("gguf-flf2v")
    model = random_model(WanConfig.from_preset("tiny-flf2v"), seed=5).eval()
    return model, _orig(tmp, model), tmp


# ---------------------------------------------------------------------------------------------
# The gguf package's own reader: names, types, shapes, metadata, data

def _expected_type(name: str, shape: tuple[int, ...], gguf_type: str) -> str:
    """city96's Wan convention, restated from ComfyUI-GGUF (tools/convert.py + the llama.cpp quantize patch):
    non-2-D, modulation and time embedding F32; Q types quantize the block linears only, the rest stays as
    stored (F32 here)."""
    if len(shape) != 2 or "modulation" in name or name.startswith("time_embedding."):
        return "F32"
    if gguf_type in ("F32", "F16", "BF16"):
        return gguf_type
    return gguf_type if name.startswith("blocks.") else "F32"


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", wgguf.GGUF_TYPES)
def test_gguf_reader_sees_wan_names_types_and_shapes(i2v, gguf_type, tmp_path):
    _, src, _ = i2v
    dst = _convert(src, tmp_path / "m.gguf", gguf_type)
    ref = load_file(src)
    reader = gguf.GGUFReader(str(dst))
    assert reader.get_field("general.architecture").contents() == "wan"
    ftype = {"F32": "ALL_F32"}.get(gguf_type, f"MOSTLY_{gguf_type}")
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType[ftype]
    assert reader.get_field("general.quantization_version").contents() == gguf.GGML_QUANT_VERSION
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(ref)  # original Wan names, no prefix
    for name, t in tensors.items():
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF dims are innermost-first
        assert shape == tuple(ref[name].shape), name
        assert t.tensor_type.name == _expected_type(name, shape, gguf_type), name
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        if t.tensor_type.name == "F32":
            assert np.array_equal(values, ref[name].numpy()), name
        else:  # the gguf package's own quantizer of the source, byte for byte
            q = gguf.quants.quantize(ref[name].numpy(), t.tensor_type)
            assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), q.view(np.uint8).reshape(-1)), name
    assert len(tensors["patch_embedding.weight"].shape) == 5


def test_comfyui_source_and_bf16_kept_layers(i2v, tmp_path):
    """A ComfyUI (prefixed) bf16 source: names lose the prefix, Q8_0 leaves the non-block linears BF16 (stored
    precision) and the F32 ones F32."""
    model, _, _ = i2v
    bf = WanModel.from_pretrained(_orig(tmp_path, model), dtype=torch.bfloat16)
    src = _orig(tmp_path, bf, "c.safetensors", "comfyui")
    types = wgguf.gguf_types(_convert(src, tmp_path / "m.gguf", "Q8_0"))
    assert set(types) == {k.removeprefix("model.diffusion_model.") for k in load_file(src)}
    assert types["text_embedding.0.weight"] == types["time_projection.1.weight"] == types["head.head.weight"] == "BF16"
    assert types["img_emb.proj.1.weight"] == "BF16"
    assert types["time_embedding.0.weight"] == types["blocks.0.modulation"] == types["patch_embedding.weight"] == "F32"
    assert types["blocks.1.ffn.0.weight"] == "Q8_0"


# ---------------------------------------------------------------------------------------------
# diffusers' GGUF loader on our files; our reader; SNR vs dense

def _diffusers_gguf(path, config_dir):
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    return WanTransformer3DModel.from_single_file(
        str(path), config=str(config_dir), torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("variant, gguf_type", [("tiny-t2v", "Q8_0"), ("tiny-i2v", "Q4_0"), ("tiny-t2v", "Q5_0"),
                                               ("tiny-i2v", "BF16"), ("tiny-t2v", "F16")])
def test_diffusers_gguf_loader_matches_our_model(variant, gguf_type, tmp_path):
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    from wan_model.io.checkpoint import model_from_state_dict, native_to_diffusers

    model = random_model(WanConfig.from_preset(variant), seed=7).eval()
    cfg = model.config
    dst = _convert(_orig(tmp_path, model), tmp_path / "m.gguf", gguf_type)
    model.save_pretrained(tmp_path / "config", format="diffusers")  # from_single_file needs config= offline
    theirs = _diffusers_gguf(dst, tmp_path / "config")
    ours = WanModel.from_pretrained(dst, dtype=torch.float32, impl="ref")
    assert ours.config == cfg
    if gguf_type != "F16":  # kept packed by diffusers (uint8 GGUF blocks; F16 loads as a plain tensor)
        assert theirs.blocks[0].attn1.to_q.weight.dtype == torch.uint8
    # diffusers' own dequantization (its torch kernels, not gguf.quants) agrees with ours. Ours is exact
    # (ggml's: fp16 scale widened to fp32, times the integer); diffusers multiplies in fp16, so a Q weight may
    # differ by the fp16 rounding of the product: half an fp16 ulp, <= 2^-11 relative.
    mine = native_to_diffusers(dict(ours.state_dict()), cfg)
    seen = {k: dequantize_gguf_tensor(p).float().reshape(mine[k].shape) for k, p in theirs.state_dict().items()}
    assert set(seen) == set(mine)
    for k, w in seen.items():
        if gguf_type in wgguf.QUANTIZED:
            assert ((w - mine[k]).abs() <= mine[k].abs() * 2**-11).all(), k
        else:
            assert torch.equal(w, mine[k]), k

    def run(x, t, text, img):
        return theirs(x, t, text, img, return_dict=False)[0]

    expected = _out(run, cfg)
    # our model on the weights diffusers holds computes diffusers' output
    same = model_from_state_dict(seen, cfg, dtype=torch.float32, impl="ref").eval()
    assert (_out(same, cfg) - expected).abs().max().item() <= FP32_TOL
    # ... and on its own (exact) dequantization: diffusers' fp16 products are ~66 dB below the weights
    assert _snr(expected, _out(ours, cfg)) >= (60.0 if gguf_type in wgguf.QUANTIZED else 120.0)
    snr = _snr(_out(model, cfg), expected)
    assert snr >= SNR_FLOOR[gguf_type], (gguf_type, snr)


@pytest.mark.slow
def test_snr_per_type_and_bit_exact_round_trips(i2v, tmp_path):
    model, src, _ = i2v
    cfg = model.config
    dense = _out(model, cfg)
    snrs = {}
    for t in ("F16", "BF16", "Q8_0", "Q5_0", "Q4_0"):
        loaded = WanModel.from_pretrained(_convert(src, tmp_path / f"{t}.gguf", t), dtype=torch.float32)
        snrs[t] = _snr(dense, _out(loaded, cfg))
    assert all(snrs[t] >= SNR_FLOOR[t] for t in snrs), snrs
    assert snrs["F16"] > snrs["BF16"] and snrs["Q8_0"] > snrs["Q5_0"] > snrs["Q4_0"], snrs

    # F32 from fp32, BF16 from bf16 and F16 from fp16 hold the stored values: loads equal the source's loads
    for t, dtype in (("F32", torch.float32), ("BF16", torch.bfloat16), ("F16", torch.float16)):
        path = tmp_path / f"exact-{t}.gguf"
        _convert(src, path, t, "--dtype", {torch.float32: "float32", torch.bfloat16: "bfloat16",
                                          torch.float16: "float16"}[dtype])
        a = WanModel.from_pretrained(path, dtype=dtype).state_dict()
        b = WanModel.from_pretrained(src, dtype=dtype).state_dict()
        for k in b:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (t, k)
    # GGUF -> safetensors keeps the values: F32 gives the source file back, tensor for tensor
    back = tmp_path / "back.safetensors"
    assert cli_main(["convert", str(tmp_path / "exact-F32.gguf"), str(back), "--format", "original",
                     "--no-progress"]) == 0
    ref, got = load_file(src), load_file(back)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    # a Q8_0 file converts to fp32 safetensors exactly as our loader dequantizes it
    q = convert_checkpoint(tmp_path / "Q8_0.gguf", tmp_path / "q8-dir", "diffusers", progress=False)
    assert q == cfg
    a = WanModel.from_pretrained(tmp_path / "q8-dir", dtype=torch.float32).state_dict()
    b = WanModel.from_pretrained(tmp_path / "Q8_0.gguf", dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow
def test_any_source_format_gives_the_same_file(i2v, tmp_path):
    """original file, diffusers dir, ComfyUI file and an F32 GGUF (dequantized, re-quantized) -> identical bytes."""
    model, src, _ = i2v
    model.save_pretrained(tmp_path / "dir", format="diffusers", max_shard_size="300KB")
    f32 = _convert(src, tmp_path / "f32.gguf", "F32")
    direct = _convert(src, tmp_path / "direct.gguf", "Q4_0").read_bytes()
    for other in (tmp_path / "dir", _orig(tmp_path, model, "c.safetensors", "comfyui"), f32):
        assert _convert(other, tmp_path / "other.gguf", "Q4_0", "--overwrite").read_bytes() == direct, other


# ---------------------------------------------------------------------------------------------
# Streaming, atomic saving, errors

def test_chunked_quantization_equals_whole_tensor(monkeypatch):
    t = torch.randn(67, 96)
    whole = {n: wgguf.encode(t, n) for n in ("BF16", "Q8_0", "Q5_0", "Q4_0")}
    monkeypatch.setattr(wgguf, "CHUNK_ELEMENTS", 96 * 5)  # 14 chunks of 5 rows, the last of 2
    for n, w in whole.items():
        assert np.array_equal(wgguf.encode(t, n), w), n
        assert np.array_equal(w, gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType[n])), n


def test_streaming_reads_one_tensor_at_a_time(i2v, monkeypatch, tmp_path):
    """Each source tensor is read once, after the previous one was written (never the model at once)."""
    from wan_model.io import formats

    _, src, _ = i2v
    events, real_get, real_encode = [], formats.LazyCheckpoint.get, wgguf.encode

    def get(self, key):
        events.append(("read", key))
        return real_get(self, key)

    def encode(t, name):
        events.append(("write", name))
        return real_encode(t, name)

    monkeypatch.setattr(formats.LazyCheckpoint, "get", get)
    monkeypatch.setattr(wconvert, "encode", encode)
    _convert(src, tmp_path / "m.gguf", "Q8_0")
    kinds = [e[0] for e in events]
    assert kinds == ["read", "write"] * len(load_file(src))
    assert len({e[1] for e in events if e[0] == "read"}) == len(load_file(src))


def test_destination_policy_and_failed_writes(i2v, monkeypatch, tmp_path):
    _, src, _ = i2v
    dst = tmp_path / "out" / "m.gguf"
    dst.parent.mkdir()
    dst.write_bytes(b"a user's file")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_gguf(src, dst, "Q8_0")
    assert dst.read_bytes() == b"a user's file"
    convert_gguf(src, dst, "Q8_0", overwrite=True)
    good = dst.read_bytes()
    assert good[:4] == b"GGUF"

    calls = []

    def failing(t, name):
        calls.append(name)
        if len(calls) == 20:
            raise OSError("disk full")
        return real(t, name)

    real = wgguf.encode
    monkeypatch.setattr(wconvert, "encode", failing)
    with pytest.raises(OSError, match="disk full"):  # over an existing file: it stays as it was
        convert_gguf(src, dst, "Q4_0", overwrite=True)
    assert dst.read_bytes() == good
    calls.clear()
    with pytest.raises(OSError, match="disk full"):  # to a new path: nothing is left, no staging directory
        convert_gguf(src, tmp_path / "out" / "new.gguf", "Q4_0")
    assert os.listdir(tmp_path / "out") == ["m.gguf"]


def test_cli_errors(i2v, tmp_path, capsys):
    _, src, _ = i2v

    with pytest.raises(SystemExit) as e:
        cli_main(["convert", str(src), str(tmp_path / "m.gguf"), "--format", "gguf", "--gguf-type", "Q6_K"])
    assert e.value.code == 2 and "argument --gguf-type: invalid choice: 'Q6_K'" in capsys.readouterr().err
    cases = [
        ([str(tmp_path / "m.gguf"), "--format", "gguf"], "argument --gguf-type: --format gguf needs the tensor type"),
        ([str(tmp_path / "m.safetensors"), "--format", "gguf", "--gguf-type", "Q8_0"],
         "argument dst: --format gguf writes one .gguf file"),
        ([str(tmp_path / "m.safetensors"), "--format", "original", "--gguf-type", "Q8_0"],
         "argument --gguf-type: needs --format gguf"),
        ([str(tmp_path / "m.gguf"), "--format", "original"], "argument dst: " + str(tmp_path / "m.gguf") + " is a .gguf"),
        ([str(tmp_path / "m.gguf"), "--format", "gguf", "--gguf-type", "Q8_0", "--quantize", "nvfp4"],
         "argument --quantize: not with --format gguf"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            cli_main(["convert", str(src), *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.safetensors").exists()
    with pytest.raises(ValueError, match="unknown GGUF tensor type 'Q4_K'"):
        convert_gguf(src, tmp_path / "m.gguf", "Q4_K")
    with pytest.raises(ValueError, match="one .gguf file; got destination"):
        convert_gguf(src, tmp_path / "m.bin", "Q8_0")
    big = random_model(WanConfig.from_preset("tiny-t2v"), seed=2)
    with torch.no_grad():
        big.blocks[1].ffn.proj_in.weight[3, 5] = 7e4
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.0\.weight: values beyond F16's range"):
        convert_gguf(_orig(tmp_path, big, "big.safetensors"), tmp_path / "big.gguf", "F16")
    assert not (tmp_path / "big.gguf").exists()
    convert_gguf(tmp_path / "big.safetensors", tmp_path / "big.gguf", "BF16")


def test_unreadable_gguf_files(i2v, tmp_path):
    _, src, _ = i2v
    good = _convert(src, tmp_path / "m.gguf", "Q8_0")
    (tmp_path / "not.gguf").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        WanModel.from_pretrained(tmp_path / "not.gguf")
    data = good.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        WanModel.from_pretrained(tmp_path / "cut.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "flux.gguf"), "flux")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="general.architecture is 'flux', not 'wan'"):
        WanModel.from_pretrained(tmp_path / "flux.gguf")
    with pytest.raises(CheckpointError, match="GGUF file, which is not streamed"):
        convert_checkpoint(good, tmp_path / "q", "diffusers", quantize="nvfp4", progress=False)


@pytest.mark.slow
def test_reads_a_file_written_by_the_gguf_package_as_city96_does(tmp_path):
    """A GGUF written with the gguf package directly (not our writer), as city96's convert.py + llama-quantize
    leave a bf16 Wan: blocks' linears Q8_0 / Q4_0, other 2-D BF16, 1-D / modulation / 5-D patch embedding F32.
    Our model from it equals the gguf package's dequantization, and computes what diffusers' loader computes."""
    model = random_model(WanConfig.from_preset("tiny-t2v"), seed=11).eval()
    src = _orig(tmp_path, WanModel.from_pretrained(_orig(tmp_path, model, "f32.safetensors"), dtype=torch.bfloat16))
    path = str(tmp_path / "city96.gguf")
    w = gguf.GGUFWriter(path, "wan")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    expected = {}
    for i, (k, t) in enumerate(load_file(src).items()):
        a = t.float().numpy()
        q = gguf.GGMLQuantizationType
        qtype = (q.F32 if a.ndim != 2 or "modulation" in k else
                 (q.Q8_0 if i % 2 else q.Q4_0) if k.startswith("blocks.") else q.BF16)
        data = gguf.quants.quantize(a, qtype)
        w.add_tensor(k, data, raw_shape=data.shape, raw_dtype=qtype)
        expected[k] = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(a.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours = WanModel.from_pretrained(path, dtype=torch.float32, impl="ref")
    got = load_file(_orig(tmp_path, ours, "ours.safetensors"))
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    model.save_pretrained(tmp_path / "config", format="diffusers")
    theirs = _diffusers_gguf(path, tmp_path / "config")

    def run(x, t, text, img):
        return theirs(x, t, text, img, return_dict=False)[0]

    # diffusers' fp16 products (see test_diffusers_gguf_loader_matches_our_model) keep it ~66 dB from exact
    assert _snr(_out(run, model.config), _out(ours, model.config)) >= 60.0


# ---------------------------------------------------------------------------------------------
# Corrupt files: tensor regions against the data section, non-finite values; write errors; non-regular sources

@pytest.fixture(scope="module")
def t2v_q8(tmp_path_factory):
    """The bytes of a tiny T2V Q8_0 file (F32 and Q8_0 tensors) and its tensor infos in file order:
    [(name, type name, byte position of the GGML type field, of the data offset field, of the data)], found
    by the gguf package's reader."""
    tmp = tmp_path_factory.mktemp("gguf-t2v")
    path = _convert(_orig(tmp, random_model(WanConfig.from_preset("tiny-t2v"), seed=3)), tmp / "q8.gguf", "Q8_0")
    infos = []
    for t in gguf.GGUFReader(str(path)).tensors:
        pos = t.field.offset + sum(int(p.nbytes) for p in t.field.parts[:4])  # name length, name, n_dims, dims
        infos.append((t.name, t.tensor_type.name, pos, pos + 4, t.data_offset))
    return path.read_bytes(), infos


def _patched(data: bytes, pos: int, fmt: str, *values) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, pos, *values)
    return bytes(out)


def _refused(path, *names: str) -> str:
    """Loading `path` raises a one-line CheckpointError naming the file and `names`; the message."""
    with pytest.raises(CheckpointError) as e:
        WanModel.from_pretrained(path, dtype=torch.float32, impl="ref")
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and all(repr(n) in msg for n in names), msg
    return msg


def test_tensor_regions_must_tile_the_data_section(t2v_q8, tmp_path, capsys):
    """Issue 27: a data offset moved by a byte, or a type field saying Q2_K / IQ2_XXS / F16 over Q8_0 bytes,
    loaded (all-NaN latents). GGUF tensors lie back to back, each padded to the alignment (ggml's reader
    requires it): anything else is refused naming the file, the tensor and the offset or size."""
    data, infos = t2v_q8
    first, last = infos[0], infos[-1]
    q8 = next(i for i in infos[:-1] if i[1] == "Q8_0")
    after_q8 = infos[infos.index(q8) + 1]
    path = tmp_path / "bad.gguf"

    path.write_bytes(_patched(data, first[3], "<Q", 1))
    msg = _refused(path, first[0])
    assert "at data offset 1: not a multiple of the alignment 32" in msg
    assert cli_main(["run", "--checkpoint", str(path), "--frames", "1", "--height", "16", "--width", "16", "--steps",
                     "1", "--dtype", "float32", "--impl", "ref"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a multiple of the alignment 32" in err, err

    for name, size in (("Q2_K", None), ("IQ2_XXS", None), ("F16", 64)):  # the same Q8_0 bytes, another type
        path.write_bytes(_patched(data, q8[2], "<I", int(gguf.GGMLQuantizationType[name])))
        msg = _refused(path, q8[0])
        assert f"({name}, dims" in msg, msg
        if size:  # the region grows: the next tensor no longer follows it
            assert repr(after_q8[0]) in msg and "GGUF tensors follow one another" in msg, msg
    path.write_bytes(_patched(data, last[2], "<I", int(gguf.GGMLQuantizationType.F16)))  # the last one shrinks
    assert "its tensors fill" in _refused(path, last[0])
    path.write_bytes(_patched(data, infos[1][3], "<Q", 0))  # overlapping the first
    assert "at data offset 0" in _refused(path, infos[1][0], first[0])
    path.write_bytes(_patched(data, last[3], "<Q", 2**40))  # far beyond the file
    assert f"at data offset {2**40}" in _refused(path, last[0])
    path.write_bytes(data[:last[4] + 1])  # the last tensor cut
    assert "the file has" in _refused(path, last[0])


def test_non_finite_values_are_refused(t2v_q8, i2v, tmp_path):
    """Issue 27: NaN/inf from garbage bytes (an F16 NaN, a Q8_0 block's fp16 scale inf or NaN, an F32 NaN)
    are refused at load naming the tensor, not loaded as weights."""
    data, infos = t2v_q8
    path = tmp_path / "bad.gguf"
    q8 = next(i for i in infos if i[1] == "Q8_0")
    for scale in (0x7C00, 0x7E00):  # +inf, NaN: the fp16 scale opening the first block
        path.write_bytes(_patched(data, q8[4], "<H", scale))
        assert "non-finite values" in _refused(path, q8[0])
    f32 = next(i for i in infos if i[1] == "F32")
    path.write_bytes(_patched(data, f32[4] + 4, "<f", float("inf")))
    assert "1 non-finite values" in _refused(path, f32[0])
    _, src, _ = i2v
    f16 = _convert(src, tmp_path / "f16.gguf", "F16")
    t = next(t for t in gguf.GGUFReader(str(f16)).tensors if t.tensor_type.name == "F16")
    path.write_bytes(_patched(f16.read_bytes(), t.data_offset + 6, "<H", 0x7E01))
    assert "1 non-finite values" in _refused(path, t.name)
    with pytest.raises(CheckpointError, match=re.escape(t.name)):
        convert_gguf(path, tmp_path / "again.gguf", "Q8_0")
    assert not (tmp_path / "again.gguf").exists()


def test_alignment_from_the_header(tmp_path):
    """general.alignment (a uint32 power of two; default 32) places the data section and every tensor: a
    file written with 64 loads; a value that is no power of two, or not a uint32, is refused."""
    model = random_model(WanConfig.from_preset("tiny-t2v"), seed=4)
    ref = load_file(_orig(tmp_path, model))
    path = tmp_path / "a64.gguf"
    w = gguf.GGUFWriter(str(path), "wan")
    w.add_custom_alignment(64)
    for k, t in ref.items():
        w.add_tensor(k, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got = wgguf.read_gguf(path)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    data = path.read_bytes()
    pos = data.index(b"general.alignment") + len(b"general.alignment")
    assert struct.unpack_from("<II", data, pos) == (4, 64)  # GGUF uint32, 64
    for vtype, value in ((4, 0), (4, 48), (4, 32), (5, 64)):
        bad = tmp_path / f"a{vtype}-{value}.gguf"
        bad.write_bytes(_patched(data, pos, "<II", vtype, value))
        with pytest.raises(CheckpointError, match=re.escape(str(bad))) as e:
            wgguf.read_gguf(bad)
        # 32: a valid value, but the tensors laid at 64 no longer tile the data section
        assert ("general.alignment is" in str(e.value)) == (value != 32), e.value


@pytest.mark.parametrize("method, error", [
    ("write_tensor_data", OSError("131072 requested and 40640 written")),  # numpy's tofile on a full disk
    ("write_ti_data_to_file", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
    ("close", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),  # the last flush
])
def test_full_disk_names_the_destination_and_leaves_nothing(i2v, monkeypatch, tmp_path, capsys, method, error):
    """Issue 27: a full disk mid-write said "131072 requested and 40640 written" and nothing else. The error
    names the destination; a new path stays absent, an existing file unchanged."""
    _, src, _ = i2v
    out = tmp_path / "out"
    out.mkdir()
    old = _convert(src, out / "old.gguf", "Q8_0")
    good = old.read_bytes()
    real, calls = getattr(gguf.GGUFWriter, method), []

    def full(self, *args):
        calls.append(method)
        if method == "close":
            real(self)
        elif len(calls) == 3 or method != "write_tensor_data":
            self.fout[0].write(b"\0" * 1000)  # part of it got written
            raise error
        else:
            return real(self, *args)
        raise error

    monkeypatch.setattr(gguf.GGUFWriter, method, full)
    new = out / "new.gguf"
    assert cli_main(["convert", str(src), str(new), "--format", "gguf", "--gguf-type", "Q4_0", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write GGUF file {new}: {error.strerror or error}" in err, err
    calls.clear()
    with pytest.raises(OSError, match=re.escape(f"cannot write GGUF file {old}")) as e:
        convert_gguf(src, old, "Q4_0", overwrite=True)
    assert e.value.errno == error.errno
    assert os.listdir(out) == ["old.gguf"] and old.read_bytes() == good


def test_non_regular_gguf_source_is_refused(i2v, tmp_path, capsys):
    """Issue 27: `convert FIFO.gguf ...` said "convert it to safetensors first". Every command reading a
    .gguf path that is not a regular file says so in one line (and never opens it: a pipe would block)."""
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    for fmt in (["--format", "diffusers"], ["--format", "original", "--quantize", "nvfp4"],
                ["--format", "gguf", "--gguf-type", "Q8_0"]):
        dst = tmp_path / ("d.gguf" if "gguf" in fmt else "d.safetensors" if "original" in fmt else "d")
        with within(20):
            assert cli_main(["convert", str(fifo), str(dst), *fmt, "--no-progress"]) == 1, fmt
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{fifo}: not a regular file (a named pipe)" in err, err
        assert not dst.exists()
    with within(20), pytest.raises(CheckpointError, match=re.escape(f"{fifo}: not a regular file (a named pipe)")):
        WanModel.from_pretrained(fifo)
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(CheckpointError, match=re.escape(f"dir.gguf: not a regular file (a directory)")):
        convert_gguf(tmp_path / "dir.gguf", tmp_path / "d.gguf", "Q8_0")


def test_float16_cast_beyond_range_is_refused(tmp_path, capsys):
    """`convert --format gguf --dtype float16` of a weight beyond fp16's range: one line naming the source key
    and the value (the cast made it inf, which a Q8_0 block then carried as an inf scale), nothing written."""
    model = random_model(WanConfig.from_preset("tiny-t2v"), seed=3)
    with torch.no_grad():
        model.blocks[0].ffn["proj_out"].weight[0, 0] = 7e4
    src = _orig(tmp_path, model)
    dst = tmp_path / "m.gguf"
    assert cli_main(["convert", str(src), str(dst), "--format", "gguf", "--gguf-type", "Q8_0", "--dtype", "float16",
                     "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"{src}: blocks.0.ffn.2.weight: values beyond float16's range (max |x| 7e+04 > 65504)" in err, err
    assert not dst.exists()
