"""wan_model.compat.quantize: the layer groups come from the layouts and the config alone (no model is built), and
equal the model's own nn.Linear modules for every preset."""

from __future__ import annotations

import pytest
import torch.nn as nn

from wan_model.compat.layouts import native_direct
from wan_model.compat.quantize import NEVER_QUANTIZED, layer_groups
from wan_model.core.config import PRESETS, WanConfig
from wan_model.core.model import WanTransformer


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_layer_groups_are_the_models_linear_modules(preset):
    cfg = WanConfig.from_preset(preset)
    cfg = cfg.replace(num_layers=2, **({"vace_layers": (0,)} if cfg.has_vace else {}))  # VACE: layers < 2 too
    meta = WanTransformer(cfg, impl="ref", device="meta")
    direct = [n[:-7] for d, n in native_direct(cfg).items() if d.endswith(".weight") and n.endswith(".weight")]
    linear = {n for n in direct if isinstance(meta.get_submodule(n), nn.Linear)}
    assert linear and len(linear) < len(direct)  # some one-to-one weights are not Linear (patch embedding, norms)
    groups = {native for native, _ in layer_groups(cfg)}
    singles = groups & set(direct)
    assert singles == {n for n in linear if not n.startswith(NEVER_QUANTIZED)}
    for native in groups - singles:  # the fused QKV and the stacked cross-attention K/V
        assert isinstance(meta.get_submodule(native), nn.Module) and native.endswith(("to_qkv", "cross_kv",
                                                                                         "cross_kv_img"))
