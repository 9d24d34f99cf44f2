"""The drop-in on every other diffusers Wan transformer, against diffusers itself: tiny random
`WanVACETransformer3DModel`, `WanAnimateTransformer3DModel` and `WanAnimate2Transformer3DModel` (head_dim 128,
2 heads, 2 layers), each patched vs the same model stock (Animate-2's generation pass vs diffusers' flex
BlockMask too); a Wan2.2 VACE modular pipeline (two transformers, random UMT5, word-level tokenizer, random
AutoencoderKLWan) end to end.

Tolerances: fp32 FP32_TOL (1e-5 absolute, outputs of magnitude ~1.5; seen <= 1e-6); bf16: the patched model's
error vs the fp32 run of the same bf16 weights is at most BF16_RATIO x stock bf16's own error (tests/test_model.py's
rule for our model vs diffusers); int8 attention: the relative error is below OP_NRMSE per 8-bit call
(tests/test_model_attention.py's rule).
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

from wan_model.testing import FP32_TOL

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers.models.transformers import (  # noqa: E402
    transformer_wan, transformer_wan_animate, transformer_wan_animate_2)
from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache  # noqa: E402

from wan_model.compat import diffusers as dropin  # noqa: E402
from wan_model.compat.diffusers import use_wan_kernels  # noqa: E402

from _helpers import diffusers_bf16_like  # noqa: E402

BF16_RATIO = 1.5   # tests/test_model.py's BF16_RATIO: bf16 error <= 1.5x diffusers-bf16's own error vs fp32
OP_NRMSE = 0.05    # tests/test_model_attention.py's OP_NRMSE: relative error bound of one wan::attention_int8 call
LAYERS, TEXT_DIM = 2, 32
COMMON = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, text_dim=TEXT_DIM, freq_dim=32,
              ffn_dim=64, num_layers=LAYERS)


def _vace(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.WanVACETransformer3DModel(in_channels=4, out_channels=4, vace_layers=[0, 1], vace_in_channels=8,
                                               **COMMON).eval()


def _animate(seed: int = 0):
    """Wan-Animate with an I2V image context, a face adapter after every block and the smallest motion encoder
    (4 x 4 face crops: no residual blocks)."""
    torch.manual_seed(seed)
    return diffusers.WanAnimateTransformer3DModel(
        in_channels=12, latent_channels=4, out_channels=4, image_dim=32, added_kv_proj_dim=256,
        motion_encoder_channel_sizes={"4": 8}, motion_encoder_size=4, motion_style_dim=16, motion_dim=4,
        motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=4, inject_face_latents_blocks=1,
        **COMMON).eval()


def _animate2(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.WanAnimate2Transformer3DModel(patch_size=(1, 2, 2), text_len=16, in_dim=8, dim=256, ffn_dim=64,
                                                   freq_dim=32, text_dim=TEXT_DIM, out_dim=4, num_heads=2,
                                                   num_layers=LAYERS).eval()


def _randn(g, dtype):
    return lambda *shape: torch.randn(*shape, generator=g).to(dtype)


def _run_vace(model, dtype=torch.float32):
    """Batch 2 at two timesteps, control latents and per-layer control scales."""
    r = _randn(torch.Generator().manual_seed(0), dtype)
    return model(r(2, 4, 2, 4, 4), torch.tensor([700.0, 300.0]), r(2, 16, TEXT_DIM),
                 control_hidden_states=r(2, 8, 2, 4, 4), control_hidden_states_scale=torch.tensor([1.0, 0.5]),
                 return_dict=False)[0]


def _run_animate(model, dtype=torch.float32):
    """2 latent frames (reference + 1 pose frame) of 2 x 2 tokens, 512 text + 8 image tokens, 4 face frames (-> one
    motion frame, + the padding frame: each latent frame attends to its 5 motion tokens)."""
    r = _randn(torch.Generator().manual_seed(0), dtype)
    return model(r(2, 12, 2, 4, 4), torch.tensor([700.0, 300.0]), r(2, 512, TEXT_DIM), r(2, 8, 32),
                 pose_hidden_states=r(2, 4, 1, 4, 4), face_pixel_values=r(2, 3, 4, 4, 4), return_dict=False)[0]


def _run_animate2(model, dtype=torch.float32, generate=None):
    """The reference pass (kv_cache_mode="extract": dense self-attention, K/V cached) over 2 latent frames of 2 x 2
    tokens. `generate` = (latent frames, reference frames, origin_area): the reference pass over that many frames,
    then one generation pass against the cached reference (flex BlockMask self-attention) in the buffer of a
    5-frame video (origin_len 5: 2 latent frames + 1) of origin_area pixels (32 x 32: 2 x 2 tokens a frame)."""
    r = _randn(torch.Generator().manual_seed(0), dtype)
    frames, ref_frames, area = generate or (None, 2, None)
    cache = WanAnimate2KVCache(LAYERS)
    ref_grid = torch.tensor([[ref_frames, 2, 2]])
    ref = model([r(4, ref_frames, 4, 4)], torch.tensor([1.0]), [r(7, TEXT_DIM)], [r(4, ref_frames, 4, 4)], cache,
                "extract", 4 * ref_frames, encoder_hidden_states_image=r(1, 4, 1280), offset_grid_sizes=ref_grid,
                return_dict=False)[0][0]
    if generate is None:
        return ref
    out = model([r(4, frames, 4, 4)], torch.tensor([600.0]), [r(7, TEXT_DIM)], [r(4, frames, 4, 4)], cache,
                "cached", 4 * frames, encoder_hidden_states_image=r(1, 4, 1280), reference_grid_sizes=ref_grid,
                origin_len=5, origin_area=area, return_dict=False)[0][0]
    return torch.cat([ref.flatten(), out.flatten()])


# class: (builder, forward, {processor class name: how many modules get it}, the module of its stock processors)
VARIANTS = {
    "vace": (_vace, _run_vace, {"WanKernelsAttnProcessor": 2 * (LAYERS + 2)}, transformer_wan),
    "animate": (_animate, _run_animate, {"WanKernelsAnimateAttnProcessor": 2 * LAYERS,
                                         "WanKernelsFaceAttnProcessor": LAYERS}, transformer_wan_animate),
    "animate2": (_animate2, _run_animate2, {"WanKernelsAnimate2CrossAttnProcessor": LAYERS,
                                            "WanKernelsAnimate2AttnProcessor": LAYERS}, transformer_wan_animate_2),
}


@pytest.fixture(scope="module")
def models():
    return {name: build() for name, (build, *_) in VARIANTS.items()}


def _err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def _forward(name, model, dtype=torch.float32):
    return VARIANTS[name][1](model, dtype)


def _processors(model) -> dict[str, int]:
    out = {}
    for m in model.modules():
        if hasattr(m, "processor"):
            out[type(m.processor).__name__] = out.get(type(m.processor).__name__, 0) + 1
    return out


def _spy_kernels(model) -> list:
    """Record the kernels' attention calls of every patched processor ("attention" / "attention_lse"; the
    self-attention's `self_attention`, q8 with attention="int8", counts as "attention")."""
    calls = []
    for m in model.modules():
        p = getattr(m, "processor", None)
        if isinstance(p, dropin.WanKernelsAttnProcessor):
            for op, name in (("attention", "attention"), ("attention_lse", "attention_lse"),
                             ("self_attention", "attention")):
                if hasattr(p, op):
                    setattr(p, op, (lambda fn, name: lambda *a: calls.append(name) or fn(*a))(getattr(p, op), name))
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_patched_equals_stock_fp32(models, name):
    stock = models[name]
    expected = _forward(name, stock)
    patched = use_wan_kernels(copy.deepcopy(stock))
    assert _processors(patched) == VARIANTS[name][2]  # every attention module patched
    calls = _spy_kernels(patched)
    out = _forward(name, patched)
    print(f"{name}: patched vs stock {_err(out, expected):.2e} (max |out| {expected.abs().max():.2f})")
    assert calls == ["attention"] * sum(VARIANTS[name][2].values())  # one call per attention module
    assert _err(out, expected) <= FP32_TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_bf16_error_within_stock_bf16_error(models, name):
    stock = diffusers_bf16_like(copy.deepcopy(models[name]))
    truth = _forward(name, copy.deepcopy(stock).float())  # the same bf16-rounded weights, computed in fp32
    err_stock = _err(_forward(name, stock, torch.bfloat16), truth)
    err_ours = _err(_forward(name, use_wan_kernels(stock), torch.bfloat16), truth)
    print(f"{name} bf16: stock err {err_stock:.3e}, patched {err_ours:.3e}, ratio {err_ours / err_stock:.2f}")
    assert err_stock > 0
    assert err_ours <= BF16_RATIO * err_stock


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_compile_fullgraph(models, name):
    """torch.compile(fullgraph=True) of the patched model (aot_eager: fast on CPU). Animate-2's forward and its
    self-attention's RoPE (diffusers' `rope_apply`) read grid sizes back to Python (`.tolist()`, `.item()`: stock
    cannot be traced whole either), so there each patched cross-attention is compiled with fullgraph and the
    model runs them."""
    stock = models[name]
    patched = use_wan_kernels(copy.deepcopy(stock))
    if name == "animate2":
        for block in patched.blocks:
            block.cross_attn = torch.compile(block.cross_attn, fullgraph=True, backend="aot_eager")
    else:
        patched = torch.compile(patched, fullgraph=True, backend="aot_eager")
    assert _err(_forward(name, patched), _forward(name, stock)) <= FP32_TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_peft_lora_on_qkv(models, name):
    """One PEFT LoRA (add_adapter, random A and B) on every to_q / to_k / to_v: patched after loading = stock."""
    from peft import LoraConfig

    base = models[name]
    ref = copy.deepcopy(base)
    torch.manual_seed(1)
    ref.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    patched = use_wan_kernels(copy.deepcopy(ref))
    expected = _forward(name, ref)
    effect = _err(expected, _forward(name, base))
    print(f"{name}: LoRA effect {effect:.3f}, patched vs stock {_err(_forward(name, patched), expected):.2e}")
    assert effect > 0.05  # the adapter changes the output
    assert _err(_forward(name, patched), expected) <= FP32_TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_layerwise_fp8_casting_and_group_offload(models, name):
    """diffusers' fp8 layerwise casting (hooks on every Linear: the processors call the live modules) and
    block-level group offloading (hooks on the blocks, vace_blocks and face adapters), patched = stock."""
    cpu = torch.device("cpu")
    ref, patched = copy.deepcopy(models[name]), use_wan_kernels(copy.deepcopy(models[name]))
    for t in (ref, patched):
        t.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
        t.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="block_level",
                               num_blocks_per_group=1)
    expected = _forward(name, ref)
    assert _err(expected, _forward(name, models[name])) > 1e-3  # fp8 storage really rounds the weights
    assert _err(_forward(name, patched), expected) <= FP32_TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_set_attention_backend_and_parallel_hand_back_to_the_modules_own_processor(models, name, monkeypatch):
    """set_attention_backend / a parallel config hand attention to the stock processor of the attention module's
    own diffusers module (Animate's copy of WanAttnProcessor dispatches through transformer_wan_animate), which
    then gives stock's output bit for bit; reset_attention_backend returns to the kernels."""
    module = VARIANTS[name][3]
    dispatched = []
    real = module.dispatch_attention_fn

    def dispatch(*a, parallel_config=None, **k):
        dispatched.append(parallel_config)
        return real(*a, **k)

    monkeypatch.setattr(module, "dispatch_attention_fn", dispatch)
    stock = models[name]
    patched = use_wan_kernels(copy.deepcopy(stock))
    ours = [p for m in patched.modules() if isinstance(p := getattr(m, "processor", None),
                                                        dropin.WanKernelsAttnProcessor)]
    expected = _forward(name, stock)
    n_stock = len(dispatched)
    dispatched.clear()
    ours_out = _forward(name, patched)
    assert not dispatched  # every attention on the kernels

    patched.set_attention_backend("native")
    assert all(type(p._call) is p.stock and p.stock.__module__ == module.__name__ for p in ours)
    dispatched.clear()
    assert torch.equal(_forward(name, patched), expected)
    assert len(dispatched) == n_stock  # every attention dispatched by diffusers, through the module's own function
    patched.reset_attention_backend()
    dispatched.clear()
    assert torch.equal(_forward(name, patched), ours_out) and not dispatched  # back on the kernels
    config = object()
    with pytest.warns(UserWarning, match="context parallelism is enabled"):
        for p in ours:
            p._parallel_config = config
    dispatched.clear()
    assert torch.equal(_forward(name, patched), expected)
    assert config in dispatched
    for p in ours:
        p._parallel_config = None
    dispatched.clear()
    assert torch.equal(_forward(name, patched), ours_out) and not dispatched


@pytest.mark.slow
def test_int8_attention_close_to_stock(models):
    """attention="int8": every patched self-attention runs wan::attention_int8 (on CPU its reference emulation),
    cross-attention stays wan::attention (a few hundred keys: quantizing the whole query would cost more). The
    first forward measures each self-attention's q and k and runs the unfused op; later ones the fused q with the
    balance folded in (tests/test_diffusers_dropin.py: exactly what each is, and what the balance gains)."""
    stock = models["vace"]
    expected = _forward("vace", stock)
    patched = use_wan_kernels(copy.deepcopy(stock), attention="int8")
    calls = _spy_kernels(patched)
    for step in ("first", "later"):
        got = _forward("vace", patched)
        err = ((got - expected).norm() / expected.norm()).item()
        print(f"vace int8, {step} forward: {len(calls)} int8 calls, relative error {err:.4f}")
        assert calls == ["attention"] * (LAYERS + 2)  # the self-attention of each block and VACE block
        assert 0 < err < OP_NRMSE * len(calls)
        calls.clear()
    p = patched.blocks[0].attn2.processor
    assert p.kind == "int8" and p.cross_attention is not p.attention
    for m in patched.modules():  # every self-attention, the VACE blocks' too, measured its balance
        if isinstance(q := getattr(m, "processor", None), dropin.WanKernelsAttnProcessor) and m.is_cross_attention:
            assert q.balance is None
        elif isinstance(q, dropin.WanKernelsAttnProcessor):
            assert q.balance.shape == (m.inner_dim,) and q.balance.dtype == torch.float32
    with pytest.raises(ValueError, match=r"attention must be one of \('bf16', 'int8'\), got 'int4'"):
        use_wan_kernels(copy.deepcopy(stock), attention="int4")


@pytest.mark.slow
def test_int8_animate2_generation_pass_close_to_bf16_kernels(models):
    """attention="int8" on Animate-2's generation pass: its two sets run wan::attention_int8_lse, merged as the
    bf16 path's (compared with the patched fp32 model, which test_animate2_generation_pass holds = stock's flex)."""
    geometry = (2, 1, [32, 48])  # empty slots in both sets
    with torch.no_grad():
        expected = _run_animate2(use_wan_kernels(copy.deepcopy(models["animate2"])), generate=geometry)
        patched = use_wan_kernels(copy.deepcopy(models["animate2"]), attention="int8")
        calls = _spy_kernels(patched)
        got = _run_animate2(patched, generate=geometry)
    err = ((got - expected).norm() / expected.norm()).item()
    print(f"animate2 int8: {len(calls)} int8 calls, relative error {err:.4f}")
    # the self-attention's reference pass, then its generation pass (two int8 lse calls); cross-attention stays bf16
    assert calls == ["attention"] * LAYERS + ["attention_lse", "attention_lse"] * LAYERS
    assert all(p.kind == "int8" for m in patched.modules() if isinstance(p := getattr(m, "processor", None),
                                                                         dropin.WanKernelsAttnProcessor))
    assert 0 < err < OP_NRMSE * len(calls)


def test_pipelines_holding_variants_and_errors(models):
    """Classic pipelines (transformer and/or transformer_2), a pipeline holding transformers only in `components`,
    and the one-line TypeError naming the type received."""
    from diffusers import WanAnimatePipeline, WanVACEPipeline

    vace = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                           transformer=None, transformer_2=copy.deepcopy(models["vace"]))  # Wan2.2 low-noise only
    animate = WanAnimatePipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, image_processor=None,
                                 image_encoder=None, transformer=copy.deepcopy(models["animate"]))
    other = types.SimpleNamespace(components={"denoiser": copy.deepcopy(models["animate2"]), "vae": None})
    for pipe, name in ((vace, "vace"), (animate, "animate"), (other, "animate2")):
        assert use_wan_kernels(pipe) is pipe
        held = [t for t in pipe.components.values() if isinstance(t, torch.nn.Module)]
        assert len(held) == 1 and _processors(held[0]) == VARIANTS[name][2], name
    with pytest.raises(TypeError, match=r"^use_wan_kernels: expected a WanTransformer3DModel or a pipeline holding "
                                        r"one \(or another diffusers Wan transformer: WanVACETransformer3DModel, "
                                        r"WanAnimateTransformer3DModel, WanAnimate2Transformer3DModel\), got "
                                        r"SimpleNamespace$"):
        use_wan_kernels(types.SimpleNamespace(unet=None))


@pytest.mark.slow
@pytest.mark.parametrize("frames, ref_frames, area", [(3, 2, [32, 32]), (2, 1, [32, 32]), (3, 1, [32, 48])],
                         ids=["full", "short-segment", "wider-video"])
def test_animate2_generation_pass(models, frames, ref_frames, area):
    """The generation pass (kv_cache_mode="cached") vs diffusers' flex BlockMask (eager on CPU, ~5 s each): the full
    buffer; a shorter segment (empty generation slots; frame 2 sees no reference frame with tokens); a wider video
    (3 x 2 slots a frame, 2 x 2 used: empty slots inside every frame)."""
    stock = models["animate2"]
    patched = use_wan_kernels(copy.deepcopy(stock))
    calls = _spy_kernels(patched)
    with torch.no_grad():  # flex attention has no backward on CPU
        expected = _run_animate2(stock, generate=(frames, ref_frames, area))
        out = _run_animate2(patched, generate=(frames, ref_frames, area))
    print(f"animate2 reference + generation passes {frames, ref_frames, area}: patched vs stock "
          f"{_err(out, expected):.2e} (max |out| {expected.abs().max():.2f})")
    # per layer: reference pass self + cross; generation pass generation + reference sets (lse), cross
    assert calls == ["attention"] * 2 * LAYERS + ["attention_lse", "attention_lse", "attention"] * LAYERS
    assert _err(out, expected) <= FP32_TOL


# ---------------------------------------------------------------------------------------------
# A full modular pipeline: Wan22VaceModularPipeline, two VACE transformers (high / low noise)

PROMPT, NEGATIVE = "a cat walks on the grass", "blurry low quality"
WORDS = ["[PAD]", "[UNK]", "</s>"] + sorted(set((PROMPT + " " + NEGATIVE).split()))


def _modular_vace_pipeline(monkeypatch):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, Wan22VaceModularPipeline
    from diffusers.guiders import ClassifierFreeGuidance
    from diffusers.modular_pipelines.wan import encoders
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, UMT5EncoderModel

    # diffusers 0.42's modular Wan text step calls ftfy.fix_text without checking is_ftfy_available (the classic
    # WanPipeline checks); ftfy is not a dependency here, and fix_text leaves our plain ASCII prompts unchanged
    monkeypatch.setattr(encoders, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=TEXT_DIM, d_kv=16, d_ff=32, num_layers=1,
                                             num_heads=2)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()

    def vace(seed):  # 16 latent channels; control = 32 video latent + 64 mask channels (8 x 8 VAE stride)
        torch.manual_seed(seed)
        return diffusers.WanVACETransformer3DModel(in_channels=16, out_channels=16, vace_layers=[0, 1],
                                                   vace_in_channels=96, **COMMON).eval()

    pipe = Wan22VaceModularPipeline()
    pipe.update_components(
        text_encoder=text_encoder, vae=vae, transformer=vace(1), transformer_2=vace(2),
        tokenizer=PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>"),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0),
        guider=ClassifierFreeGuidance(guidance_scale=2.0), guider_2=ClassifierFreeGuidance(guidance_scale=2.0))
    return pipe


@pytest.mark.slow
def test_modular_vace_pipeline_latents(monkeypatch):
    """2 steps, CFG 2 (tests/test_diffusers_dropin.py explains the scale), output latents; the first step runs
    transformer (high noise), the second transformer_2: both patched, vace_blocks included."""
    stock = _modular_vace_pipeline(monkeypatch)
    patched = use_wan_kernels(copy.deepcopy(stock))
    ran = []
    for name in ("transformer", "transformer_2"):
        t = getattr(patched, name)
        assert _processors(t) == {"WanKernelsAttnProcessor": 2 * (LAYERS + 2)}, name
        t.vace_blocks[0].attn1.register_forward_hook(lambda *a, name=name: ran.append(name))

    def generate(pipe):
        with torch.no_grad():
            return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=32, num_frames=5,
                        num_inference_steps=2, generator=torch.Generator().manual_seed(0), output="latents")

    expected, out = generate(stock), generate(patched)
    print(f"Wan22VaceModularPipeline: patched vs stock {_err(out, expected):.2e} (latent max "
          f"{expected.abs().max():.2f}), forwards {ran}")
    assert expected.shape == (1, 16, 2, 4, 4)
    assert set(ran) == {"transformer", "transformer_2"}
    assert _err(out, expected) <= FP32_TOL


# ---------------------------------------------------------------------------------------------
# What the base drop-in keeps, for VACE too: GGUF weights, cache hooks

def _vace_inputs(cfg):
    from wan_model.testing import make_control, make_inputs

    x, t, text, _ = make_inputs(cfg, seed=1)
    return x, t, text, make_control(cfg, x)


@pytest.mark.slow
def test_vace_gguf_transformer(tmp_path):
    """A VACE GGUF (written by our converter: city96's layout, Q8_0 blocks) loaded by diffusers'
    WanVACETransformer3DModel.from_single_file with GGUFQuantizationConfig: patched == stock (the GGUF Linear
    layers are not plain nn.Linear: the processor calls the live modules)."""
    pytest.importorskip("gguf")
    from diffusers import GGUFQuantizationConfig, WanVACETransformer3DModel

    from wan_model.core.config import WanConfig
    from wan_model.io.convert import convert_gguf
    from wan_model.testing import random_model

    cfg = WanConfig.from_preset("tiny-vace")
    model = random_model(cfg, seed=4)
    model.save_pretrained(tmp_path / "v.safetensors", format="comfyui")
    model.save_pretrained(tmp_path / "config")  # from_single_file needs config= offline
    convert_gguf(tmp_path / "v.safetensors", tmp_path / "v.gguf", "Q8_0", progress=False)

    def load():
        return WanVACETransformer3DModel.from_single_file(
            str(tmp_path / "v.gguf"), config=str(tmp_path / "config"), torch_dtype=torch.float32,
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32)).eval()

    ref, patched = load(), use_wan_kernels(load())
    assert ref.blocks[0].attn1.to_q.weight.dtype == torch.uint8  # the Q8_0 blocks are what runs
    x, t, text, control = _vace_inputs(cfg)
    with torch.no_grad():
        want = ref(x, t, text, control_hidden_states=control, return_dict=False)[0]
        got = patched(x, t, text, control_hidden_states=control, return_dict=False)[0]
    assert _processors(patched).get("WanKernelsAttnProcessor") == 2 * (cfg.num_layers + len(cfg.vace_layers))
    assert _err(got, want) <= FP32_TOL


@pytest.mark.slow
def test_vace_first_block_cache():
    """diffusers' FirstBlockCache on a VACE transformer: over a run of steps the patched model skips the same
    blocks as stock and gives the same outputs."""
    from diffusers import FirstBlockCacheConfig

    ref = _vace(seed=3)
    patched = use_wan_kernels(copy.deepcopy(ref))
    outs, calls = {}, {}
    for name, m in (("stock", ref), ("patched", patched)):
        # 0.13: inside the range of this run's step-to-step change of the first block's residual (measured: 0.2
        # skips every step after the first, 0.1 none), so the cache both runs and skips
        m.enable_cache(FirstBlockCacheConfig(threshold=0.13))
        calls[name] = []
        m.blocks[-1].ffn.register_forward_hook(lambda *a, c=calls[name]: c.append(1))
        outs[name] = []
        g = torch.Generator().manual_seed(0)
        x, text, control = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 16, TEXT_DIM, generator=g), \
            torch.randn(2, 8, 2, 4, 4, generator=g)
        for step in range(6):  # a denoising-like run: the latents drift a little, the timestep falls
            with torch.no_grad(), m.cache_context("cond"):
                out = m(x + 0.02 * step, torch.tensor([900.0 - 100 * step] * 2), text,
                        control_hidden_states=control, return_dict=False)[0]
            outs[name].append(out)
    assert len(calls["patched"]) == len(calls["stock"])
    assert 1 < len(calls["stock"]) < 6  # the cache both ran and skipped blocks
    assert max(_err(a, b) for a, b in zip(outs["patched"], outs["stock"])) <= FP32_TOL
