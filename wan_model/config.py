"""WanConfig: the hyper-parameters of a Wan2.1/2.2 DiT, with named presets (REFERENCE.md section 2).

Field names follow diffusers' `WanTransformer3DModel` config (so `to_diffusers_config()` is a plain
dict copy), plus three pipeline-level fields diffusers keeps in the pipeline: `expand_timesteps`
(TI2V per-token timesteps), `boundary_ratio` and `num_experts` (Wan2.2 two-expert models).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import torch

HEAD_DIM = 128
TEXT_TOKENS = 512  # text context length of umT5, hard-wired in diffusers' I2V attention split


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
    # pipeline-level (not part of diffusers' transformer config)
    expand_timesteps: bool = False        # TI2V: timestep per token [B, S]
    boundary_ratio: float | None = None   # two-expert models: high-noise expert while t >= ratio * 1000
    num_experts: int = 1

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        if self.attention_head_dim % 2:
            raise ValueError(f"attention_head_dim must be even for RoPE, got {self.attention_head_dim}")
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"only qk_norm='rms_norm_across_heads' is supported, got {self.qk_norm!r}")
        if not self.cross_attn_norm:
            raise ValueError("only cross_attn_norm=True is supported (every Wan checkpoint uses it)")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(f"image_dim ({self.image_dim}) and added_kv_proj_dim ({self.added_kv_proj_dim}) "
                             "must be given together (Wan2.1 I2V/FLF2V) or both be None")
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.dim:
            raise ValueError(f"added_kv_proj_dim must equal dim={self.dim}, got {self.added_kv_proj_dim}")
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError("pos_embed_seq_len (FLF2V) needs an image embedder (image_dim)")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def has_image(self) -> bool:
        """Wan2.1 I2V/FLF2V: CLIP image tokens with their own cross-attention K/V."""
        return self.image_dim is not None

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
    def from_diffusers_config(cls, config: dict | str | os.PathLike) -> "WanConfig":
        """From a diffusers transformer config dict, a config.json path, or a model directory."""
        if not isinstance(config, dict):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path) as f:
                    config = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read a diffusers config from {path}: {e}") from e
        cls_name = config.get("_class_name", "WanTransformer3DModel")
        if cls_name != "WanTransformer3DModel":
            raise ValueError(f"config is for {cls_name!r}, expected 'WanTransformer3DModel'")
        names = {f.name for f in dataclasses.fields(cls)} - {"expand_timesteps", "boundary_ratio", "num_experts"}
        kwargs = {k: v for k, v in config.items() if k in names}
        if kwargs.get("out_channels") is None:
            kwargs["out_channels"] = kwargs.get("in_channels", 16)
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict:
        """The `WanTransformer3DModel` config dict (what diffusers writes to config.json)."""
        skip = {"expand_timesteps", "boundary_ratio", "num_experts"}
        out = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1"}
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
        """
        keys = set(sd)
        if "head.modulation" in keys:  # original / ComfyUI names
            dim = _shape(sd["head.modulation"])[-1]
            patch = tuple(_shape(sd["patch_embedding.weight"])[2:])
            out = _shape(sd["head.head.weight"])[0] // _prod(patch)
            ffn = _shape(sd["blocks.0.ffn.0.weight"])[0]
            text_dim = _shape(sd["text_embedding.0.weight"])[1]
            freq_dim = _shape(sd["time_embedding.0.weight"])[1]
            image_dim = _shape(sd["img_emb.proj.0.weight"])[0] if "img_emb.proj.0.weight" in keys else None
            pos = _shape(sd["img_emb.emb_pos"])[1] if "img_emb.emb_pos" in keys else None
            block_re = re.compile(r"blocks\.(\d+)\.")
        elif "scale_shift_table" in keys:  # diffusers names
            dim = _shape(sd["scale_shift_table"])[-1]
            patch = tuple(_shape(sd["patch_embedding.weight"])[2:])
            out = _shape(sd["proj_out.weight"])[0] // _prod(patch)
            ffn = _shape(sd["blocks.0.ffn.net.0.proj.weight"])[0]
            text_dim = _shape(sd["condition_embedder.text_embedder.linear_1.weight"])[1]
            freq_dim = _shape(sd["condition_embedder.time_embedder.linear_1.weight"])[1]
            k = "condition_embedder.image_embedder.norm1.weight"
            image_dim = _shape(sd[k])[0] if k in keys else None
            k = "condition_embedder.image_embedder.pos_embed"
            pos = _shape(sd[k])[1] if k in keys else None
            block_re = re.compile(r"blocks\.(\d+)\.")
        else:
            raise ValueError("cannot derive a Wan config: the state dict has neither 'head.modulation' (original/"
                             f"ComfyUI) nor 'scale_shift_table' (diffusers); first keys: {sorted(keys)[:8]}")
        if dim % HEAD_DIM:
            raise ValueError(f"model width {dim} (from the head modulation) is not a multiple of head_dim {HEAD_DIM}")
        layers = 1 + max((int(m.group(1)) for k in keys if (m := block_re.match(k))), default=-1)
        return cls(num_attention_heads=dim // HEAD_DIM, attention_head_dim=HEAD_DIM,
                   in_channels=_shape(sd["patch_embedding.weight"])[1], out_channels=out, text_dim=text_dim,
                   freq_dim=freq_dim, ffn_dim=ffn, num_layers=layers, patch_size=patch, image_dim=image_dim,
                   added_kv_proj_dim=dim if image_dim is not None else None, pos_embed_seq_len=pos,
                   **pipeline_fields)


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
}
