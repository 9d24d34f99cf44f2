"""WanModel.load_lora / unload_lora against diffusers' own LoRA loading (`load_lora_weights` + `fuse_lora` of a
WanImageToVideoPipeline) on the same files, in the three namings, written from the same random factors.

Tolerances (fp32): outputs 1e-5 absolute (magnitude ~5; the base models differ by ~2e-6, one rounding instead of
several in q/k norm + RoPE and attention, see test_diffusers_dropin.py); fused weights 1e-6 (magnitude ~0.5:
diffusers folds alpha / rank into the factors before the product, we scale the product, a few fp32 ulps).
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors.torch import save_file


from wan_model.testing import make_inputs, random_model
from wan_model.core.config import WanConfig
from wan_model.compat.layouts import CheckpointError, diffusers_to_original_key, native_to_diffusers
from wan_model.compat.lora import DIFFUSERS_WEIGHT_NAME, METADATA_KEY, adapters

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from wan_model.compat.diffusers import to_diffusers_model  # noqa: E402

OUT_TOL, WEIGHT_TOL = 1e-5, 1e-6
I2V = WanConfig.from_preset("tiny-i2v")
RANK, ALPHA, SCALE = 4, 8.0, 0.7


@pytest.fixture(scope="module")
def base():
    return random_model(I2V, seed=5).eval()


def _fresh(model):
    """(a deep copy of `model`, a diffusers WanTransformer3DModel with the same weights; no shared storage)."""
    return copy.deepcopy(model), to_diffusers_model(copy.deepcopy(model)).eval()


def _pipe(transformer):
    """diffusers' I2V pipeline holding only the transformer: its load_lora_weights / fuse_lora are the ones under
    test (file reading, key conversion, alpha handling, PEFT injection and merging)."""
    from diffusers import WanImageToVideoPipeline

    return WanImageToVideoPipeline(tokenizer=None, text_encoder=None, image_encoder=None, image_processor=None,
                                   transformer=transformer, vae=None, scheduler=None)


def _block_layers(ref) -> list[str]:
    """diffusers names of every Linear in the blocks: self/cross-attention q, k, v, o, I2V add_k/add_v, FFN."""
    return [n for n, m in ref.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)]


def _factors(model, layers, seed=0, b_scale=0.05):
    """Random (lora_A [r, K], lora_B [N, r]) per diffusers layer name of `model`."""
    ref = to_diffusers_model(model)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in layers:
        lin = ref.get_submodule(n)
        out[n] = (torch.randn(RANK, lin.in_features, generator=g) * lin.in_features ** -0.5,
                  torch.randn(lin.out_features, RANK, generator=g) * b_scale)
    return out


def _orig(layer: str) -> str:
    return diffusers_to_original_key(layer + ".weight")[: -len(".weight")]


def _write(naming: str, factors, path, alpha=ALPHA) -> str:
    """The same LoRA in one naming: diffusers (written by diffusers' own save_lora_weights, alpha in its
    metadata), original-Wan / ComfyUI or kohya / musubi (alpha tensors)."""
    if naming == "diffusers":
        from diffusers import WanPipeline

        sd = {}
        for n, (a, b) in factors.items():
            sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"] = a, b
        meta = {"r": RANK, "lora_alpha": alpha, "target_modules": sorted(factors)}
        WanPipeline.save_lora_weights(str(path), transformer_lora_layers=sd, transformer_lora_adapter_metadata=meta)
        return str(path / "pytorch_lora_weights.safetensors")
    sd = {}
    for n, (a, b) in factors.items():
        o = _orig(n)
        stem = f"diffusion_model.{o}" if naming == "original" else "lora_unet_" + o.replace(".", "_")
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = a, b
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    file = str(path / f"{naming}.safetensors")
    save_file(sd, file)
    return file


@torch.no_grad()
def _forward(model, cfg=I2V):
    x, t, text, img = make_inputs(cfg, seed=1)
    return model(x, t, text, img, return_dict=False)[0]


def _err(a, b) -> float:
    return (a - b).abs().max().item()


def _diffusers_fused(ref, *loads, scales=None):
    """diffusers: load_lora_weights of each (file, adapter) then fuse_lora(lora_scale=SCALE) (with `scales`:
    set_adapters(names, scales) first, fuse_lora at 1.0)."""
    pipe = _pipe(ref)
    for file, name in loads:
        pipe.load_lora_weights(file, adapter_name=name)
    if scales is not None:
        pipe.set_adapters([n for _, n in loads], scales)
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0 if scales is not None else SCALE)
    pipe.unload_lora_weights()  # fused weights stay: the plain model again
    return ref


def _weights_err(ours, ref) -> float:
    mine, theirs = native_to_diffusers(ours.state_dict(), ours.config), ref.state_dict()
    return max(_err(mine[k], theirs[k]) for k in theirs)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap) -> bool:
    """Bit-equal state dicts (float8 compared as bytes)."""
    def raw(t):
        return t.view(torch.uint8) if t.dtype.is_floating_point and t.element_size() == 1 else t
    sd = model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(raw(sd[k]), raw(snap[k])) for k in sd)


# ---------------------------------------------------------------------------------------------
# The three namings vs diffusers

@pytest.mark.slow
def test_three_namings_match_diffusers_fuse(base, tmp_path):
    """Every block Linear (self-attention q/k/v = our fused QKV, cross-attention k/v and I2V k_img/v_img = our
    stacked K/V, o, FFN), alpha 8 on rank 4: each file fused by diffusers and by us gives the same model."""
    factors = _factors(base, _block_layers(to_diffusers_model(base)))
    expected_base = _forward(base)
    fused = {}
    for naming in ("diffusers", "original", "kohya"):
        (tmp_path / naming).mkdir()
        file = _write(naming, factors, tmp_path / naming)
        ours, ref = _fresh(base)
        _diffusers_fused(ref, (file, "a"))
        ours.load_lora(file, scale=SCALE)
        expected, out = _forward(ref), _forward(ours)
        print(f"{naming}: LoRA effect {_err(expected, expected_base):.3f}, "
              f"ours vs diffusers {_err(out, expected):.2e}, "
              f"weights {_weights_err(ours, ref):.2e}")
        assert _err(expected, expected_base) > 0.1  # the adapter changes the output
        assert _err(out, expected) <= OUT_TOL
        assert _weights_err(ours, ref) <= WEIGHT_TOL
        fused[naming] = ours.state_dict()
    for naming in ("original", "kohya"):  # one model: the same deltas from any naming, bit for bit
        assert all(torch.equal(fused[naming][k], v) for k, v in fused["diffusers"].items())


@pytest.mark.slow
def test_original_naming_diff_b_and_outer_layers_match_diffusers(base, tmp_path):
    """`.diff_b` bias deltas (diffusers: PEFT lora_bias) on the fused QKV, the stacked K/V and the FFN; LoRAs on
    time_projection, the head, the time/text embedders and the image embedder; some layers without alpha."""
    outer = ["condition_embedder.time_proj", "proj_out", "condition_embedder.time_embedder.linear_2",
             "condition_embedder.text_embedder.linear_1", "condition_embedder.image_embedder.ff.net.0.proj"]
    factors = _factors(base, ["blocks.0.attn1.to_k", "blocks.1.attn2.to_v", "blocks.0.attn2.add_k_proj",
                              "blocks.0.attn2.add_v_proj", "blocks.1.ffn.net.0.proj"] + outer, seed=1)
    g = torch.Generator().manual_seed(2)
    sd = {}
    for i, (n, (a, b)) in enumerate(factors.items()):
        o = _orig(n)
        sd[f"diffusion_model.{o}.lora_down.weight"], sd[f"diffusion_model.{o}.lora_up.weight"] = a, b
        if n.startswith("blocks."):
            sd[f"diffusion_model.{o}.alpha"] = torch.tensor(ALPHA if i % 2 else float(RANK))
            sd[f"diffusion_model.{o}.diff_b"] = torch.randn(b.shape[0], generator=g) * 0.1
    file = str(tmp_path / "extras.safetensors")
    save_file(sd, file)
    ours, ref = _fresh(base)
    _diffusers_fused(ref, (file, "x"))
    ours.load_lora(file, scale=SCALE)
    expected, out = _forward(ref), _forward(ours)
    print(f"diff_b + outer layers: effect {_err(expected, _forward(base)):.3f}, ours vs diffusers "
          f"{_err(out, expected):.2e}, weights {_weights_err(ours, ref):.2e}")
    assert _err(expected, _forward(base)) > 0.05
    assert _err(out, expected) <= OUT_TOL
    assert _weights_err(ours, ref) <= WEIGHT_TOL


@pytest.mark.slow
def test_full_diffs_on_norms_modulation_and_stacked_weights(base, tmp_path):
    """`.diff` / `.diff_b` of norms, k-norms (self: inside qkv_rope; cross: the stacked norm_k), modulation and a
    cross-attention V weight (inside the stacked K/V): ComfyUI's rule p += scale * diff. diffusers' converter drops
    these keys, so the reference is the diffusers model with the deltas added to its own parameters."""
    g = torch.Generator().manual_seed(3)
    ref = to_diffusers_model(copy.deepcopy(base)).eval()
    params = dict(ref.named_parameters())
    deltas = {"blocks.0.norm2.weight": "blocks.0.norm3.diff", "blocks.0.norm2.bias": "blocks.0.norm3.diff_b",
              "blocks.1.attn1.norm_k.weight": "blocks.1.self_attn.norm_k.diff",
              "blocks.1.attn2.norm_k.weight": "blocks.1.cross_attn.norm_k.diff",
              "blocks.0.attn2.norm_added_k.weight": "blocks.0.cross_attn.norm_k_img.diff",
              "blocks.1.scale_shift_table": "blocks.1.modulation.diff", "scale_shift_table": "head.modulation.diff",
              "blocks.1.attn2.to_v.weight": "blocks.1.cross_attn.v.diff"}
    sd = {}
    with torch.no_grad():
        for name, key in deltas.items():
            d = torch.randn(params[name].shape, generator=g) * 0.1
            sd["diffusion_model." + key] = d
            params[name] += SCALE * d
    file = str(tmp_path / "diffs.safetensors")
    save_file(sd, file)
    ours = copy.deepcopy(base).load_lora(file, scale=SCALE)
    expected = _forward(ref)
    assert _err(expected, _forward(base)) > 0.05
    assert _err(_forward(ours), expected) <= OUT_TOL
    assert _weights_err(ours, ref) <= WEIGHT_TOL


# ---------------------------------------------------------------------------------------------
# Stacking and unloading

@pytest.mark.slow
def test_two_adapters_stack_and_unload_bit_exactly(base, tmp_path):
    layers = _block_layers(to_diffusers_model(base))
    file_a = _write("original", _factors(base, layers, seed=4), tmp_path)
    (tmp_path / "b").mkdir()
    file_b = _write("diffusers", _factors(base, layers[::3], seed=5), tmp_path / "b")
    snap = _snapshot(base)
    ours, ref = _fresh(base)
    _diffusers_fused(ref, (file_a, "a"), (file_b, "b"), scales=[0.5, 1.5])
    ours.load_lora(file_a, scale=0.5, adapter_name="a").load_lora(file_b, scale=1.5, adapter_name="b")
    assert _err(_forward(ours), _forward(ref)) <= OUT_TOL
    only_b = copy.deepcopy(base).load_lora(file_b, scale=1.5)
    ours.unload_lora("a")
    assert _same(ours, only_b.state_dict())  # exactly the model with b alone
    with pytest.raises(ValueError, match=r"no adapter 'a' is loaded \(loaded: \['b'\]\)"):
        ours.unload_lora("a")
    ours.unload_lora()
    assert _same(ours, snap) and adapters(ours) == []  # the original tensors, bit for bit
    assert _same(base, snap)  # and the fixture was never touched
    ours.unload_lora()  # nothing loaded: a no-op, as diffusers' unload_lora_weights


def test_adapter_names(base, tmp_path):
    file = _write("original", _factors(base, ["blocks.0.attn1.to_q"]), tmp_path)

    m = copy.deepcopy(base).load_lora(file).load_lora(file, 0.5)
    assert adapters(m) == [("original", 1.0), ("default_1", 0.5)]
    with pytest.raises(ValueError, match=r"an adapter named 'original' is loaded already"):
        m.load_lora(file, adapter_name="original")


@pytest.mark.slow
def test_bf16_model_rounds_once(base, tmp_path):
    """bf16 weights: round(original + delta a + delta b) in fp32, however many adapters; unload exact."""
    layers = ["blocks.0.attn1.to_v", "blocks.1.attn2.to_k"]
    file_a = _write("original", _factors(base, layers, seed=6), tmp_path)
    (tmp_path / "k").mkdir()
    file_b = _write("kohya", _factors(base, layers, seed=7), tmp_path / "k")
    m = copy.deepcopy(base).to_dtype(torch.bfloat16)
    snap = _snapshot(m)
    exact = copy.deepcopy(m).to_dtype(torch.float32).load_lora(file_a).load_lora(file_b, 0.5)  # the bf16 values
    m.load_lora(file_a).load_lora(file_b, 0.5)
    got = m.state_dict()
    for k, v in exact.state_dict().items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k
    assert not torch.equal(got["blocks.0.attn1.to_qkv.weight"], snap["blocks.0.attn1.to_qkv.weight"])
    m.unload_lora()
    assert _same(m, snap)


# ---------------------------------------------------------------------------------------------
# Quantized weights: dequantize, add, requantize

def _snr_db(x, ref) -> float:
    return 10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum()).item()


QUANT = {"nvfp4": ("nvfp4", None), "fp8": ("fp8", None), "fp8-per-channel": ("fp8", "per_channel")}


def _quantized(model, which: str):
    from wan_model.compat.quantize import FP8Config

    method, option = QUANT[which]
    return model.quantize(method, FP8Config(per_channel=True) if option == "per_channel" else None)


@pytest.mark.slow
@pytest.mark.parametrize("which", sorted(QUANT))
def test_quantized_weights_requantized(base, tmp_path, which):
    """LoRA on a quantized model (quantize, then load): every fused weight (QKV, stacked K/V incl. image, o, FFN) is
    requantize(dequantize(W) + delta); its error vs the exact dense fused weight is at most 2x that of
    quantizing the exact weight once (the first quantization's error plus the second's). Unload restores the
    quantized buffers bit for bit."""
    file = _write("original", _factors(base, _block_layers(to_diffusers_model(base)), seed=8, b_scale=0.3), tmp_path)
    dense = copy.deepcopy(base).load_lora(file, scale=SCALE)
    q = _quantized(copy.deepcopy(base), which)
    snap = _snapshot(q)
    q.load_lora(file, scale=SCALE)
    once = _quantized(copy.deepcopy(dense), which)  # the exact fused weights quantized once
    worst, seen = 0.0, set()
    for name, m in q.named_modules():
        if hasattr(m, "dense_weight"):
            exact = dense.get_submodule(name).weight.float()
            ours = m.dense_weight()
            direct = once.get_submodule(name).dense_weight()
            snr, snr_once = _snr_db(ours, exact), _snr_db(direct, exact)
            print(f"{which} {name}: SNR vs exact dense fused {snr:.1f} dB (quantizing it once: {snr_once:.1f} dB)")
            assert (ours - exact).norm() <= 2 * (direct - exact).norm()
            worst = max(worst, snr_once - snr)
            seen.add(name)
    assert {"blocks.1.attn1.to_qkv", "blocks.1.ffn.proj_out", "cross_kv", "cross_kv_img"} <= seen  # quantized
    print(f"{which}: worst weight SNR loss vs quantizing once {worst:.1f} dB")
    if which == "nvfp4":  # outputs once, for the coarsest format (the forwards are the slow part on CPU)
        out, exact_out = _forward(q), _forward(dense)
        print(f"outputs: {which}+LoRA vs dense+LoRA SNR {_snr_db(out, exact_out):.1f} dB, quantize-after-load "
              f"{_snr_db(_forward(once), exact_out):.1f} dB")
        assert _err(exact_out, _forward(base)) > 0.3  # the LoRA's effect, to compare the errors with
        assert _snr_db(out, exact_out) >= _snr_db(_forward(once), exact_out) - 6  # <= 2x the rms error of once
    q.unload_lora()
    assert _same(q, snap)


@pytest.mark.slow
def test_quantize_after_load_keeps_lora_and_refuses_unload(base, tmp_path):
    """quantize() after load_lora quantizes the fused weights (the LoRA stays in); the adapters cannot be taken
    out of them any more: unload_lora / load_lora refuse, before changing anything."""
    factors = _factors(base, ["blocks.0.attn1.to_q", "blocks.1.ffn.net.2", "blocks.1.attn2.to_k"], b_scale=0.3)
    file = _write("original", factors, tmp_path)
    dense = copy.deepcopy(base).load_lora(file)
    m = copy.deepcopy(dense).quantize("nvfp4")
    plain = copy.deepcopy(base).quantize("nvfp4")
    exact = _forward(dense)
    print(f"quantized after load vs dense+LoRA {_err(_forward(m), exact):.3f}, quantized base vs dense+LoRA "
          f"{_err(_forward(plain), exact):.3f}")
    assert _err(_forward(m), exact) < _err(_forward(plain), exact) / 2  # the LoRA is in the quantized weights
    snap = _snapshot(m)
    with pytest.raises(CheckpointError, match=r"blocks.0.attn1.to_qkv.weight became torch.uint8 .* after the LoRA "
                                              r"was fused into it"):
        m.unload_lora()
    with pytest.raises(CheckpointError, match="quantize before load_lora"):
        m.load_lora(file, adapter_name="again")
    assert _same(m, snap)


# ---------------------------------------------------------------------------------------------
# Errors

def _save(sd, tmp_path, name="bad.safetensors") -> str:
    save_file(sd, str(tmp_path / name))
    return str(tmp_path / name)


def test_unknown_keys_are_listed(base, tmp_path):
    a, b = torch.zeros(RANK, I2V.dim), torch.zeros(I2V.dim, RANK)
    sd = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": a,
          "diffusion_model.blocks.0.self_attn.q.lora_up.weight": b,
          "diffusion_model.blocks.0.self_attn.q.lora_mid.weight": a,   # LoCon / LoHa roles: not LoRA
          "diffusion_model.blocks.0.self_attn.q.dora_scale": b,
          "diffusion_model.blocks.7.self_attn.q.lora_down.weight": a,  # a block this model lacks
          "lora_unet_blocks_0_self_attn_qq.lora_up.weight": b}
    m = copy.deepcopy(base)
    snap = _snapshot(m)
    with pytest.raises(CheckpointError, match=r"4 key\(s\) name no layer of this model") as e:
        m.load_lora(sd)
    for key in list(sd)[2:]:
        assert key in str(e.value)
    assert _same(m, snap) and adapters(m) == []


def test_i2v_lora_on_t2v_model(tmp_path):
    t2v = random_model(WanConfig.from_preset("tiny-t2v"), seed=0)
    sd = {"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(RANK, t2v.config.dim),
          "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(t2v.config.dim, RANK)}
    with pytest.raises(CheckpointError, match=r"cross_attn.k_img.lora_down.weight"):
        t2v.load_lora(sd)


def test_shape_and_pair_errors(base, tmp_path):
    C = I2V.dim
    with pytest.raises(CheckpointError, match=r"blocks.0.attn1.to_q.weight: the model's parameter is \[256, 256\], "
                                              r"the LoRA gives up \[256, 4\] @ down \[4, 128\]"):
        copy.deepcopy(base).load_lora({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(RANK, 128),
                                       "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(C, RANK)})
    with pytest.raises(CheckpointError, match=r"layer blocks.0.ffn.net.2: .* only one of the up / down"):
        copy.deepcopy(base).load_lora({"lora_unet_blocks_0_ffn_2.lora_down.weight": torch.zeros(RANK, I2V.ffn_dim)})
    with pytest.raises(CheckpointError, match=r"blocks.0.norm2.weight: the model's parameter is \[256\]"):
        copy.deepcopy(base).load_lora({"diffusion_model.blocks.0.norm3.diff": torch.zeros(C + 1)})
    with pytest.raises(FileNotFoundError, match="no LoRA file at"):
        base.load_lora(str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="junk.safetensors: not a readable safetensors LoRA file"):
        base.load_lora(str(tmp_path / "junk.safetensors"))


# ---------------------------------------------------------------------------------------------
# python -m wan_model run --lora PATH[:SCALE]

@pytest.mark.slow
def test_cli_run_lora(tmp_path, capsys):
    """run --lora fuses the file at the scale: the same latents as the checkpoint saved with it fused."""
    from safetensors.torch import load_file

    from wan_model.cli import main

    t2v = random_model(WanConfig.from_preset("tiny-t2v"), seed=2)
    file = _write("kohya", _factors(t2v, _block_layers(to_diffusers_model(t2v)), b_scale=0.3), tmp_path)
    t2v.save_pretrained(tmp_path / "base")
    copy.deepcopy(t2v).load_lora(file, scale=0.5).save_pretrained(tmp_path / "fused")
    small = ["--device", "cpu", "--dtype", "float32", "--steps", "1", "--frames", "1", "--height", "16", "--width",
             "16"]

    def run(ckpt, *extra):
        out = tmp_path / f"latents-{len(list(tmp_path.glob('latents-*')))}.safetensors"
        assert main(["run", "--checkpoint", str(tmp_path / ckpt), "--output", str(out), *small, *extra]) == 0
        return load_file(out)["latents"]

    with_lora, fused, plain = run("base", "--lora", f"{file}:0.5"), run("fused"), run("base")
    assert "LoRA" in capsys.readouterr().out
    assert torch.equal(with_lora, fused)
    assert _err(with_lora, plain) > 1e-3
    with pytest.raises(SystemExit):
        main(["run", "--checkpoint", str(tmp_path / "base"), "--lora", f"{file}:inf", *small])
    assert "the scale after ':' must be finite" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Values: refused with one line naming the file / key / value, the model unchanged (issue 27)

def _pair_sd(A=None, B=None, layer="blocks.0.attn1.to_q"):
    """A diffusers-named LoRA of one layer [256 x 256] (rank RANK unless A / B say otherwise)."""
    return {f"transformer.{layer}.lora_A.weight": torch.full((RANK, I2V.dim), 0.01) if A is None else A,
            f"transformer.{layer}.lora_B.weight": torch.full((I2V.dim, RANK), 0.01) if B is None else B}


def _with(t, index, value):
    t = t.clone()
    t.view(-1)[index] = value
    return t


def _orig_sd(alpha, rank=RANK):
    stem = "diffusion_model.blocks.1.ffn.2"
    return {f"{stem}.lora_down.weight": torch.full((rank, I2V.ffn_dim), 0.01),
            f"{stem}.lora_up.weight": torch.full((I2V.dim, rank), 0.01), f"{stem}.alpha": alpha}


BAD_LORAS = {  # name: (state dict, what the message must say)
    "nan in lora_A": (_pair_sd(A=_with(torch.zeros(RANK, I2V.dim), 5, float("nan"))),
                      r"to_q.lora_A.weight holds nan at flat index 5"),
    "inf in lora_B": (_pair_sd(B=_with(torch.zeros(I2V.dim, RANK), 3, float("-inf"))),
                      r"to_q.lora_B.weight holds -inf at flat index 3"),
    "nan alpha": (_orig_sd(torch.tensor(float("nan"))), r"ffn.2.alpha holds nan"),
    "inf alpha": (_orig_sd(torch.tensor(float("inf"))), r"ffn.2.alpha holds inf"),
    "empty alpha": (_orig_sd(torch.tensor([])), r"ffn.2.alpha must hold one value \(alpha\), got shape \[0\]"),
    "bf16 inf": (_pair_sd(A=_with(torch.zeros(RANK, I2V.dim), 0, float("inf")).bfloat16()),
                 r"to_q.lora_A.weight holds inf"),
    "int8": (_pair_sd(A=torch.ones(RANK, I2V.dim, dtype=torch.int8)), r"to_q.lora_A.weight is torch.int8; LoRA "
                                                                       r"tensors must be floating"),
    "bool": (_pair_sd(B=torch.ones(I2V.dim, RANK, dtype=torch.bool)), r"to_q.lora_B.weight is torch.bool"),
    "complex": (_pair_sd(A=torch.ones(RANK, I2V.dim, dtype=torch.complex64)), r"lora_A.weight is torch.complex64"),
    "bool alpha": (_orig_sd(torch.tensor(True)), r"ffn.2.alpha is torch.bool"),
    "rank 0": (_pair_sd(A=torch.zeros(0, I2V.dim), B=torch.zeros(I2V.dim, 0)),
               r"to_q.lora_A.weight has rank 0 \(shape \[0, 256\]\); a LoRA needs rank >= 1"),
    "rank 0 + alpha": (_orig_sd(torch.tensor(4.0), rank=0), r"ffn.2.lora_down.weight has rank 0"),
    "no tensors": ({}, r"holds no tensors"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_LORAS))
def test_bad_lora_values_refused(base, case):
    """NaN / inf in the factors or alpha, an empty alpha, non-float tensors, rank 0, no tensors: before,
    NaN weights, ZeroDivisionError / IndexError tracebacks or a no-op adapter."""
    sd, message = BAD_LORAS[case]
    m = copy.deepcopy(base)
    snap = _snapshot(m)
    with pytest.raises(CheckpointError, match=r"^LoRA <dict>: .*" + message) as e:
        m.load_lora(sd)
    assert "\n" not in str(e.value)
    assert _same(m, snap) and adapters(m) == []


def test_bad_lora_file_named(base, tmp_path):
    """The refusal names the file; an empty file and a NaN metadata alpha are refused too."""
    m = copy.deepcopy(base)
    snap = _snapshot(m)
    file = _save(_orig_sd(torch.tensor(float("nan"))), tmp_path)
    with pytest.raises(CheckpointError, match=rf"^LoRA {file}: diffusion_model.blocks.1.ffn.2.alpha holds nan"):
        m.load_lora(file)
    empty = _save({}, tmp_path, "empty.safetensors")
    with pytest.raises(CheckpointError, match=rf"^LoRA {empty}: holds no tensors"):
        m.load_lora(empty)
    meta = {METADATA_KEY: json.dumps({"transformer.lora_alpha": float("nan"), "transformer.r": RANK})}
    save_file(_pair_sd(), str(tmp_path / "meta.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"meta.safetensors: metadata transformer.lora_alpha of layer "
                                              r"blocks.0.attn1.to_q must be a finite number, got nan"):
        m.load_lora(str(tmp_path / "meta.safetensors"))
    assert _same(m, snap) and adapters(m) == []


@pytest.mark.slow
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), -1e39, "abc"])
def test_bad_scale_refused(base, scale):
    """load_lora's scale: nan / inf, or finite in fp64 but not in fp32 (`--lora F:-1e39`), gave NaN weights."""
    m = copy.deepcopy(base)
    snap = _snapshot(m)
    with pytest.raises(ValueError, match=r"load_lora: scale must be (finite in float32|a number)"
                                         r".*, got " + re.escape(repr(scale))):
        m.load_lora(_pair_sd(), scale=scale)
    assert _same(m, snap) and adapters(m) == []


@pytest.mark.slow
def test_delta_and_fused_weight_must_be_finite_in_the_models_dtype(base):
    """An fp16 model: a delta of 1.6e5 (finite in fp32) is inf in fp16; two deltas of 4e4 each are finite,
    their sum in the fused weight is not. Both refused, the model as it was (before: inf / NaN weights)."""
    m = copy.deepcopy(base).to_dtype(torch.float16)
    snap = _snapshot(m)
    big = _pair_sd(A=torch.full((RANK, I2V.dim), 200.0), B=torch.full((I2V.dim, RANK), 200.0))
    with pytest.raises(CheckpointError, match=r"^LoRA <dict> \(adapter 'default_0'\): transformer.blocks.0.attn1."
                                              r"to_q.lora_B.weight: scale 1 x alpha/rank 1 x delta of blocks.0.attn1"
                                              r".to_q.weight is inf \(from 1.6e\+05\) at flat index 0 \(65536 of "
                                              r"65536 values not finite in torch.float16\)"):
        m.load_lora(big)
    assert _same(m, snap) and adapters(m) == []
    half = _pair_sd(A=torch.full((RANK, I2V.dim), 100.0), B=torch.full((I2V.dim, RANK), 100.0))
    m.load_lora(half, adapter_name="a")
    assert all(torch.isfinite(v).all() for v in m.state_dict().values() if v.is_floating_point())
    snap = _snapshot(m)
    with pytest.raises(CheckpointError, match=r"^LoRA: the fused blocks.0.attn1.to_qkv.weight rows \[0, 256\) "
                                              r"\(torch.float16\) would hold inf .* fused from <dict> \(adapter 'a', "
                                              r"scale 1\), <dict> \(adapter 'b', scale 1\)"):
        m.load_lora(half, adapter_name="b")
    assert _same(m, snap) and adapters(m) == [("a", 1.0)]
    with pytest.raises(CheckpointError, match=r"scale 1e\+38 x alpha/rank 1 x delta .* is inf"):  # fp32 overflow
        copy.deepcopy(base).load_lora(half, scale=1e38)


# ---------------------------------------------------------------------------------------------
# Unreadable files: one line naming the file

def test_unreadable_lora_file(base, tmp_path, monkeypatch):
    """A file that exists but cannot be read (before: "no LoRA file at" / a safetensors message over lines)."""
    import os

    file = _save(_pair_sd(), tmp_path, "locked.safetensors")
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # a directory on the way without search permission (as non-root)
        if os.fspath(path) == file:
            raise PermissionError(13, "Permission denied", path)
        return real_stat(path, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(os, "stat", stat)
        with pytest.raises(CheckpointError, match=rf"^{file}: cannot read the LoRA file: Permission denied$"):
            base.load_lora(file)
    (tmp_path / "dir" / DIFFUSERS_WEIGHT_NAME).mkdir(parents=True)  # a diffusers dir whose "file" is a dir
    with pytest.raises(CheckpointError, match=r"dir/pytorch_lora_weights.safetensors: cannot read the LoRA file: "
                                              r"Is a directory$"):
        base.load_lora(str(tmp_path / "dir"))
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "cut.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="cut.safetensors: not a readable safetensors LoRA file") as e:
        base.load_lora(str(tmp_path / "cut.safetensors"))  # a header promising more bytes than the file has
    assert "\n" not in str(e.value)
    meta = {METADATA_KEY: "{not json"}
    save_file(_pair_sd(), str(tmp_path / "meta.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"meta.safetensors: metadata lora_adapter_metadata is not JSON"):
        base.load_lora(str(tmp_path / "meta.safetensors"))


# ---------------------------------------------------------------------------------------------
# Training after load_lora: the update is kept by unload / a further load

@pytest.mark.slow
def test_unload_after_training_keeps_the_update(base, tmp_path):
    """Fuse a LoRA into q (rows 0:256 of the fused QKV), take an optimizer step on the whole QKV, unload:
    every row keeps the step (before: the q rows went back to their pre-LoRA values, k / v kept it). Same
    for a second load_lora after the step. Tolerance: a few fp32 ulps (|w| ~ 0.5), the fused delta was
    rounded once into the weight."""
    factors = _factors(base, ["blocks.0.attn1.to_q"], b_scale=0.3)
    a, b = factors["blocks.0.attn1.to_q"]
    delta = SCALE * ALPHA / RANK * (b @ a)
    file = _write("original", factors, tmp_path)
    m = copy.deepcopy(base).load_lora(file, scale=SCALE)
    w = m.get_submodule("blocks.0.attn1.to_qkv").weight
    orig = base.get_submodule("blocks.0.attn1.to_qkv").weight.detach().clone()
    assert _err(w[:256], orig[:256] + delta) <= WEIGHT_TOL
    opt = torch.optim.SGD([w], lr=0.1)
    w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(9))
    opt.step()
    trained = w.detach().clone()
    expected = trained.clone()
    expected[:256] -= delta
    m.load_lora(file, scale=SCALE, adapter_name="again")  # stacking after the step keeps it too
    assert _err(w[:256], trained[:256] + delta) <= 2 * WEIGHT_TOL
    assert torch.equal(w[256:], trained[256:])
    m.unload_lora("again")
    m.unload_lora()
    print(f"after unload: q rows vs trained - delta {_err(w[:256], expected[:256]):.2e}, "
          f"vs the pre-LoRA q rows {_err(w[:256], orig[:256]):.3f}")
    assert _err(w[:256], expected[:256]) <= 2 * WEIGHT_TOL
    assert torch.equal(w[256:], trained[256:])
    assert adapters(m) == []


@pytest.mark.slow
@pytest.mark.parametrize("which", ["nvfp4", "fp8"])
def test_unload_after_edit_of_quantized_weight_keeps_it(base, tmp_path, which):
    """A quantized layer changed after the fuse (requantized with an update): unload subtracts the LoRA from
    its current weight, requantized (error at most 2x that of quantizing the exact result once), instead of
    restoring the pre-LoRA buffers (before)."""
    from wan_model.compat.lora import _requantize

    factors = _factors(base, ["blocks.0.attn1.to_q"], b_scale=0.3)
    a, b = factors["blocks.0.attn1.to_q"]
    file = _write("original", factors, tmp_path)
    q = _quantized(copy.deepcopy(base), which)
    lin = q.get_submodule("blocks.0.attn1.to_qkv")
    before = lin.dense_weight()
    q.load_lora(file, scale=SCALE)
    update = 0.5 * torch.randn(before.shape, generator=torch.Generator().manual_seed(10))
    _requantize(lin, lin.dense_weight() + update)
    exact = lin.dense_weight()
    exact[:256] -= SCALE * ALPHA / RANK * (b @ a)
    once = copy.deepcopy(lin)
    _requantize(once, exact)
    q.unload_lora()
    got = lin.dense_weight()
    print(f"{which}: unloaded vs exact {(got - exact).norm():.3f}, quantized once "
          f"{(once.dense_weight() - exact).norm():.3f}, "
          f"vs the pre-LoRA weight {(got - before).norm():.3f}")
    assert (got - exact).norm() <= 2 * (once.dense_weight() - exact).norm()
    assert (got - before).norm() > 5 * (got - exact).norm()  # the update is kept
    assert adapters(q) == []


@pytest.mark.slow
def test_vace_blocks_lora_matches_diffusers(tmp_path):
    """A LoRA over every Linear of a VACE model (its vace_blocks, their proj_in / proj_out and fused Q/K/V and
    stacked K/V included), in diffusers naming written by diffusers itself: fused by us == loaded and fused by
    WanVACEPipeline (PEFT) into WanVACETransformer3DModel. Before the VACE groups were targets, a vace_blocks
    key raised a bare KeyError."""
    from diffusers import WanVACEPipeline

    cfg = WanConfig.from_preset("tiny-vace")
    model = random_model(cfg, seed=6).eval()
    ref = to_diffusers_model(copy.deepcopy(model)).eval()
    layers = [n for n, m in ref.named_modules() if n.startswith(("blocks.", "vace_blocks."))
              and isinstance(m, torch.nn.Linear)]
    assert any(n.startswith("vace_blocks.0.proj_in") for n in layers)
    file = _write("diffusers", _factors(model, layers, seed=4, b_scale=0.3), tmp_path)
    pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=ref)
    pipe.load_lora_weights(file, adapter_name="v")
    pipe.fuse_lora(components=["transformer"], lora_scale=SCALE)
    pipe.unload_lora_weights()
    ours = copy.deepcopy(model).load_lora(file, scale=SCALE)
    err, moved = _weights_err(ours, ref), _weights_err(model, ref)
    print(f"VACE LoRA: max |ours - diffusers| {err:.2e} (the LoRA moved weights by {moved:.2e})")
    assert moved > 1e-3 and err <= 1e-6
    ours.unload_lora()
    assert _same(ours, _snapshot(model))
