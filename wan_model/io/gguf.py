"""GGUF checkpoints of the Wan transformer, as city96's ComfyUI-GGUF and diffusers' GGUF loader read them.

One `.gguf` file (the `gguf` package, PyPI, does the encoding: `GGUFWriter`, `gguf.quants`), arch "wan"
(`general.architecture`), ORIGINAL Wan key names without a prefix (what ComfyUI-GGUF's tools/convert.py
writes after stripping `model.diffusion_model.`; diffusers' single-file converter renames them). Tensor types
per key (`tensor_types`), following ComfyUI-GGUF's convert.py + its llama.cpp quantize patch:

  F32    every tensor that is not 2-D (biases, norms, `.modulation` [1, 6, C], `img_emb.emb_pos` [1, S, C],
         the 5-D patch-embedding Conv3d weight), tensors of <= 1024 elements, and the modules diffusers keeps in
         fp32 (`time_embedding.*`: wan_model.compat.spellings.keeps_fp32)
  TYPE   (--gguf-type) the other 2-D (Linear) weights; for Q8_0/Q5_0/Q4_0 only those inside `blocks.N`
         whose row length is a multiple of the 32-element block
  kept   Q types: the linears outside the blocks (text/time projection, head, img_emb: the llama.cpp patch
         leaves them unquantized) in their stored precision: BF16, F16 or F32

The 5-D patch embedding is stored as one plain F32 tensor of its 5 dims (what ComfyUI-GGUF's fix_5d_tensors.py
adds back; its loader views F32/F16 data in the reversed GGUF dims, diffusers' takes the numpy shape): no
`comfy.gguf.orig_shape` reshaping is involved (ComfyUI-GGUF uses that for SD1/SDXL only).

Reading (`read_gguf`) parses the header itself (`_parse`: every count, length, offset and size checked against
the file, the tensors tiling the data section as ggml's reader requires), then dequantizes every tensor
(`gguf.quants.dequantize`) one at a time, refusing NaN/inf values, cast at once to the load dtype. Writing
(`convert_gguf`) streams: tensor infos from the source's headers, then one tensor at a time read, quantized by
row chunks and appended; atomic and non-destructive (wan_model.io._atomic); a write error names the destination.

The `gguf` package is imported only when a GGUF file is read or written.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from typing import NamedTuple

import numpy as np
import torch

from wan_model.compat.layouts import COMFY_PREFIX, IGNORED_KEYS, CheckpointError, original_to_diffusers_key
from wan_model.compat.spellings import keeps_fp32
from wan_model.io.formats import to_diffusers_names

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_0")  # what --gguf-type writes
QUANTIZED = ("Q8_0", "Q5_0", "Q4_0")
ARCH = "wan"
MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what ggml reads (version 1's 32-bit counts are long gone)
DEFAULT_ALIGNMENT = 32  # of the data section and each tensor in it, unless general.alignment says otherwise
MAX_DIMS = 5            # ggml's 4, and the 5-D patch embedding (module docstring)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_UINT32, _STRING, _ARRAY = 4, 8, 9  # GGUF metadata value types (_SCALARS: the struct format of the others)
SMALL = 1024            # tensors of at most this many elements stay F32 (ComfyUI-GGUF's QUANTIZATION_THRESHOLD)
CHUNK_ELEMENTS = 1 << 22  # rows quantized together: 16 MiB of fp32 (and the quantizer's temporaries) at a time
_STORED = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
               "Q5_0": "MOSTLY_Q5_0", "Q4_0": "MOSTLY_Q4_0"}


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"GGUF files need the `gguf` package (pip install gguf): {e}") from e
    return gguf


def is_gguf(path) -> bool:
    """Whether `path` is a GGUF file: a `.gguf` name, or a regular file starting with the GGUF magic.
    CheckpointError for an existing `.gguf` path that is not a regular file (a named pipe, a device, a
    directory): no reader of either format can read it."""
    path = os.fspath(path)
    if path.lower().endswith(".gguf"):
        if os.path.lexists(path) and not os.path.isfile(path):
            raise CheckpointError(f"cannot read GGUF file {path}: {_not_regular(path)}")
        return True
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def check_gguf_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF tensor type {gguf_type!r}; expected one of {', '.join(GGUF_TYPES)}")
    return gguf_type


# ---------------------------------------------------------------------------------------------
# Which type each tensor gets

def tensor_type(key: str, dtype: torch.dtype, shape: tuple[int, ...], gguf_type: str) -> str:
    """The GGUF type of diffusers-named tensor `key` (stored `dtype`, `shape`) in a `gguf_type` file (module
    docstring)."""
    if len(shape) != 2 or math.prod(shape) <= SMALL or keeps_fp32(key):
        return "F32"
    if gguf_type not in QUANTIZED:
        return gguf_type
    if key.startswith("blocks.") and shape[-1] % 32 == 0:
        return gguf_type
    return _STORED.get(dtype, "F32")


def tensor_types(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], gguf_type: str) -> dict[str, str]:
    """{diffusers key: GGUF type} of a checkpoint whose tensors have `entries` {key: (dtype, shape)}."""
    check_gguf_type(gguf_type)
    return {k: tensor_type(k, dt, shape, gguf_type) for k, (dt, shape) in entries.items()}


def _qtype(name: str):
    return _gguf().GGMLQuantizationType[name]


def _nbytes(shape: tuple[int, ...], name: str) -> int:
    block, size = _gguf().GGML_QUANT_SIZES[_qtype(name)]
    return math.prod(shape) // block * size


def encode(t: torch.Tensor, name: str) -> np.ndarray:
    """Tensor `t` as the data of a GGUF tensor of type `name` (gguf.quants.quantize), quantized by chunks of
    rows (rows are independent blocks): at most CHUNK_ELEMENTS fp32 values and their temporaries at once."""
    gguf = _gguf()
    qtype = _qtype(name)
    if t.dim() < 2 or name == "F32":
        return gguf.quants.quantize(t.detach().float().contiguous().numpy(), qtype)
    rows = t.reshape(-1, t.shape[-1])
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    with np.errstate(over="ignore"):  # F16 overflow: convert_gguf names the tensor
        parts = [gguf.quants.quantize(rows[i:i + step].float().contiguous().numpy(), qtype)
                 for i in range(0, rows.shape[0], step)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


# ---------------------------------------------------------------------------------------------
# Reading

class _Tensor(NamedTuple):
    """One tensor of a GGUF file: its name, type (gguf.GGMLQuantizationType), dims in GGUF order (innermost
    first) and its bytes (uint8 [nbytes], a read-only view of the mapped file)."""

    name: str
    tensor_type: object
    shape: tuple[int, ...]
    data: np.ndarray


class _Header:
    """Bounds-checked little-endian reads of a GGUF header: every length and count is checked against the
    bytes left before anything is read or looped over (a corrupt count fails at once, it never loops)."""

    def __init__(self, buf, path: str):
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {why}; the GGUF file is truncated or corrupt")

    def take(self, n: int, what: str) -> int:
        if n > len(self.buf) - self.pos:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes, the file has {len(self.buf)}")
        self.pos += n
        return self.pos - n

    def unpack(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def text(self, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:self.pos]).decode()
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} at byte {start} is not UTF-8 ({e.reason})") from e

    def value(self, vtype: int, key: str):
        """The value of metadata `key` (type `vtype`): scalars and strings; arrays are skipped (None)."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], f"metadata {key!r}")
        if vtype == _STRING:
            return self.text(f"metadata {key!r}")
        if vtype != _ARRAY:
            raise self.fail(f"metadata {key!r} has GGUF value type {vtype}, not one of 0..12")
        itype = self.unpack("<I", f"the item type of metadata array {key!r}")
        count = self.unpack("<Q", f"the length of metadata array {key!r}")
        if itype in _SCALARS:
            self.take(count * struct.calcsize(_SCALARS[itype]), f"metadata array {key!r} of {count} items")
        elif itype == _STRING:
            if count * 8 > len(self.buf) - self.pos:
                raise self.fail(f"metadata array {key!r} of {count} strings at byte {self.pos} is longer than the "
                                f"file ({len(self.buf)} bytes)")
            for i in range(count):
                self.text(f"item {i} of metadata array {key!r}")
        else:  # ggml reads no arrays of arrays either
            raise self.fail(f"metadata array {key!r} has item type {itype}, not a scalar or string type")
        return None


def _parse(buf, path: str) -> tuple[dict, list[_Tensor]]:
    """({metadata key: (value type, value)}, tensors) of the GGUF file `path` mapped as `buf`, refusing what
    ggml's reader (gguf.cpp) refuses: another version, duplicate keys or tensor names, general.alignment not
    a uint32 power of two, more than MAX_DIMS dims, an unknown type, a row length that is not a multiple of the
    type's block, and tensor regions that do not tile the data section. GGUF tensors lie back to back in the
    order of their infos, each padded to the alignment (ggml's and gguf-py's writers, ggml's reader checks
    `offset == previous end padded`), from the first aligned byte after the infos to the end of the file."""
    gguf = _gguf()
    h = _Header(buf, path)
    h.take(4, "the magic")
    version = h.unpack("<I", "the GGUF version")
    if version not in GGUF_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        raise CheckpointError(f"{path}: GGUF version {version}" + (" (a big-endian file?)" if swapped in GGUF_VERSIONS
                                                                  else "") + ", this reader reads little-endian "
                              f"versions {' and '.join(map(str, GGUF_VERSIONS))}")
    n_tensors = h.unpack("<Q", "the tensor count")
    n_fields = h.unpack("<Q", "the metadata count")
    fields = {}
    for i in range(n_fields):
        key = h.text(f"metadata key {i}")
        if key in fields:
            raise h.fail(f"metadata key {key!r} appears twice")
        vtype = h.unpack("<I", f"the type of metadata {key!r}")
        fields[key] = (vtype, h.value(vtype, key))
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        vtype, alignment = fields["general.alignment"]
        if vtype != _UINT32 or alignment <= 0 or alignment & (alignment - 1):
            raise h.fail(f"general.alignment is {alignment!r} (GGUF value type {vtype}), not a uint32 power of two")
    infos, names = [], set()
    for i in range(n_tensors):
        name = h.text(f"the name of tensor {i}")
        if name in names:
            raise h.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = h.unpack("<I", f"the dim count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise h.fail(f"tensor {name!r} has {n_dims} dims, not 1 to {MAX_DIMS}")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, h.take(8 * n_dims, f"the dims of tensor {name!r}"))
        raw = h.unpack("<I", f"the type of tensor {name!r}")
        offset = h.unpack("<Q", f"the data offset of tensor {name!r}")
        try:
            qtype = gguf.GGMLQuantizationType(raw)
        except ValueError:
            raise h.fail(f"tensor {name!r} has unknown GGML type {raw}") from None
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        if min(dims) < 1 or dims[0] % block:
            raise h.fail(f"tensor {name!r} ({qtype.name}) has dims {list(dims)}: "
                         + (f"a row of {dims[0]} is not a multiple of its {block}-element block" if min(dims) else
                            "an empty dim"))
        infos.append((name, qtype, dims, offset, math.prod(dims) // block * size))
    start = _align(h.pos, alignment)  # the data section
    tensors, end, prev = [], 0, None
    for name, qtype, dims, offset, nbytes in infos:
        where = f"tensor {name!r} ({qtype.name}, dims {list(dims)}, {nbytes} bytes) at data offset {offset}"
        if offset % alignment:
            raise h.fail(f"{where}: not a multiple of the alignment {alignment}")
        if offset != end:
            raise h.fail(f"{where}: the previous tensor " + (f"{prev[0]!r} ({prev[1].name}, dims {list(prev[2])}, "
                                                               f"{prev[4]} bytes) ends at {end} padded" if prev else
                                                               "is none, the first tensor starts at 0")
                         + " (GGUF tensors follow one another, each padded to the alignment)")
        if start + offset + nbytes > len(buf):
            raise h.fail(f"{where}: ends at byte {start + offset + nbytes}, the file has {len(buf)}")
        tensors.append(_Tensor(name, qtype, dims, np.frombuffer(buf, np.uint8, nbytes, start + offset)))
        end, prev = _align(offset + nbytes, alignment), (name, qtype, dims, offset, nbytes)
    if tensors and len(buf) > start + end:
        raise h.fail(f"the data section (from byte {start}) has {len(buf) - start} bytes, its tensors fill {end} "
                     f"(the last, {prev[0]!r}: {prev[1].name}, dims {list(prev[2])}, {prev[4]} bytes at {prev[3]})")
    return fields, tensors


def _align(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _reader(path: str) -> list[_Tensor]:
    """The tensors of the Wan GGUF file `path` (checked: `_parse`, general.architecture "wan" or absent)."""
    if not os.path.isfile(path):
        what = _not_regular(path) if os.path.lexists(path) else "no such file"
        raise CheckpointError(f"cannot read GGUF file {path}: {what}")
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, GGUF files with {MAGIC!r})")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    fields, tensors = _parse(buf, path)
    vtype, arch = fields.get("general.architecture", (_STRING, None))
    if vtype != _STRING:
        raise CheckpointError(f"{path}: GGUF general.architecture has value type {vtype}, not a string")
    if arch is not None and arch != ARCH:
        raise CheckpointError(f"{path}: GGUF general.architecture is {arch!r}, not {ARCH!r} (a Wan transformer)")
    return tensors


def _not_regular(path: str) -> str:
    """What the existing non-regular file `path` is, for the error saying so."""
    mode = os.stat(path).st_mode if os.path.exists(path) else 0
    kind = next((k for test, k in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"),
                                   (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                                   (stat.S_ISSOCK, "a socket")) if test(mode)), "a dangling link")
    return f"not a regular file ({kind})"


def _diffusers_name(key: str) -> str:
    return original_to_diffusers_key(key.removeprefix(COMFY_PREFIX)) or key


def _dequantize(tensor, path: str) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of its logical shape: F32/F16/BF16 as those dtypes (exact), quantized
    types dequantized to fp32 (exact: a Q value is an integer times an fp16 scale). CheckpointError naming the
    tensor when a value is NaN or inf (garbage bytes: no trained weight is). The check is a sum (a NaN or inf
    value makes it NaN or inf; only then are values tested one by one): a few percent of the dequantization."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        if tensor.tensor_type in (q.F32, q.F16):
            t = torch.from_numpy(np.array(tensor.data).view(np.float32 if tensor.tensor_type == q.F32 else np.float16))
        elif tensor.tensor_type == q.BF16:
            t = torch.from_numpy(np.array(tensor.data).view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type))
        t = t.reshape(shape)
    except (NotImplementedError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} of type {tensor.tensor_type.name} cannot be read: "
                              f"{e}") from e
    bad = 0 if t.sum(dtype=torch.float32).isfinite() else (~t.isfinite()).sum().item()
    if bad:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} ({tensor.tensor_type.name}, shape {list(shape)}) has "
                              f"{bad} non-finite values (NaN/inf); the GGUF file is corrupt")
    return t


def read_gguf(path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a Wan GGUF file under their names in the file (original / ComfyUI), dequantized one at a
    time and cast at once to `dtype` (the modules diffusers keeps in fp32 to fp32); `dtype` None: F32/F16/BF16
    tensors keep their dtype, quantized ones are fp32. CheckpointError for a non-GGUF, corrupt or non-Wan file."""
    path = os.fspath(path)
    out = {}
    for tensor in _reader(path):
        t = _dequantize(tensor, path)
        if dtype is not None:
            t = t.to(torch.float32 if keeps_fp32(_diffusers_name(tensor.name)) else dtype)
        out[tensor.name] = t
    return out


def gguf_types(path) -> dict[str, str]:
    """{tensor name in the file: GGUF type name} of a GGUF file."""
    return {t.name: t.tensor_type.name for t in _reader(os.fspath(path))}


class GGUFSource:
    """Diffusers-named, read-on-demand view of a Wan GGUF file (the interface of formats.LazyCheckpoint that
    `convert_gguf` uses): entries {key: (path, name in the file, dtype, shape)}, `get(key)` dequantizes one."""

    def __init__(self, path: str):
        self._path = path
        self._tensors = {t.name: t for t in _reader(path)}
        gguf = _gguf()
        kept = {gguf.GGMLQuantizationType.F16: torch.float16, gguf.GGMLQuantizationType.BF16: torch.bfloat16}
        meta = {n: torch.empty(tuple(int(d) for d in reversed(t.shape)), dtype=kept.get(t.tensor_type, torch.float32),
                               device="meta") for n, t in self._tensors.items()}
        sd, source, self.format = to_diffusers_names(meta)
        self.entries = {d: (path, source[d], t.dtype, tuple(t.shape)) for d, t in sd.items()
                        if d in source and not any(s in d for s in IGNORED_KEYS)}
        self.source = {d: e[1] for d, e in self.entries.items()}

    def meta(self) -> dict[str, torch.Tensor]:
        return {d: torch.empty(e[3], dtype=e[2], device="meta") for d, e in self.entries.items()}

    def get(self, key: str) -> torch.Tensor:
        return _dequantize(self._tensors[self.entries[key][1]], self._path)

    def close(self) -> None:
        self._tensors.clear()
