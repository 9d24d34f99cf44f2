"""WanModel.load_lora / unload_lora against diffusers' own LoRA loading (`load_lora_weights` + `fuse_lora` of a
WanImageToVideoPipeline) on the same files, in the three namings, written from the same random factors.

Tolerances (fp32): outputs 1e-5 absolute (magnitude ~5; the base models differ by ~2e-6, one rounding instead of
several in q/k norm + RoPE and attention, see test_diffusers_dropin.py); fused weights 1e-6 (magnitude ~0.5:
diffusers folds alpha / rank into the factors before the product, we scale the product, a few fp32 ulps).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_inputs
from wan_model.cli import random_model
from wan_model.config import WanConfig
from wan_model.layouts import CheckpointError, diffusers_to_original_key, native_to_diffusers
from wan_model.lora import adapters

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from wan_model.integrations.diffusers import to_diffusers_model  # noqa: E402

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
    from wan_model.quantize import FP8Config

    method, option = QUANT[which]
    return model.quantize(method, FP8Config(per_channel=True) if option == "per_channel" else None)


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
