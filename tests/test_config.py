"""wan_model/core/config.py: the presets against the reference table, unknown names, the round trip through
diffusers' config and our state-dict key namings, and diffusers accepting the configs we write."""

from __future__ import annotations

import pytest
import torch

from wan_model.core.config import PRESETS, WanConfig
from wan_model.io.checkpoint import diffusers_keys, native_to_diffusers
from wan_model.model import WanModel


def test_presets_match_reference_table():
    p = PRESETS
    assert (p["wan2.1-t2v-1.3b"].dim, p["wan2.1-t2v-1.3b"].num_attention_heads, p["wan2.1-t2v-1.3b"].ffn_dim,
            p["wan2.1-t2v-1.3b"].num_layers) == (1536, 12, 8960, 30)
    for name in ("wan2.1-t2v-14b", "wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p", "wan2.1-flf2v-14b",
                 "wan2.2-t2v-a14b", "wan2.2-i2v-a14b"):
        assert (p[name].dim, p[name].ffn_dim, p[name].num_layers) == (5120, 13824, 40), name
    assert p["wan2.1-i2v-14b-480p"].image_dim == 1280 and p["wan2.1-i2v-14b-480p"].added_kv_proj_dim == 5120
    assert p["wan2.1-flf2v-14b"].pos_embed_seq_len == 514
    assert p["wan2.2-i2v-a14b"].in_channels == 36 and not p["wan2.2-i2v-a14b"].has_image
    assert (p["wan2.2-t2v-a14b"].boundary_ratio, p["wan2.2-i2v-a14b"].boundary_ratio) == (0.875, 0.9)
    ti2v = p["wan2.2-ti2v-5b"]
    assert (ti2v.dim, ti2v.ffn_dim, ti2v.num_layers, ti2v.in_channels, ti2v.expand_timesteps) == \
        (3072, 14336, 30, 48, True)
    assert all(c.attention_head_dim == 128 and c.rope_dims == (44, 42, 42) for c in p.values())


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match="unknown Wan variant 'wan3-t2v'.*wan2.1-t2v-1.3b"):
        WanConfig.from_preset("wan3-t2v")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in PRESETS])
def test_config_round_trips(name):
    cfg = PRESETS[name]
    pipeline = dict(expand_timesteps=cfg.expand_timesteps, boundary_ratio=cfg.boundary_ratio,
                    num_experts=cfg.num_experts)
    assert WanConfig.from_diffusers_config(cfg.to_diffusers_config()).replace(**pipeline) == cfg
    meta = WanModel(cfg, impl="ref", device="meta")
    sd = native_to_diffusers(dict(meta.state_dict()), cfg)
    assert set(sd) == diffusers_keys(cfg)
    assert WanConfig.from_state_dict(sd, **pipeline) == cfg
    from wan_model.io.checkpoint import diffusers_to_original_key
    assert WanConfig.from_state_dict({diffusers_to_original_key(k): v for k, v in sd.items()}, **pipeline) == cfg


def test_diffusers_config_keys_accepted_by_diffusers():
    from diffusers import WanTransformer3DModel
    for name in ("tiny-i2v", "tiny-flf2v"):
        cfg = PRESETS[name].to_diffusers_config()
        with torch.device("meta"):
            WanTransformer3DModel.from_config(cfg)
