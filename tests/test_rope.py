"""wan_model/core/rope.py: the RoPE tables bit-exact vs diffusers' WanRotaryPosEmbed, their layout, cache and
length check."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wan_model.core.rope import rope_tables


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(f=st.integers(1, 9), h=st.integers(1, 33), w=st.integers(1, 33))
def test_rope_bit_exact_vs_diffusers(f, h, w):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
    rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024)
    cos_ref, sin_ref = rope(torch.empty(1, 1, f, 2 * h, 2 * w))     # [1, S, 1, 128], pairs repeated
    cos, sin = rope_tables(128, (f, h, w))
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (f * h * w, 64)
    assert torch.equal(cos, cos_ref[0, :, 0, 0::2]) and torch.equal(cos, cos_ref[0, :, 0, 1::2])
    assert torch.equal(sin, sin_ref[0, :, 0, 0::2]) and torch.equal(sin, sin_ref[0, :, 0, 1::2])


def test_rope_layout_and_cache():
    cos, sin = rope_tables(128, (3, 4, 5))
    assert rope_tables(128, (3, 4, 5))[0] is cos  # cached per grid
    # token (f, h, w) = (2, 1, 3) -> index 2*20 + 1*5 + 3; t-angles 0..21, h 22..42, w 43..63
    i = 2 * 20 + 1 * 5 + 3
    ang = torch.atan2(sin[i], cos[i])
    assert torch.allclose(ang[0], torch.tensor(2.0)) and torch.allclose(ang[1], torch.tensor(2 * 10000 ** (-2 / 44)))
    assert torch.allclose(ang[22], torch.tensor(1.0)) and torch.allclose(ang[43], torch.tensor(3.0))
    with pytest.raises(ValueError, match="exceeds rope_max_seq_len"):
        rope_tables(128, (2, 2000, 2))
