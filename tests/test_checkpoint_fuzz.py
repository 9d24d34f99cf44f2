"""Fuzz of the checkpoint readers (issue 11): a real tiny checkpoint with mutated safetensors header bytes,
header JSON (dtypes, shapes, offsets, names, duplicates), tensor bytes and truncations, and mutated
config.json / shard index / model_index.json (values, types, structure, raw text). Every case loads or
raises CheckpointError, within a bounded time: never another exception, a hang or a crash."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from _helpers import within as _within
from wan_model.io import checkpoint as ckpt
from wan_model.io.checkpoint import CheckpointError, load_model
from wan_model.testing import random_model
from wan_model.core.config import WanConfig
from wan_model.io.formats import LazyCheckpoint

CFG = WanConfig(num_attention_heads=1, ffn_dim=128, num_layers=2, text_dim=16, freq_dim=16)
ST_DTYPES = ["BOOL", "U8", "I8", "U16", "I16", "F16", "BF16", "U32", "I32", "F32", "U64", "I64", "F64",
             "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "C64", "X", ""]
CASE_SECONDS = 20  # hard bound of one case (a hang fails the test instead of blocking the suite)
FUZZ = settings(max_examples=300, deadline=5000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])



def _only_checkpoint_errors(*reads):
    """Run each read; anything but success or a CheckpointError fails the case."""
    for read in reads:
        with _within(CASE_SECONDS):
            try:
                read()
            except CheckpointError:
                pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(work dir, original-file bytes, {relative path: text} of a pipeline dir with a sharded transformer)."""
    root = tmp_path_factory.mktemp("fuzz")
    model = random_model(CFG, seed=0)
    model.save_pretrained(root / "orig.safetensors", format="original")
    model.save_pretrained(root / "pipe" / "transformer", max_shard_size="300KB")
    (root / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": None,
                                                                "expand_timesteps": False}))
    assert len(list((root / "pipe" / "transformer").glob("*.safetensors"))) > 1
    texts = {p: (root / "pipe" / p).read_text() for p in ("model_index.json", "transformer/config.json",
                                                           f"transformer/{ckpt.INDEX_NAME}")}
    return root, (root / "orig.safetensors").read_bytes(), texts


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header_text: str, body: bytes) -> bytes:
    raw = header_text.encode()
    return struct.pack("<Q", len(raw)) + raw + body


class Case(bytes):
    """File bytes that hypothesis reports by size and header start (not megabytes of repr)."""

    def _repr_pretty_(self, p, cycle):
        p.text(f"<{len(self)} bytes: {bytes(self[:400])!r}...>")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)


@st.composite
def mutated_safetensors(draw, data: bytes) -> bytes:
    header, body = _split(data)
    n = len(data) - len(body)
    kind = draw(st.sampled_from(["tensors"] * 4 + ["header bytes", "header json", "duplicate", "length",
                                                   "tensor bytes", "truncate"]))
    if kind == "tensors":
        return draw(edited_tensors(header, body))
    if kind == "header bytes":  # raw flips inside the length prefix + JSON header
        out = bytearray(data)
        for pos, byte in draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8)):
            out[pos] = byte
        return bytes(out)
    if kind == "tensor bytes":  # any values (NaN, inf, subnormals): loads, never an error of another kind
        out = bytearray(data)
        for pos, byte in draw(st.lists(st.tuples(st.integers(n, len(data) - 1), st.integers(0, 255)), max_size=16)):
            out[pos] = byte
        return bytes(out)
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
    keys = sorted(k for k in header if k != "__metadata__")
    key = draw(st.sampled_from(keys))
    if kind == "duplicate":  # the same tensor name twice in the header (JSON objects allow it)
        other = draw(st.sampled_from(keys))
        text = json.dumps(header)
        return _join("{" + json.dumps(key) + ": " + json.dumps(header[other]) + ", " + text[1:], body)
    entry = header[key]
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "name", "delete", "metadata", "entry"]))
    if field == "dtype":
        entry["dtype"] = draw(st.sampled_from(ST_DTYPES))
    elif field == "shape":
        entry["shape"] = draw(st.lists(st.integers(-1, 2**40), max_size=6)
                              | st.permutations(entry["shape"]).map(list) | json_values)
    elif field == "data_offsets":
        entry["data_offsets"] = draw(st.lists(st.integers(-1, len(body) + 8), min_size=2, max_size=2) | json_values)
    elif field == "name":
        new = draw(st.sampled_from(keys).map(lambda k: ckpt.COMFY_PREFIX + k) | st.sampled_from(keys)
                   | st.sampled_from(["scaled_fp8", "blocks.9.ffn.0.weight", "blocks.99999999999.x", "head.head.scale_weight",
                                      "blocks.0.ffn.0.weight_scale_2", "blocks.0.ffn.0.comfy_quant"])
                   | st.text(max_size=30))
        header[new] = header.pop(key)
    elif field == "delete":
        del header[key]
    elif field == "metadata":
        header["__metadata__"] = draw(json_values)
    else:
        header[key] = draw(json_values)
    return _join(json.dumps(header), body)


ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
            "U8": 1, "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
SIDE_CARS = ["scaled_fp8", "head.head.scale_weight", "blocks.0.ffn.0.scale_weight", "blocks.0.ffn.0.weight_scale",
             "blocks.0.ffn.0.weight_scale_2", "blocks.0.ffn.0.comfy_quant", "blocks.0.cross_attn.norm_added_q.weight",
             "blocks.2.ffn.0.weight", "blocks.99999999999.x", "model.diffusion_model.head.head.bias", "proj_out.bias"]


@st.composite
def edited_tensors(draw, header: dict, body: bytes) -> bytes:
    """A well-formed safetensors file (offsets recomputed) with renamed, retyped, reshaped, dropped, copied or
    added tensors: what gets past safetensors' own checks to the loader's."""
    items = [[k, v["dtype"], list(v["shape"]), body[v["data_offsets"][0]:v["data_offsets"][1]]]
             for k, v in header.items() if k != "__metadata__"]
    meta = header.get("__metadata__")
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(items) - 1))
        name, dtype, shape, raw = items[i]
        op = draw(st.sampled_from(["rename", "retype", "reshape", "drop", "copy", "add", "metadata"]))
        if op == "rename":
            items[i][0] = draw(st.sampled_from([ckpt.COMFY_PREFIX + name, name.replace("blocks.1.", "blocks.7.")])
                               | st.sampled_from(SIDE_CARS) | st.text(max_size=24))
        elif op == "retype":  # the same bytes read as another dtype, flattened
            new = draw(st.sampled_from(sorted(ITEMSIZE)))
            if len(raw) % ITEMSIZE[new] == 0:
                items[i][1:3] = [new, [len(raw) // ITEMSIZE[new]]]
        elif op == "reshape":
            numel = len(raw) // ITEMSIZE[dtype]
            items[i][2] = draw(st.sampled_from([[numel], [1, numel], shape[::-1], [1] + shape, [numel, 1]]))
        elif op == "drop" and len(items) > 1:
            items.pop(i)
        elif op == "copy":
            items.append([draw(st.sampled_from(SIDE_CARS) | st.just(name + "_2")), dtype, shape, raw])
        elif op == "add":
            payload = draw(st.sampled_from([b'{"format": "float8_e4m3fn"}', b'{"format": "nvfp4"}', b"[1]", b"\xff",
                                            b"\x00\x00\x80\x3f"]) | st.binary(max_size=16))
            items.append([draw(st.sampled_from(SIDE_CARS)), "U8", [len(payload)], payload])
        else:
            meta = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3) | st.none())
    out, offset, blob = {}, 0, []
    if meta is not None:
        out["__metadata__"] = meta
    for name, dtype, shape, raw in items:
        out[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blob.append(raw)
    return _join(json.dumps(out), b"".join(blob))


@pytest.mark.slow
@FUZZ
@given(st.data())
def test_fuzz_safetensors_file(tiny, data):
    root, original, _ = tiny
    path = root / "case.safetensors"
    path.write_bytes(data.draw(mutated_safetensors(original).map(Case)))

    def stream_read():  # what `convert --quantize nvfp4` reads: headers only
        lazy = LazyCheckpoint([str(path)])
        ckpt.check_state_dict(lazy.meta(), ckpt.config_from_state_dict(lazy.meta(), str(path)), lazy.source)

    _only_checkpoint_errors(lambda: load_model(path, dtype=torch.float32, impl="ref"), stream_read)


@st.composite
def mutated_json(draw, text: str) -> bytes:
    kind = draw(st.sampled_from(["value", "delete", "document", "duplicate", "raw", "shard name"]))
    doc = json.loads(text)
    if kind == "raw":  # byte flips and truncations of the text
        out = bytearray(text.encode())
        for pos, byte in draw(st.lists(st.tuples(st.integers(0, len(out) - 1), st.integers(0, 255)), max_size=6)):
            out[pos] = byte
        return bytes(out[: draw(st.integers(0, len(out)))])
    if kind == "document":
        return json.dumps(draw(json_values)).encode()
    key = draw(st.sampled_from(sorted(doc)))
    if kind == "duplicate":
        return ("{" + json.dumps(key) + ": " + json.dumps(draw(json_values)) + ", " + text.lstrip()[1:]).encode()
    if kind == "delete":
        del doc[key]
    elif kind == "shard name" and "weight_map" in doc:
        entry = draw(st.sampled_from(sorted(doc["weight_map"])))
        doc["weight_map"][entry] = draw(st.sampled_from(["../orig.safetensors", "/etc/passwd", "", ".", "..",
                                                         "transformer", "x/../y.safetensors", "model_index.json"])
                                        | st.text(max_size=20) | json_values)
    else:
        doc[key] = draw(st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 3, 127, 200000, 2**31, 0.5, True])
                        | json_values)
    return json.dumps(doc).encode()


@pytest.mark.slow
@FUZZ
@given(st.data())
def test_fuzz_diffusers_json_files(tiny, data):
    root, _, texts = tiny
    pipe = root / "pipe"
    for name, text in texts.items():
        (pipe / name).write_text(text)
    name = data.draw(st.sampled_from(sorted(texts)))
    (pipe / name).write_bytes(data.draw(mutated_json(texts[name])))
    _only_checkpoint_errors(lambda: load_model(pipe, dtype=torch.float32, impl="ref"),
                            lambda: ckpt.open_source(str(pipe / "transformer")))


def test_fuzz_fixture_loads(tiny):
    """The unmutated files load (so the fuzz cases start from a valid checkpoint)."""
    root, _, texts = tiny
    for name, text in texts.items():
        (root / "pipe" / name).write_text(text)
    assert load_model(root / "pipe", dtype=torch.float32).config == CFG
    assert load_model(root / "orig.safetensors", dtype=torch.float32).config == CFG
