"""wan_model/io/source.py: one `open_source` that load, convert, quantized convert and GGUF convert all start from
(counted), what it gives for each kind of source, and the destination checked once per conversion."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from wan_model.compat.layouts import CheckpointError
from wan_model.core.config import WanConfig
from wan_model.io import _atomic, checkpoint as ckpt, convert
from wan_model.io.source import Source, open_source
from wan_model.model import WanModel
from wan_model.testing import random_model

CFG = WanConfig.from_preset("tiny-t2v").replace(num_layers=2, ffn_dim=64)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same tiny model as a diffusers dir, a pipeline dir (TI2V-style expand_timesteps), an original file,
    a ComfyUI file and a GGUF file."""
    root = tmp_path_factory.mktemp("sources")
    model = random_model(CFG, seed=3)
    model.save_pretrained(root / "dir")
    (root / "pipe").mkdir()
    model.save_pretrained(root / "pipe" / "transformer")
    (root / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                               "expand_timesteps": True}))
    model.save_pretrained(root / "orig.safetensors", format="original")
    model.save_pretrained(root / "comfy.safetensors", format="comfyui")
    convert.convert_gguf(root / "orig.safetensors", root / "m.gguf", "F32", progress=False)
    return root, model


@pytest.fixture
def opened(monkeypatch):
    """Every Source built while the test runs (the class itself is counted, so no caller can bypass it)."""
    seen = []
    real = Source.__init__

    def init(self, *args, **kw):
        real(self, *args, **kw)
        seen.append(self)

    monkeypatch.setattr(Source, "__init__", init)
    return seen


def test_what_a_source_gives_for_each_kind(files):
    root, model = files
    d = open_source(root / "dir")
    assert (d.kind, d.declared, d.fields, d.hint) == ("diffusers", CFG, {}, None)
    assert [p.rsplit("/", 1)[1] for p in d.files] == ["diffusion_pytorch_model.safetensors"]
    p = open_source(root / "pipe")  # a pipeline dir opens its transformer/ and carries model_index's field
    assert p.kind == "diffusers" and p.where == str(root / "pipe" / "transformer")
    assert p.fields == {"expand_timesteps": True}
    sd, _ = d.read()
    for name in ("orig.safetensors", "comfy.safetensors", "m.gguf"):
        s = open_source(root / name)
        assert s.kind == ("gguf" if name.endswith("gguf") else "safetensors") and s.declared is None
        got, source = s.read()
        assert set(got) == set(sd), name  # diffusers-named
        assert all(torch.equal(got[k], sd[k]) for k in sd), name
        assert s.config() == s.config(got) == CFG  # from the headers (lazy view) and from the tensors alike
        lazy = s.lazy()
        try:
            assert set(lazy.meta()) == set(sd) and torch.equal(lazy.get("proj_out.weight"), sd["proj_out.weight"])
        finally:
            lazy.close()
        if name == "comfy.safetensors":
            assert source["proj_out.weight"] == "model.diffusion_model.head.head.weight"
    m = open_source(load_file(root / "orig.safetensors"))  # an in-memory state dict, original names
    assert m.kind == "dict" and m.config() == CFG and set(m.read()[0]) == set(sd)
    with pytest.raises(CheckpointError, match="read whole"):
        m.lazy()
    with pytest.raises(CheckpointError, match="GGUF file, which is not streamed"):
        open_source(root / "m.gguf").streamed()


def test_open_source_errors_name_the_path(files, tmp_path):
    root, _ = files
    with pytest.raises(CheckpointError, match="nope: no such file or directory"):
        open_source(tmp_path / "nope")
    (tmp_path / "two" / "transformer").mkdir(parents=True)
    (tmp_path / "two" / "transformer_2").mkdir()
    with pytest.raises(CheckpointError, match="two-expert pipeline: convert .*transformer and .*transformer_2"):
        open_source(tmp_path / "two")
    (tmp_path / "model.pt").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"model.pt: only .safetensors checkpoints are loaded"):
        open_source(tmp_path / "model.pt")


def test_a_state_dict_in_any_naming_loads_as_its_file_does(files):
    root, model = files
    with pytest.raises(ValueError, match="subfolder='transformer' needs a path"):
        WanModel.from_pretrained(load_file(root / "orig.safetensors"), subfolder="transformer")
    for name in ("orig.safetensors", "comfy.safetensors", "dir/diffusion_pytorch_model.safetensors"):
        a = WanModel.from_pretrained(load_file(root / name), dtype=torch.float32, impl="ref")
        b = ckpt.load_model(root / name.split("/")[0], dtype=torch.float32, impl="ref")
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_every_reader_starts_from_one_source(files, tmp_path, opened):
    """load, convert, quantized convert and GGUF convert each open exactly one Source (a two-expert pipeline
    two: one per expert), and the pipeline field reaches the loaded config."""
    root, _ = files
    runs = {
        "load dir": lambda: WanModel.from_pretrained(root / "pipe", dtype=torch.float32),
        "load file": lambda: WanModel.from_pretrained(root / "comfy.safetensors", dtype=torch.float32),
        "load gguf": lambda: WanModel.from_pretrained(root / "m.gguf", dtype=torch.float32),
        "convert": lambda: convert.convert_checkpoint(root / "dir", tmp_path / "a.safetensors", "original",
                                                      progress=False),
        "convert gguf source": lambda: convert.convert_checkpoint(root / "m.gguf", tmp_path / "b", "diffusers",
                                                                  progress=False),
        "quantized convert": lambda: convert.convert_checkpoint(root / "orig.safetensors", tmp_path / "c",
                                                                "diffusers", quantize="fp8", progress=False),
        "gguf convert": lambda: convert.convert_gguf(root / "dir", tmp_path / "d.gguf", "Q8_0", progress=False),
    }
    for what, run in runs.items():
        opened.clear()
        out = run()
        assert len(opened) == 1, (what, [s.where for s in opened])
        if what == "load dir":
            assert out.config.expand_timesteps is True
    two = tmp_path / "two"
    for sub in ("transformer", "transformer_2"):
        random_model(CFG, seed=1).save_pretrained(two / sub)
    opened.clear()
    assert isinstance(ckpt.load_model(two, dtype=torch.float32), ckpt.WanExperts)
    assert [s.where.rsplit("/", 1)[1] for s in opened] == ["transformer", "transformer_2"]


@pytest.mark.parametrize("kind", ["dense", "quantized", "gguf"])
def test_a_conversion_checks_its_destination_once(files, tmp_path, monkeypatch, kind):
    """One check of the destination before anything is read (the atomic writer's own checks when it stages and
    commits are not counted: they are its guarantee against a destination that changed meanwhile)."""
    root, _ = files
    calls = []
    real = _atomic.check_destination

    def check(path, *args, **kw):
        calls.append(str(path))
        return real(path, *args, **kw)

    for module in (ckpt, convert):
        monkeypatch.setattr(module, "check_destination", check)
    if kind == "gguf":
        convert.convert_gguf(root / "dir", tmp_path / "out.gguf", "F16", progress=False)
    else:
        convert.convert_checkpoint(root / "dir", tmp_path / "out", "diffusers", progress=False,
                                   quantize="nvfp4" if kind == "quantized" else None)
    assert len(calls) == 1, calls
