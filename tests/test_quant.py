"""The quantization-method interface (wan_model/quant): one quantizer per method, shared by the in-memory
`quantize` and the streaming `convert_nvfp4`; a toy method (int8 per output row, weight only) registers through
the interface and round-trips through a checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from wan_model.testing import make_inputs
from wan_model import WanModel, quant
from wan_model.cli import random_model
from wan_model.core.config import WanConfig
from wan_model.core.model import StackedKV, split_kv
from wan_model.io.convert import convert_nvfp4

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# a toy method: int8 weights, one fp32 decode scale per output row (w = weight * weight_scale)

@dataclasses.dataclass(frozen=True)
class Int8Config(quant.QuantConfig):
    impl: str | None = None

    def to_json(self) -> dict:
        return {"quant_method": "int8-row", "keep": list(self.keep) if self.layers is None else None}


class Int8Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True, *, impl="auto", device=None, dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.impl = in_features, out_features, impl
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    def dense_weight(self, dtype=torch.float32):
        return (self.weight.float() * self.weight_scale).to(dtype)

    def forward(self, x):
        return F.linear(x, self.dense_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Int8StackedKV(Int8Linear):
    def __init__(self, num_layers, dim, in_dim, **kw):
        super().__init__(in_dim, num_layers * 2 * dim, **kw)
        self.norm_k = nn.Parameter(torch.ones(num_layers, dim, device=self.weight.device))

    def forward(self, ctx, num_heads, eps):
        return split_kv(super().forward(ctx), self.norm_k, num_heads, eps)


class Int8(quant.Method):
    name, config, modules, suffixes = "int8-row", Int8Config, (Int8Linear,), ("weight", "weight_scale")

    def quantize_weight(self, w, config, scale=None):
        s = w.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / 127
        return {"weight": (w.float() / s).round().clamp(-127, 127).to(torch.int8), "weight_scale": s}

    def stored(self, config, shape):
        return {"weight": (torch.int8, shape), "weight_scale": (torch.float32, (shape[0], 1))}

    def module(self, old, config, impl, device, dtype=None, **options):
        kw = dict(impl=impl, device=device, **({} if dtype is None else {"dtype": dtype}))
        if isinstance(old, StackedKV):
            return Int8StackedKV(*old.norm_k.shape, old.weight.shape[1], **kw)
        return Int8Linear(old.in_features, old.out_features, old.bias is not None, **kw)

    def dequantize(self, tensors, dtype=torch.float32):
        return (tensors["weight"].float() * tensors["weight_scale"]).to(dtype)

    def checkpoint_layers(self, sd):
        return tuple(sorted(k.removesuffix(".weight") for k, v in sd.items()
                            if k.endswith(".weight") and v.dtype == torch.int8 and k + "_scale" in sd))


@pytest.fixture
def int8():
    method = quant.register(Int8())
    yield method
    del quant.METHODS[method.name]


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "t2v"
    random_model(WanConfig.from_preset("tiny-t2v"), seed=3).to_dtype(torch.bfloat16).save_pretrained(path)
    return path


def _bits(t):
    return t.reshape(-1).view(torch.uint8)


def _same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(_bits(a[k]), _bits(b[k])), k


@pytest.mark.slow
def test_toy_method_round_trips_through_a_checkpoint(int8, dense_ckpt, tmp_path):
    dense = WanModel.from_pretrained(dense_ckpt, dtype=torch.float32)
    model = copy.deepcopy(dense).quantize("int8-row")
    assert isinstance(model.blocks[0].attn1.to_qkv, Int8Linear) and isinstance(model.cross_kv, Int8StackedKV)
    assert isinstance(model.proj_out, nn.Linear)  # DEFAULT_KEEP
    inputs = make_inputs(model.config)
    want, got = dense(*inputs), model(*inputs)
    assert (got - want).norm() < 0.05 * want.norm()
    model.save_pretrained(tmp_path / "q")
    assert load_file(tmp_path / "q" / "diffusion_pytorch_model.safetensors")["blocks.0.attn1.to_q.weight"].dtype \
        == torch.int8
    loaded = WanModel.from_pretrained(tmp_path / "q", dtype=torch.float32)
    assert type(loaded.cross_kv) is Int8StackedKV
    _same(loaded.state_dict(), model.state_dict())
    assert torch.equal(loaded(*inputs), got)
    # the streaming converter writes the same file, through the same quantizer
    convert_nvfp4(dense_ckpt, tmp_path / "s", config=Int8Config(), dtype=torch.float32, progress=False)
    _same(load_file(tmp_path / "s" / "diffusion_pytorch_model.safetensors"),
          load_file(tmp_path / "q" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nvfp4", "fp8"])
def test_in_memory_and_streaming_call_the_one_quantizer(method, dense_ckpt, tmp_path, monkeypatch):
    m = quant.get(method)
    calls = []
    original = m.quantize_weight
    monkeypatch.setattr(m, "quantize_weight", lambda w, config, scale=None: calls.append(w.shape) or
                        original(w, config, scale))
    model = WanModel.from_pretrained(dense_ckpt, dtype=torch.bfloat16).quantize(method)
    in_memory = len(calls)
    natives = [n for n, mod in model.named_modules() if quant.method_of_module(mod) is m]
    assert in_memory == len(natives) > 0  # one call per quantized module (a fused group is one)
    calls.clear()
    convert_nvfp4(dense_ckpt, tmp_path / "s", config=m.config(), progress=False)
    layers = {k.removesuffix(".weight_scale") for k in load_file(tmp_path / "s" / "diffusion_pytorch_model.safetensors")
              if k.endswith(".weight_scale")}
    # one call per diffusers layer (members of a group too); a format storing a layer's tensors as units of their
    # own (FP8 in diffusers' files) quantizes it once per unit
    assert len(calls) == len(layers) * (1 if method == "nvfp4" else len(m.suffixes)) and len(layers) > in_memory


def test_one_quantizer_per_method_in_the_package():
    """The kernel-level quantizers are called from one place per method: wan_model/quant/<method>.py."""
    calls = {"nvfp4_quantize(": "nvfp4.py", "fp8.quantize(": "fp8.py", "global_scale(": "nvfp4.py",
             "scale_of(": "fp8.py"}
    for path in (ROOT / "wan_model").rglob("*.py"):
        text = path.read_text()
        for call, home in calls.items():
            if re.search(r"\b" + re.escape(call), text):
                assert path == ROOT / "wan_model" / "quant" / home, (call, path)


def test_registry_lookups():
    assert set(quant.METHODS) >= {"nvfp4", "fp8"}
    assert quant.method_of(quant.NVFP4Config()) is quant.get("nvfp4")
    assert quant.method_of_module(nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="unknown quantization method 'int4'"):
        quant.get("int4")
