"""Fuzz of the GGUF reader (wan_model/io/gguf.py, issue 27), in the style of tests/test_checkpoint_fuzz.py: a real
tiny Wan GGUF file (F32, BF16 and Q8_0 tensors) with raw byte flips (header and data), truncations, appended
bytes, overwritten header numbers (version, counts, string lengths, value types, dims, GGML types, data
offsets), an added general.alignment or metadata array, and re-laid-out files with renamed, retyped,
reshaped, dropped or duplicated tensors. Every case loads with finite weights or raises a one-line
CheckpointError naming the file, within a bounded time: never another exception, a hang or NaN weights. Tensor
bytes are bounded by the file's size before anything is allocated (the reader checks every region)."""

from __future__ import annotations

import struct
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from _helpers import within
from wan_model.io import checkpoint as ckpt, gguf as wgguf
from wan_model.io.convert import convert_gguf
from wan_model.io.checkpoint import CheckpointError, load_model
from wan_model.testing import random_model
from wan_model.core.config import WanConfig
from wan_model.model import WanModel

gguf = pytest.importorskip("gguf")

CFG = WanConfig(num_attention_heads=1, ffn_dim=128, num_layers=2, text_dim=16, freq_dim=16)
CASE_SECONDS = 20  # hard bound of one case (a hang fails the test instead of blocking the suite)
FUZZ = settings(max_examples=6, deadline=None, derandomize=True, database=None,  # examples per mutation kind
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
GGML_TYPES = [int(t) for t in gguf.GGMLQuantizationType]
KINDS = ["number", "header bytes", "data bytes", "truncate", "append", "alignment", "array", "tensors"]
NAN_INF = [b"\x00\x7c", b"\x00\xfc", b"\x01\x7e", b"\xff\xff", b"\x00\x00\x80\x7f",  # fp16 / bf16 inf, NaN
           b"\x00\x00\xc0\x7f"]  # fp32 NaN
NUMBERS = [0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 31, 32, 33, 64, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63,
           2**64 - 1]


class Layout(NamedTuple):
    """The valid file as the gguf package's reader sees it."""

    data: bytes
    numbers: list[tuple[int, int]]  # (byte position, size 4 or 8) of every integer of the header
    kvs: list[bytes]                # the raw metadata entries
    infos: list[tuple[bytes, list[int], int]]  # tensor name, dims (GGUF order), GGML type
    blobs: list[bytes]              # each tensor's bytes
    data_start: int

    def __repr__(self):  # hypothesis prints the fixture with a failing case
        return f"<Layout: {len(self.data)} bytes, {len(self.infos)} tensors>"


def _kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + payload


def _build(kvs: list[bytes], infos: list, blobs: list[bytes], alignment: int = 32) -> bytes:
    """A GGUF v3 file of these entries, the tensors laid back to back, each padded to `alignment`."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), len(kvs)) + b"".join(kvs)
    body, offset = b"", 0
    for (name, dims, qtype), blob in zip(infos, blobs, strict=True):
        head += struct.pack("<Q", len(name)) + name + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)
        body += blob + b"\0" * (-len(blob) % alignment)
        offset = len(body)
    return head + b"\0" * (-len(head) % alignment) + body


class Case(bytes):
    """File bytes that hypothesis reports by size and header start (not megabytes of repr)."""

    def _repr_pretty_(self, p, cycle):
        p.text(f"<{len(self)} bytes: {bytes(self[:200])!r}...>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(work dir, Layout of a Q8_0 file from a bf16 model: F32, BF16 (the linears outside the blocks), Q8_0)."""
    root = tmp_path_factory.mktemp("gguf-fuzz")
    model = random_model(CFG, seed=0)
    model.save_pretrained(root / "f32.safetensors", format="original")
    WanModel.from_pretrained(root / "f32.safetensors", dtype=torch.bfloat16).save_pretrained(
        root / "bf16.safetensors", format="original")
    convert_gguf(root / "bf16.safetensors", root / "orig.gguf", "Q8_0", progress=False)
    data = (root / "orig.gguf").read_bytes()
    reader = gguf.GGUFReader(str(root / "orig.gguf"))
    numbers, kvs = [(4, 4), (8, 8), (16, 8)], []  # version, tensor count, metadata count
    fields = [f for k, f in reader.fields.items() if not k.startswith("GGUF.")] + [t.field for t in reader.tensors]
    for f in fields:
        pos = f.offset
        for part in f.parts:
            if part.dtype.kind in "ui" and part.dtype.itemsize in (4, 8):
                numbers += [(pos + j * part.dtype.itemsize, part.dtype.itemsize) for j in range(part.size)]
            pos += int(part.nbytes)
        if f.name in reader.fields:
            kvs.append(data[f.offset:pos])
    infos = [(t.name.encode(), [int(d) for d in t.shape], int(t.tensor_type)) for t in reader.tensors]
    blobs = [data[t.data_offset:t.data_offset + t.n_bytes] for t in reader.tensors]
    lay = Layout(data, numbers, kvs, infos, blobs, reader.data_offset)
    assert {gguf.GGMLQuantizationType(i[2]).name for i in infos} == {"F32", "BF16", "Q8_0"}
    assert _build(kvs, infos, blobs) == data  # the fuzz's writer writes the file it read
    return root, lay


@st.composite
def mutated_gguf(draw, lay: Layout, kind: str) -> bytes:
    data = lay.data
    if kind == "number":  # an integer of the header: version, counts, lengths, value types, dims, types, offsets
        out = bytearray(data)
        for pos, size in draw(st.lists(st.sampled_from(lay.numbers), min_size=1, max_size=2)):
            orig = int.from_bytes(out[pos:pos + size], "little")
            value = draw(st.sampled_from(NUMBERS) | st.sampled_from(GGML_TYPES)
                         | st.integers(-64, 64).map(lambda d, o=orig: o + d) | st.integers(0, 2**64 - 1))
            out[pos:pos + size] = (value % 2 ** (8 * size)).to_bytes(size, "little")
        return bytes(out)
    if kind == "header bytes":
        out = bytearray(data)
        for pos, byte in draw(st.lists(st.tuples(st.integers(0, lay.data_start - 1), st.integers(0, 255)),
                                       min_size=1, max_size=8)):
            out[pos] = byte
        return bytes(out)
    if kind == "data bytes":  # any values, NaN/inf patterns (fp16 scales and values, bf16, fp32) among them
        out = bytearray(data)
        for pos, raw in draw(st.lists(st.tuples(st.integers(lay.data_start, len(data) - 4),
                                                st.sampled_from(NAN_INF) | st.binary(min_size=1, max_size=4)),
                                      min_size=1, max_size=16)):
            out[pos:pos + len(raw)] = raw
        return bytes(out)
    if kind == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=64))
    kvs, infos, blobs = list(lay.kvs), [list(i) for i in lay.infos], list(lay.blobs)
    alignment = 32
    if kind == "alignment":  # general.alignment: right or wrong value and value type
        vtype = draw(st.sampled_from([4, 4, 4, 5, 10, 6, 8]))
        value = draw(st.sampled_from([1, 2, 8, 16, 32, 64, 128, 4096, 0, 3, 48, 2**31, 2**32 - 1]))
        payload = {4: struct.pack("<I", value), 5: struct.pack("<i", value % 2**31), 10: struct.pack("<Q", value),
                   6: struct.pack("<f", value), 8: struct.pack("<Q", len(str(value))) + str(value).encode()}[vtype]
        kvs.insert(draw(st.integers(0, len(kvs))), _kv(b"general.alignment", vtype, payload))
        good = vtype == 4 and 0 < value <= 4096 and value & (value - 1) == 0
        alignment = value if good and draw(st.booleans()) else draw(st.sampled_from([32, 64]))
    elif kind == "array":  # a metadata array: any item type, any length, few bytes
        itype = draw(st.sampled_from(list(range(13)) + [13, 2**32 - 1]))
        count = draw(st.sampled_from([0, 1, 5, 2**20, 2**40, 2**64 - 1]))
        payload = struct.pack("<IQ", itype, count) + draw(st.binary(max_size=64))
        kvs.insert(draw(st.integers(0, len(kvs))), _kv(b"fuzz.array", 9, payload))
    else:  # a well-laid-out file whose tensor infos lie: names, types, dims; dropped or duplicated tensors
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(infos) - 1))
            name, dims, _ = infos[i]
            op = draw(st.sampled_from(["rename", "retype", "reshape", "drop", "duplicate"]))
            if op == "rename":
                infos[i][0] = draw(st.sampled_from([b"model.diffusion_model." + name, infos[0][0], b"", b"\xff\xfe",
                                                    name.replace(b"blocks.1.", b"blocks.7."), b"scaled_fp8"])
                                   | st.text(max_size=24).map(str.encode))
            elif op == "retype":  # the same bytes, another type
                infos[i][2] = draw(st.sampled_from(GGML_TYPES + [len(GGML_TYPES) + 40, 2**32 - 1]))
            elif op == "reshape":
                numel = 1
                for d in dims:
                    numel *= d
                infos[i][1] = draw(st.sampled_from([[numel], dims[::-1], dims + [1], [1] + dims, [0] + dims[1:],
                                                    [numel * 2], list(range(1, 7))]))
            elif op == "drop" and len(infos) > 1:
                infos.pop(i)
                blobs.pop(i)
            elif op == "duplicate":
                infos.append(list(infos[i]))
                blobs.append(blobs[i])
    return _build(kvs, infos, blobs, alignment)


def _only_named_errors(path):
    """Read `path` as load, convert and run do: each succeeds with finite weights or raises a CheckpointError
    (our reader's name the file, in one line)."""
    with within(CASE_SECONDS):
        try:
            sd = wgguf.read_gguf(path)
        except CheckpointError as e:
            assert str(path) in str(e) and "\n" not in str(e), e
        else:
            assert all(torch.isfinite(t).all() for t in sd.values())
    with within(CASE_SECONDS):
        try:  # what convert --format gguf reads first: the headers
            lazy = wgguf.GGUFSource(str(path))
            ckpt.check_state_dict(lazy.meta(), ckpt.config_from_state_dict(lazy.meta(), str(path)), lazy.source)
        except CheckpointError:
            pass
    with within(CASE_SECONDS):
        try:
            model = load_model(path, dtype=torch.float32, impl="ref")
        except CheckpointError:
            pass
        else:
            assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(st.data())
def test_fuzz_gguf_file(tiny, kind, data):
    root, lay = tiny
    path = root / "case.gguf"
    path.write_bytes(data.draw(mutated_gguf(lay, kind).map(Case)))
    _only_named_errors(path)


def test_fuzz_fixture_loads(tiny):
    """The unmutated file, and the same tensors laid out at another alignment, load (so the fuzz cases start
    from a valid file)."""
    root, lay = tiny
    ref = wgguf.read_gguf(root / "orig.gguf")
    for alignment in (1, 8, 64, 256):
        path = root / f"a{alignment}.gguf"
        path.write_bytes(_build(lay.kvs + [_kv(b"general.alignment", 4, struct.pack("<I", alignment))], lay.infos,
                                lay.blobs, alignment))
        got = wgguf.read_gguf(path)
        assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref), alignment
    assert load_model(root / "orig.gguf", dtype=torch.float32).config == CFG
