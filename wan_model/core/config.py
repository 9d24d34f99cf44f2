"""WanConfig: the hyper-parameters of a Wan2.1/2.2 DiT, with named presets (REFERENCE.md section 2).

Field names follow diffusers' `WanTransformer3DModel` config (so `to_diffusers_config()` is a plain
dict copy), plus three pipeline-level fields diffusers keeps in the pipeline: `expand_timesteps`
(TI2V per-token timesteps), `boundary_ratio` and `num_experts` (Wan2.2 two-expert models).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import stat

import torch

HEAD_DIM = 128
TEXT_TOKENS = 512  # text context length of umT5, hard-wired in diffusers' I2V attention split
MAX_ROPE_LEN = 1 << 16   # rope tables are [rope_max_seq_len, head_dim/2] per axis, built at the first forward
MAX_JSON_BYTES = 64 << 20  # config.json / shard index / model_index.json are kilobytes
_INTS = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim", "freq_dim",
         "ffn_dim", "num_layers", "rope_max_seq_len", "num_experts")
_OPTIONAL_INTS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len", "vace_in_channels")
_BLOCK_INDEX = re.compile(r"blocks\.(\d+)\.")
_VACE_INDEX = re.compile(r"vace_blocks\.(\d+)\.")
VACE_CLASS = "WanVACETransformer3DModel"
# diffusers' WanVACETransformer3DModel defaults (its __init__), used when a VACE config.json omits them
VACE_DEFAULTS = {"vace_layers": [0, 5, 10, 15, 20, 25, 30, 35], "vace_in_channels": 96}



def parse_bytes(value: int | str, name: str, example: str, binary: bool = False) -> int:
    """An int of bytes or a string like '5GB' / '800MB' (decimal units, 1 GB = 1e9, as huggingface_hub; `binary`:
    also 'GiB', 'MiB', ... = 2^30, 2^20) -> bytes > 0; a ValueError naming the argument `name` otherwise (`example`:
    what its messages suggest). Read by max_shard_size (wan_model.io.formats.parse_size) and vram_budget
    (wan_model.core.offload.parse_budget)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name} must be an int of bytes or a string like {example.split(',')[0]}, got {value!r}")
    n = value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]" + ("I?" if binary else "") + r"?B)?\s*", value.upper())
        if not m:
            raise ValueError(f"cannot parse {name} {value!r}; use bytes or e.g. {example}")
        unit = m.group(2) or "B"
        n = int(float(m.group(1)) * (1024 if "I" in unit else 1000) ** "BKMGT".index(unit[0]))
    if n < 1:
        raise ValueError(f"{name} must be at least 1 byte, got {value!r}")
    return n

@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Hyper-parameters of one Wan transformer (one expert)."""

    num_attention_heads: int = 40
    attention_head_dim: int = HEAD_DIM
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None          # CLIP image embedding width (Wan2.1 I2V/FLF2V: 1280)
    added_kv_proj_dim: int | None = None  # input width of the image K/V projections (= dim)
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None  # FLF2V: 2 * 257 image tokens
    vace_layers: tuple[int, ...] | None = None  # VACE: the blocks after which a control hint is added
    vace_in_channels: int | None = None   # VACE: channels of the control latents (Wan2.1-VACE: 96)
    # pipeline-level (not part of diffusers' transformer config)
    expand_timesteps: bool = False        # TI2V: timestep per token [B, S]
    boundary_ratio: float | None = None   # two-expert models: high-noise expert while t >= ratio * 1000
    num_experts: int = 1

    def __post_init__(self):
        for name in _INTS + _OPTIONAL_INTS:
            v = getattr(self, name)
            if v is None and name in _OPTIONAL_INTS:
                continue
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
            object.__setattr__(self, name, int(v))
        p = self.patch_size
        if not isinstance(p, (tuple, list)) or len(p) != 3 or not all(_is_int(x) and x >= 1 for x in p):
            raise ValueError(f"patch_size must be 3 positive ints (t, h, w), got {p!r}")
        object.__setattr__(self, "patch_size", tuple(int(x) for x in p))
        if not _is_real(self.eps) or not 0 < self.eps < 1:
            raise ValueError(f"eps must be a number in (0, 1), got {self.eps!r}")
        if self.rope_max_seq_len > MAX_ROPE_LEN:
            raise ValueError(f"rope_max_seq_len must be at most {MAX_ROPE_LEN}, got {self.rope_max_seq_len}")
        if not isinstance(self.expand_timesteps, bool):
            raise ValueError(f"expand_timesteps must be a bool, got {self.expand_timesteps!r}")
        if self.boundary_ratio is not None and not (_is_real(self.boundary_ratio) and 0 <= self.boundary_ratio <= 1):
            raise ValueError(f"boundary_ratio must be a number in [0, 1] or None, got {self.boundary_ratio!r}")
        if self.num_experts not in (1, 2):
            raise ValueError(f"num_experts must be 1 or 2, got {self.num_experts}")
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even for RoPE, got {self.attention_head_dim}")
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"only qk_norm='rms_norm_across_heads' is supported, got {self.qk_norm!r}")
        if self.cross_attn_norm is not True:
            raise ValueError("only cross_attn_norm=True is supported (every Wan checkpoint uses it)")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(f"image_dim ({self.image_dim}) and added_kv_proj_dim ({self.added_kv_proj_dim}) "
                             "must be given together (Wan2.1 I2V/FLF2V) or both be None")
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.dim:
            raise ValueError(f"added_kv_proj_dim must equal dim={self.dim}, got {self.added_kv_proj_dim}")
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError("pos_embed_seq_len (FLF2V) needs an image embedder (image_dim)")
        if self.vace_layers is not None or self.vace_in_channels is not None:
            self._check_vace()

    def _check_vace(self) -> None:
        """VACE fields: both or neither; vace_layers strictly increasing block indices starting at 0 (diffusers
        requires layer 0 and indices below num_layers; it adds the i-th hint after the i-th listed block in
        ascending order, so an unsorted or repeated list would not mean what it says: refused)."""
        v = self.vace_layers
        if v is None or self.vace_in_channels is None:
            raise ValueError(f"vace_layers ({v!r}) and vace_in_channels ({self.vace_in_channels!r}) must be given "
                             "together (VACE) or both be None")
        if not isinstance(v, (tuple, list)) or not v or not all(_is_int(i) for i in v):
            raise ValueError(f"vace_layers must be a non-empty list of block indices, got {v!r}")
        v = tuple(int(i) for i in v)
        if v[0] != 0 or any(b <= a for a, b in zip(v, v[1:])) or v[-1] >= self.num_layers:
            raise ValueError(f"vace_layers must be strictly increasing block indices starting at 0 and below "
                             f"num_layers={self.num_layers}, got {list(v)}")
        if self.expand_timesteps:
            raise ValueError("VACE (vace_layers) with expand_timesteps is not supported: diffusers' "
                             "WanVACETransformer3DModel takes one timestep per sample")
        object.__setattr__(self, "vace_layers", v)

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def has_image(self) -> bool:
        """Wan2.1 I2V/FLF2V: CLIP image tokens with their own cross-attention K/V."""
        return self.image_dim is not None

    @property
    def has_vace(self) -> bool:
        """VACE: control latents through `vace_blocks`, their hints added after the blocks in `vace_layers`."""
        return self.vace_layers is not None

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Channels of the head given to the t, h, w RoPE axes (44/42/42 for head_dim 128)."""
        d = self.attention_head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def replace(self, **changes) -> "WanConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> "WanConfig":
        """The config of a named variant (see `PRESETS`); raises ValueError listing the names."""
        if name not in PRESETS:
            raise ValueError(f"unknown Wan variant {name!r}; known presets: {', '.join(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_diffusers_config(cls, config: dict | str | os.PathLike, where: str = "config") -> "WanConfig":
        """From a diffusers transformer config dict (read from the file `where`, for messages), a config.json path,
        or a model directory. Every field is checked (ValueError naming the file and the field)."""
        if not isinstance(config, dict):
            where = os.fspath(config)
            if os.path.isdir(where):
                where = os.path.join(where, "config.json")
            config = read_json(where)
        cls_name = config.get("_class_name", "WanTransformer3DModel")
        if cls_name not in ("WanTransformer3DModel", VACE_CLASS):
            raise ValueError(f"{where}: config is for {cls_name!r}, expected 'WanTransformer3DModel' or "
                             f"{VACE_CLASS!r}")
        names = {f.name for f in dataclasses.fields(cls)} - {"expand_timesteps", "boundary_ratio", "num_experts"}
        if cls_name != VACE_CLASS:  # diffusers' WanTransformer3DModel ignores VACE keys
            names -= set(VACE_DEFAULTS)
        kwargs = {k: v for k, v in config.items() if k in names}
        if cls_name == VACE_CLASS:
            kwargs = {**VACE_DEFAULTS, **kwargs}
        if kwargs.get("out_channels") is None:
            kwargs["out_channels"] = kwargs.get("in_channels", 16)
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    def to_diffusers_config(self) -> dict:
        """The `WanTransformer3DModel` config dict (what diffusers writes to config.json); a VACE config:
        `WanVACETransformer3DModel`'s, with vace_layers and vace_in_channels."""
        skip = {"expand_timesteps", "boundary_ratio", "num_experts"} | (set() if self.has_vace else set(VACE_DEFAULTS))
        out = {"_class_name": VACE_CLASS if self.has_vace else "WanTransformer3DModel", "_diffusers_version": "0.42.1"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_state_dict(cls, sd: dict, **pipeline_fields) -> "WanConfig":
        """Derive the config from weight shapes of an original/ComfyUI or diffusers state dict.

        Only shapes are read (meta tensors or safetensors slices are fine). Pipeline-level fields
        (expand_timesteps, boundary_ratio, num_experts) cannot be seen in weights: pass them.
        VACE (`vace_blocks.N.` keys): vace_in_channels from `vace_patch_embedding.weight`; vace_layers cannot be
        seen either: pass it, else N blocks over L layers are taken as evenly spaced, 0, s, 2s, ... with
        s = ceil(L / N) (Wan2.1-VACE 1.3B: every 2nd of 30, 14B: every 5th of 40, and original Wan's default),
        a ValueError when no such spacing gives N blocks.
        A missing key raises KeyError naming it; a tensor of the wrong rank, a zero or negative size or
        block indices other than 0..N-1 raise ValueError naming the key.
        """
        keys = set(sd)
        if "head.modulation" in keys:
            names = _ORIGINAL_KEYS
        elif "scale_shift_table" in keys:
            names = _DIFFUSERS_KEYS
        else:
            raise ValueError("cannot derive a Wan config: the state dict has neither 'head.modulation' (original/"
                             f"ComfyUI) nor 'scale_shift_table' (diffusers); first keys: {sorted(keys)[:8]}")

        def shape(role: str, ndim: int, optional: bool = False) -> tuple[int, ...] | None:
            key = names[role]
            if optional and key not in keys:
                return None
            s = _shape(sd[key])
            if len(s) != ndim or min(s) < 1:
                raise ValueError(f"cannot derive a Wan config: {key} has shape {s}, expected {ndim} positive sizes")
            return s

        dim = shape("modulation", 3)[-1]
        patch_w = shape("patch", 5)
        patch, rows = patch_w[2:], shape("head", 2)[0]
        if rows % _prod(patch):
            raise ValueError(f"cannot derive a Wan config: {names['head']} has {rows} rows, not a multiple of the "
                             f"patch volume {patch}")
        if dim % HEAD_DIM:
            raise ValueError(f"model width {dim} (from the head modulation) is not a multiple of head_dim {HEAD_DIM}")
        image, pos = shape("image", 1, optional=True), shape("pos", 3, optional=True)
        image_dim = image[0] if image else None
        vace = _vace_fields(sd, keys, num_blocks(keys), pipeline_fields.pop("vace_layers", None))
        return cls(num_attention_heads=dim // HEAD_DIM, attention_head_dim=HEAD_DIM, in_channels=patch_w[1],
                   out_channels=rows // _prod(patch), text_dim=shape("text", 2)[1], freq_dim=shape("time", 2)[1],
                   ffn_dim=shape("ffn", 2)[0], num_layers=num_blocks(keys), patch_size=patch, image_dim=image_dim,
                   added_kv_proj_dim=dim if image_dim is not None else None, pos_embed_seq_len=pos[1] if pos else None,
                   **vace, **pipeline_fields)


def _vace_fields(sd: dict, keys: set, num_layers: int, vace_layers=None) -> dict:
    """vace_layers / vace_in_channels of a state dict (see `WanConfig.from_state_dict`); {} without VACE keys."""
    idx = {int(m.group(1)) for k in keys if (m := _VACE_INDEX.match(k))}
    if not idx and "vace_patch_embedding.weight" not in keys:
        return {}
    if not idx or len(idx) != max(idx) + 1:
        raise ValueError(f"VACE block indices of the state dict are not 0..N-1: {len(idx)} distinct, first "
                         f"{sorted(idx)[:4]}")
    s = _shape(sd["vace_patch_embedding.weight"])
    if len(s) != 5 or min(s) < 1:
        raise ValueError(f"cannot derive a Wan config: vace_patch_embedding.weight has shape {s}, expected 5 "
                         "positive sizes")
    if vace_layers is None:
        step = -(-num_layers // len(idx))
        vace_layers = tuple(range(0, num_layers, step))
        if len(vace_layers) != len(idx):
            raise ValueError(f"cannot derive vace_layers: {len(idx)} VACE blocks over {num_layers} layers are not "
                             "evenly spaced from 0; pass the config (vace_layers) explicitly")
    elif len(vace_layers) != len(idx):
        raise ValueError(f"vace_layers {list(vace_layers)} lists {len(vace_layers)} layers, the state dict has "
                         f"{len(idx)} VACE blocks")
    return {"vace_layers": tuple(vace_layers), "vace_in_channels": s[1]}


_ORIGINAL_KEYS = dict(modulation="head.modulation", patch="patch_embedding.weight", head="head.head.weight",
                      ffn="blocks.0.ffn.0.weight", text="text_embedding.0.weight", time="time_embedding.0.weight",
                      image="img_emb.proj.0.weight", pos="img_emb.emb_pos")
_DIFFUSERS_KEYS = dict(modulation="scale_shift_table", patch="patch_embedding.weight", head="proj_out.weight",
                       ffn="blocks.0.ffn.net.0.proj.weight", text="condition_embedder.text_embedder.linear_1.weight",
                       time="condition_embedder.time_embedder.linear_1.weight",
                       image="condition_embedder.image_embedder.norm1.weight",
                       pos="condition_embedder.image_embedder.pos_embed")


def block_indices(keys) -> set[int]:
    """The N of every `blocks.N.` key."""
    return {int(m.group(1)) for k in keys if (m := _BLOCK_INDEX.match(k))}


def num_blocks(keys) -> int:
    """The number of transformer blocks of a state dict's keys (ValueError unless they are 0..N-1)."""
    idx = block_indices(keys)
    if not idx or len(idx) != max(idx) + 1:
        raise ValueError(f"block indices of the state dict are not 0..N-1: {len(idx)} distinct, "
                         f"first {sorted(idx)[:4]}, last {max(idx, default=None)}")
    return len(idx)


def read_json(path) -> dict:
    """The JSON object in file `path`, read strictly: a regular file (a FIFO would block) of at most
    MAX_JSON_BYTES holding one object, no key twice (json.load keeps the last). ValueError naming the file."""
    path = os.fspath(path)
    try:
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("not a regular file")
            if st.st_size > MAX_JSON_BYTES:
                raise ValueError(f"{st.st_size} bytes, more than the {MAX_JSON_BYTES} a config or index may have")
            data = json.loads(f.read(), object_pairs_hook=_unique_keys)
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"cannot read JSON file {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape) if hasattr(t, "shape") else tuple(t.get_shape())


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


_14B = dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)
_I2V21 = dict(in_channels=36, out_channels=16, image_dim=1280, added_kv_proj_dim=5120)

PRESETS: dict[str, WanConfig] = {
    "wan2.1-t2v-1.3b": WanConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "wan2.1-t2v-14b": WanConfig(**_14B),
    "wan2.1-i2v-14b-480p": WanConfig(**_14B, **_I2V21),
    "wan2.1-i2v-14b-720p": WanConfig(**_14B, **_I2V21),
    "wan2.1-flf2v-14b": WanConfig(**_14B, **_I2V21, pos_embed_seq_len=514),
    "wan2.2-t2v-a14b": WanConfig(**_14B, boundary_ratio=0.875, num_experts=2),
    "wan2.2-i2v-a14b": WanConfig(**_14B, in_channels=36, out_channels=16, boundary_ratio=0.9, num_experts=2),
    "wan2.2-ti2v-5b": WanConfig(num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48,
                                out_channels=48, expand_timesteps=True),
    # Wan2.1-VACE (diffusers' scripts/convert_wan_to_diffusers.py): the T2V model + a VACE block every 2nd / 5th layer
    "wan2.1-vace-1.3b": WanConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30,
                                  vace_layers=tuple(range(0, 30, 2)), vace_in_channels=96),
    "wan2.1-vace-14b": WanConfig(**_14B, vace_layers=tuple(range(0, 40, 5)), vace_in_channels=96),
    # tiny configs for tests and the demo: real head_dim 128, 2 heads, 2 layers
    "tiny-t2v": WanConfig(num_attention_heads=2, ffn_dim=512, num_layers=2, text_dim=64, freq_dim=64),
    "tiny-i2v": WanConfig(num_attention_heads=2, ffn_dim=512, num_layers=2, text_dim=64, freq_dim=64,
                          in_channels=36, out_channels=16, image_dim=64, added_kv_proj_dim=256),
    "tiny-flf2v": WanConfig(num_attention_heads=2, ffn_dim=512, num_layers=2, text_dim=64, freq_dim=64,
                            in_channels=36, out_channels=16, image_dim=64, added_kv_proj_dim=256,
                            pos_embed_seq_len=514),
    "tiny-ti2v": WanConfig(num_attention_heads=2, ffn_dim=512, num_layers=2, text_dim=64, freq_dim=64,
                           in_channels=48, out_channels=48, expand_timesteps=True),
    "tiny-t2v-a14b": WanConfig(num_attention_heads=2, ffn_dim=512, num_layers=2, text_dim=64, freq_dim=64,
                               boundary_ratio=0.875, num_experts=2),
    "tiny-vace": WanConfig(num_attention_heads=2, ffn_dim=512, num_layers=4, text_dim=64, freq_dim=64,
                           vace_layers=(0, 2), vace_in_channels=96),
}
