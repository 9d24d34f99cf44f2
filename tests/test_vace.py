"""VACE in the thin model (issue 26): WanModel with `vace_blocks` against the real consumer, diffusers'
WanVACETransformer3DModel on the same weights: the config round-trips its config.json, the forward equals it in
fp32 (FP32_TOL, with per-layer scales and with fewer control frames than latent frames, which both pad), and so do
the gradients w.r.t. the inputs (latents, text, control) and every weight (relative 1e-4 per tensor, the rule of
tests/test_model_train.py). Files written in original and ComfyUI naming load in diffusers' own single-file loader
(`from_single_file`, its converter `convert_wan_transformer_to_diffusers`) and back into ours bit for bit;
`run --control` samples as diffusers' loop does with the control in both CFG halves (WanVACEPipeline); bad control
inputs are one-line errors naming the shape."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from wan_model import cli
from wan_model.cli import main
from wan_model.compat.diffusers import to_diffusers_model
from wan_model.compat.layouts import COMFY_PREFIX, CheckpointError, diffusers_keys, native_to_diffusers
from wan_model.core.config import PRESETS, WanConfig
from wan_model.model import WanModel
from wan_model.testing import FP32_TOL, diffusers_euler, make_control, make_inputs, random_model

from _helpers import run_ours

TINY = WanConfig.from_preset("tiny-vace")   # head_dim 128, 4 layers, VACE blocks after layers 0 and 2
SCALE = torch.tensor([0.7, 1.3])


@pytest.fixture(scope="module")
def pair():
    """(our fp32 tiny VACE WanModel with random weights, diffusers' WanVACETransformer3DModel with the same)."""
    model = random_model(TINY, seed=3).eval()
    return model, to_diffusers_model(model)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------
# config

def test_presets_are_diffusers_converter_values():
    """scripts/convert_wan_to_diffusers.py's Wan-VACE-1.3B / 14B: the T2V configs + vace_layers, 96 channels."""
    small, big = PRESETS["wan2.1-vace-1.3b"], PRESETS["wan2.1-vace-14b"]
    assert small.replace(vace_layers=None, vace_in_channels=None) == PRESETS["wan2.1-t2v-1.3b"]
    assert big.replace(vace_layers=None, vace_in_channels=None) == PRESETS["wan2.1-t2v-14b"]
    assert small.vace_layers == (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28)
    assert big.vace_layers == (0, 5, 10, 15, 20, 25, 30, 35)
    assert small.vace_in_channels == big.vace_in_channels == 96


@pytest.mark.parametrize("name", ["wan2.1-vace-1.3b", "wan2.1-vace-14b", "tiny-vace"])
def test_config_round_trips_diffusers_vace_config(name):
    from diffusers import WanVACETransformer3DModel

    cfg = PRESETS[name]
    out = cfg.to_diffusers_config()
    assert out["_class_name"] == "WanVACETransformer3DModel" and out["vace_layers"] == list(cfg.vace_layers)
    with torch.device("meta"):
        ref = WanVACETransformer3DModel.from_config(out)     # diffusers accepts it ...
    assert WanConfig.from_diffusers_config(dict(ref.config)) == cfg  # ... and what it holds reads back
    assert len(ref.vace_blocks) == len(cfg.vace_layers)
    meta = WanModel(cfg, impl="ref", device="meta")
    sd = native_to_diffusers(dict(meta.state_dict()), cfg)
    assert set(sd) == diffusers_keys(cfg) == set(ref.state_dict())
    assert all(tuple(sd[k].shape) == tuple(v.shape) for k, v in ref.state_dict().items())


def test_non_vace_config_unchanged_and_vace_defaults():
    cfg = PRESETS["tiny-t2v"]
    out = cfg.to_diffusers_config()
    assert out["_class_name"] == "WanTransformer3DModel" and not {"vace_layers", "vace_in_channels"} & set(out)
    # a WanTransformer3DModel config never turns VACE; a VACE one without the keys gets diffusers' defaults
    assert not WanConfig.from_diffusers_config({**out, "vace_layers": [0], "vace_in_channels": 96}).has_vace
    big = {**PRESETS["wan2.1-t2v-14b"].to_diffusers_config(), "_class_name": "WanVACETransformer3DModel"}
    assert WanConfig.from_diffusers_config(big) == PRESETS["wan2.1-vace-14b"]


@pytest.mark.parametrize("changes, why", [
    (dict(vace_layers=(0, 2)), "must be given together"),
    (dict(vace_in_channels=96), "must be given together"),
    (dict(vace_layers=(), vace_in_channels=96), "non-empty"),
    (dict(vace_layers=(1, 2), vace_in_channels=96), "starting at 0"),
    (dict(vace_layers=(0, 2, 2), vace_in_channels=96), "strictly increasing"),
    (dict(vace_layers=(0, 3, 1), vace_in_channels=96), "strictly increasing"),
    (dict(vace_layers=(0, 4), vace_in_channels=96), "below num_layers=4"),
    (dict(vace_layers=(0,), vace_in_channels=0), "vace_in_channels must be a positive int"),
    (dict(vace_layers=(0,), vace_in_channels=96, expand_timesteps=True), "expand_timesteps"),
])
def test_bad_vace_configs_refused(changes, why):
    with pytest.raises(ValueError, match=why):
        PRESETS["tiny-t2v"].replace(num_layers=4, **changes)


# ---------------------------------------------------------------------------------------------
# numerics vs diffusers' WanVACETransformer3DModel

@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ref", "auto"])
@pytest.mark.parametrize("case", ["scaled", "default-scale", "fewer-control-frames"])
def test_fp32_matches_diffusers(pair, impl, case):
    model, ref = pair
    model.set_impl(impl)
    x, t, text, _ = make_inputs(TINY)
    control = make_control(TINY, x, frames=1 if case == "fewer-control-frames" else None)
    vace = dict(control_hidden_states=control, control_hidden_states_scale=SCALE if case == "scaled" else None)
    out = run_ours(model, (x, t, text, None), **vace)
    with torch.no_grad():
        want = ref(x, t, text, **vace, return_dict=False)[0]
        plain = ref(x, t, text, control_hidden_states=control, control_hidden_states_scale=torch.zeros(2))[0]
    err = (out - want).abs().max().item()
    print(f"VACE {case} impl={impl}: fp32 max|ours - diffusers| = {err:.3e} (output max {want.abs().max():.2f})")
    assert err <= FP32_TOL
    assert (want - plain).abs().max() > 100 * FP32_TOL   # the hints matter: a zero scale changes the output


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", (False, True), ids=("plain", "checkpointed"))
def test_gradients_match_diffusers_fp32(pair, checkpointing):
    model, ref = pair
    model.set_impl("auto").train()
    ref.train()
    x, t, text, _ = make_inputs(TINY)
    control = make_control(TINY, x)
    cot = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    grads = []
    for m in (model, ref):
        leaves = [a.detach().clone().requires_grad_() for a in (x, text, control)]
        m.zero_grad(set_to_none=True)
        (m.enable_gradient_checkpointing if checkpointing else m.disable_gradient_checkpointing)()
        out = m(leaves[0], t, leaves[1], control_hidden_states=leaves[2], control_hidden_states_scale=SCALE,
                return_dict=False)[0]
        (out * cot).sum().backward()
        weights = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        grads.append(([a.grad for a in leaves], native_to_diffusers(weights, TINY) if m is model else weights))
        m.disable_gradient_checkpointing()
        m.eval()
    (got_in, got_w), (want_in, want_w) = grads
    errs = {n: rel_err(g, w) for n, g, w in zip(("hidden_states", "text", "control"), got_in, want_in)}
    print(f"VACE input gradients ({'checkpointed' if checkpointing else 'plain'}), relative error: {errs}")
    assert all(e <= 1e-4 for e in errs.values()), errs
    assert set(want_w) == {n for n, _ in ref.named_parameters()} == set(got_w)
    assert any(n.startswith("vace_blocks.0.proj_in") for n in want_w)
    bad = {n: rel_err(got_w[n], w) for n, w in want_w.items() if not rel_err(got_w[n], w) <= 1e-4}
    print(f"VACE weight gradients: worst relative error "
          f"{max(rel_err(got_w[n], w) for n, w in want_w.items()):.2e}")
    assert not bad, bad


@pytest.mark.slow
def test_compile_fullgraph_matches_eager(pair):
    """The VACE forward traces whole (no graph break): the same bound as tests/test_model.py's compile test."""
    model, _ = pair
    model.set_impl("auto").eval()
    x, t, text, _ = make_inputs(TINY)
    vace = dict(control_hidden_states=make_control(TINY, x), control_hidden_states_scale=SCALE)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    eager, out = run_ours(model, (x, t, text, None), **vace), run_ours(compiled, (x, t, text, None), **vace)
    err = (out - eager).abs().max().item()
    print(f"VACE compiled vs eager: max diff {err:.3e}")
    assert err <= 1e-5 * eager.abs().max().item()


@pytest.mark.slow
def test_sampling_with_control_matches_diffusers_loop(pair):
    """core.sampling.sample with the control (cond + uncond batched) = diffusers' two-forward CFG loop with the
    control in both forwards, as WanVACEPipeline runs it."""
    from wan_model.core.sampling import sample

    model, ref = pair
    model.set_impl("auto").eval()
    x, _, text, _ = make_inputs(TINY, batch=1)
    neg = torch.randn(text.shape, generator=torch.Generator().manual_seed(5))
    control = make_control(TINY, x)
    got = sample(model, x, text, neg, num_steps=2, guidance_scale=4.0, shift=3.0, progress=False, control=control,
                 control_scale=SCALE).latents
    want = diffusers_euler(ref, x, text, neg, 2, 4.0, 3.0, control=control, control_scale=SCALE)
    assert (got - want).abs().max().item() <= 1e-4      # the demo's bound over two Euler steps


def test_bad_control_inputs_are_one_line_errors(pair):
    model, _ = pair
    x, t, text, _ = make_inputs(TINY)
    c = make_control(TINY, x)
    cases = [
        (None, None, "control_hidden_states \\[B, 96, F, H, W\\] is required"),
        (c[:, :95], None, r"control_hidden_states has shape \(2, 95, 2, 6, 10\), expected \[B, 96, F_c, H, W\]"),
        (c[:1], None, r"has shape \(1, 96, 2, 6, 10\)"),
        (c[..., :8], None, r"has shape \(2, 96, 2, 6, 8\)"),
        (torch.cat([c, c], dim=2), None, r"has shape \(2, 96, 4, 6, 10\).*at most its frames"),
        (c[0], None, r"has shape \(96, 2, 6, 10\)"),
        (c.double(), None, "is torch.float64, expected the model dtype torch.float32"),
        (c, torch.ones(3), r"control_hidden_states_scale has shape \(3,\).*float tensor \[2\]"),
        (c, 1.0, r"control_hidden_states_scale has shape \(\) and dtype float"),
    ]
    for control, scale, why in cases:
        with pytest.raises(ValueError, match=why) as e:
            model(x, t, text, control_hidden_states=control, control_hidden_states_scale=scale)
        assert "\n" not in str(e.value)
    plain = random_model(PRESETS["tiny-t2v"])
    with pytest.raises(ValueError, match="has no VACE blocks.*control shape \\(2, 96, 2, 6, 10\\)"):
        plain(x, t, text, control_hidden_states=c)
    with pytest.raises(NotImplementedError, match="VACE"):
        model.enable_parallelism(ulysses_degree=2)


# ---------------------------------------------------------------------------------------------
# checkpoints: diffusers, original and ComfyUI naming, read by diffusers and back

@pytest.mark.slow
def test_every_naming_loads_in_diffusers_and_back_bit_equal(pair, tmp_path):
    from diffusers import WanVACETransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model, ref = pair
    want = ref.state_dict()
    cdir = tmp_path / "diffusers"
    model.save_pretrained(cdir, format="diffusers")
    got = WanVACETransformer3DModel.from_pretrained(cdir, torch_dtype=torch.float32).state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    for fmt, prefix in (("original", ""), ("comfyui", COMFY_PREFIX)):
        path = tmp_path / f"{fmt}.safetensors"
        model.save_pretrained(path, format=fmt)
        keys = set(load_file(path))
        # original Wan's VACE names (diffusers' converter: before_proj -> proj_in, after_proj -> proj_out)
        assert {prefix + k for k in ("vace_patch_embedding.weight", "vace_blocks.0.before_proj.weight",
                                     "vace_blocks.1.after_proj.bias", "vace_blocks.1.cross_attn.k.weight",
                                     "vace_blocks.0.norm3.weight", "vace_blocks.1.modulation")} <= keys
        assert prefix + "vace_blocks.1.before_proj.weight" not in keys
        converted = convert_wan_transformer_to_diffusers(load_file(path))
        assert set(converted) == set(want) and all(torch.equal(converted[k], want[k]) for k in want)
        loaded = WanVACETransformer3DModel.from_single_file(str(path), config=str(cdir), torch_dtype=torch.float32)
        got = loaded.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), fmt
        back = WanModel.from_pretrained(path, dtype=torch.float32)
        assert back.config == TINY
        a, b = model.state_dict(), back.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), fmt


@pytest.mark.slow
def test_vace_layers_from_metadata_or_derived(tmp_path):
    """A single file has no config.json: ours names vace_layers in its metadata; a file without them (another
    tool's) gets them derived from the weights: N blocks evenly spaced from 0 (every ceil(L / N)-th layer, as the
    released models and original Wan's default are), refused when no such spacing gives N blocks."""
    path, bare = tmp_path / "ours.safetensors", tmp_path / "bare.safetensors"
    for layers, derived in (((0, 1), (0, 2)), ((0, 1, 2), None), ((0, 2), (0, 2))):
        cfg = TINY.replace(vace_layers=layers)
        random_model(cfg, seed=1).save_pretrained(path, format="comfyui", overwrite=True)
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["vace_layers"] == str(list(layers))
        assert WanModel.from_pretrained(path, dtype=torch.float32).config == cfg
        save_file(load_file(path), bare)                       # the same tensors, no metadata
        if derived is None:
            with pytest.raises(CheckpointError, match="cannot derive vace_layers: 3 VACE blocks over 4 layers"):
                WanModel.from_pretrained(bare, dtype=torch.float32)
        else:
            assert WanModel.from_pretrained(bare, dtype=torch.float32).config == cfg.replace(vace_layers=derived)


def test_non_vace_files_have_no_vace_metadata(tmp_path):
    path = tmp_path / "t2v.safetensors"
    random_model(PRESETS["tiny-t2v"]).save_pretrained(path, format="original")
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}


# ---------------------------------------------------------------------------------------------
# CLI: run --control

SMALL = ["--steps", "2", "--frames", "5", "--height", "16", "--width", "32", "--guidance", "4", "--shift", "3"]


@pytest.fixture(scope="module")
def vace_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vace") / "vace"
    random_model(TINY, seed=3).save_pretrained(path, format="diffusers")
    return path


@pytest.mark.slow
def test_run_control_end_to_end_matches_diffusers(pair, vace_dir, tmp_path, capsys):
    model, ref = pair
    g = torch.Generator().manual_seed(11)
    text, neg = torch.randn(1, 7, TINY.text_dim, generator=g), torch.randn(1, 7, TINY.text_dim, generator=g)
    embeds, control_file, out = tmp_path / "embeds.safetensors", tmp_path / "control.safetensors", tmp_path / "o"
    save_file({"prompt_embeds": text, "negative_prompt_embeds": neg}, embeds)
    latents = torch.randn(1, 16, 2, 2, 4, generator=torch.Generator().manual_seed(0))  # run's latents, seed 0
    control = make_control(TINY, latents)
    save_file({"video_and_mask": control}, control_file)
    argv = ["run", "--checkpoint", str(vace_dir), "--device", "cpu", "--dtype", "float32", "--embeds", str(embeds),
            "--control", str(control_file), "--output", str(out) + ".safetensors"] + SMALL
    assert main(argv) == 0
    assert f"control {control_file}: [1, 96, 2, 2, 4] into the VACE layers [0, 2]" in capsys.readouterr().out
    got = load_file(str(out) + ".safetensors")["latents"]
    want = diffusers_euler(ref, latents, text, neg, 2, 4.0, 3.0, control=control)
    err = (got - want).abs().max().item()
    print(f"run --control vs diffusers' loop: max |diff| = {err:.3e}")
    assert err <= 1e-4


def _usage_error(capsys, argv, argument):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"python -m wan_model run: error: argument {argument}"), err
    return err


@pytest.mark.parametrize("tensors, why", [
    (None, "cannot read"),
    ({"a": torch.zeros(1, 96, 2, 2, 4), "b": torch.zeros(1)}, "must hold one tensor (the control latents), has 2"),
    ({"a": torch.zeros(96, 2, 2, 4)}, "tensor 'a' has shape (96, 2, 2, 4)"),
    ({"a": torch.zeros(1, 96, 2, 2, 4, dtype=torch.int32)}, "dtype torch.int32, expected floating point"),
])
def test_run_bad_control_file(tensors, why, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("loaded before checking --control"))
    path = tmp_path / "control.safetensors"
    if tensors is None:
        path.write_bytes(b"not safetensors")
    else:
        save_file(tensors, path)
    err = _usage_error(capsys, ["run", "--checkpoint", str(tmp_path), "--control", str(path)], "--control")
    assert why in err and str(path) in err, err


def test_run_control_checked_against_the_checkpoint(vace_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "sample", lambda *a, **k: pytest.fail("sampled with a bad --control"))
    path = tmp_path / "control.safetensors"
    base = ["run", "--checkpoint", str(vace_dir), "--device", "cpu"] + SMALL
    save_file({"c": torch.zeros(1, 48, 2, 2, 4)}, path)
    err = _usage_error(capsys, base + ["--control", str(path)], "--control")
    assert "has shape (1, 48, 2, 2, 4), expected [1 (or 1), 96, F <= 2, 2, 4]" in err, err
    save_file({"c": torch.zeros(1, 96, 3, 2, 4)}, path)
    assert "has shape (1, 96, 3, 2, 4)" in _usage_error(capsys, base + ["--control", str(path)], "--control")
    err = _usage_error(capsys, base, "--control")
    assert "is a VACE checkpoint: pass its control latents" in err, err
    t2v = tmp_path / "t2v"
    random_model(PRESETS["tiny-t2v"]).save_pretrained(t2v)
    save_file({"c": torch.zeros(1, 96, 2, 2, 4)}, path)
    err = _usage_error(capsys, ["run", "--checkpoint", str(t2v), "--device", "cpu", "--control", str(path)] + SMALL,
                       "--control")
    assert "is not a VACE checkpoint" in err, err


@pytest.mark.slow
def test_gguf_round_trip(tmp_path):
    """A VACE checkpoint converted to GGUF (F32: exact; Q8_0: the main blocks quantized, the VACE branch kept F32
    as every non-`blocks.` tensor is) loads back with its vace_layers derived from the weights."""
    from wan_model.io.convert import convert_gguf
    from wan_model.model import WanModel

    model = random_model(TINY, seed=2).eval()
    model.save_pretrained(tmp_path / "v.safetensors", format="comfyui")
    convert_gguf(tmp_path / "v.safetensors", tmp_path / "v.gguf", "F32", progress=False)
    back = WanModel.from_pretrained(tmp_path / "v.gguf", dtype=torch.float32)
    assert back.config == model.config
    sa, sb = model.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    convert_gguf(tmp_path / "v.safetensors", tmp_path / "q.gguf", "Q8_0", progress=False)
    q = WanModel.from_pretrained(tmp_path / "q.gguf", dtype=torch.float32).state_dict()
    assert all(torch.equal(q[k], sa[k]) for k in sa if k.startswith("vace_"))
    assert not torch.equal(q["blocks.0.ffn.proj_in.weight"], sa["blocks.0.ffn.proj_in.weight"])
