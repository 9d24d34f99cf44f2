"""The diffusers drop-in (wan_model/compat/diffusers.py, WanTransformer3DModel): patched vs unpatched forwards of
every variant, then against diffusers' own mechanisms on a tiny real WanPipeline (random T5, a word-level
tokenizer, AutoencoderKLWan, random Wan weights): every check is patched vs stock diffusers doing the same thing.

Tolerance: fp32, 1e-5 absolute on outputs of magnitude ~5. One forward differs from stock by ~1.5e-6 (one
rounding instead of several in q/k norm + RoPE and attention); end to end, CFG with guidance g turns a
per-forward difference d into up to (2g - 1) d per step, so the pipelines run with g = 2 (2 steps: <= 4e-6 seen).
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

from wan_model.testing import FP32_TOL, make_inputs, random_model
from wan_model.core.config import WanConfig
from wan_model.model import WanModel

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from wan_model.compat.diffusers import WanKernelsAttnProcessor, to_diffusers_model, use_wan_kernels  # noqa: E402

CFG = WanConfig.from_preset("tiny-t2v")
PROMPT, NEGATIVE = "a cat walks on the grass", "blurry low quality"
WORDS = ["[PAD]", "[UNK]", "</s>"] + sorted(set((PROMPT + " " + NEGATIVE).split()))
# every projection of a block, self-attention q/k/v first (most Wan LoRAs target them)
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


def _pipeline(transformer):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=CFG.text_dim, d_kv=32, d_ff=64,
                                           num_layers=1, num_heads=2)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=3).eval()


@pytest.fixture(scope="module")
def stock(model):
    """A stock diffusers WanPipeline (fp32) whose transformer holds `model`'s weights."""
    return _pipeline(to_diffusers_model(model))


def _generate(pipe, steps: int = 2, **kw) -> torch.Tensor:
    """Final latents [1, 16, 2, 4, 6] of a 32x48-pixel, 5-frame video, CFG 2 (see the module docstring)."""
    return pipe(PROMPT, negative_prompt=NEGATIVE, height=32, width=48, num_frames=5, num_inference_steps=steps,
                guidance_scale=2.0, output_type="latent", generator=torch.Generator().manual_seed(0), **kw).frames


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, CFG.in_channels, 2, 4, 6, generator=g), torch.tensor([900.0, 300.0]),
            torch.randn(2, 512, CFG.text_dim, generator=g))


@torch.no_grad()
def _forward(transformer, **kw) -> torch.Tensor:
    return transformer(*_inputs(), return_dict=False, **kw)[0]


def _err(a, b) -> float:
    return (a - b).abs().max().item()


def _patched(transformer):
    out = use_wan_kernels(transformer)
    assert all(isinstance(b.attn1.processor, WanKernelsAttnProcessor) for b in out.blocks)
    return out


@pytest.mark.slow
def test_pipeline_end_to_end(stock):
    ref = _generate(stock)
    out = _generate(use_wan_kernels(copy.deepcopy(stock)))
    print(f"patched vs stock WanPipeline: {_err(out, ref):.2e} (latent max {ref.abs().max():.2f})")
    assert _err(out, ref) <= FP32_TOL


# ---------------------------------------------------------------------------------------------
# PEFT LoRA through diffusers' loaders

def _lora(rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA (`transformer.blocks.N.<target>.lora_A/lora_B.weight`) on every projection."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"ffn.net.0.proj": (CFG.ffn_dim, CFG.dim), "ffn.net.2": (CFG.dim, CFG.ffn_dim)}
    sd = {}
    for i in range(CFG.num_layers):
        for t in LORA_TARGETS:
            n, k = shapes.get(t, (CFG.dim, CFG.dim))
            sd[f"transformer.blocks.{i}.{t}.lora_A.weight"] = torch.randn(rank, k, generator=g) * k ** -0.5
            sd[f"transformer.blocks.{i}.{t}.lora_B.weight"] = torch.randn(n, rank, generator=g) * 0.3
    return sd


def _qkv_only(sd):
    return {k: v for k, v in sd.items() if ".attn1.to_q." in k or ".attn1.to_k." in k or ".attn1.to_v." in k}


@pytest.mark.slow
@pytest.mark.parametrize("order", ["patch-then-load", "load-then-patch"])
def test_lora_on_self_attention_qkv_takes_effect(stock, order):
    base = _generate(stock)
    lora = _qkv_only(_lora())
    ref, pipe = copy.deepcopy(stock), copy.deepcopy(stock)
    ref.load_lora_weights(lora, adapter_name="qkv")
    if order == "patch-then-load":
        use_wan_kernels(pipe)
        pipe.load_lora_weights(lora, adapter_name="qkv")
    else:
        pipe.load_lora_weights(lora, adapter_name="qkv")
        use_wan_kernels(pipe)
    expected, out = _generate(ref), _generate(pipe)
    effect = _err(expected, base)
    print(f"{order}: LoRA effect {effect:.3f}, patched vs stock {_err(out, expected):.2e}")
    assert effect > 0.05  # the adapter changes the video
    assert _err(out, expected) <= FP32_TOL


@pytest.mark.slow
def test_lora_adapters_scale_fuse_unfuse_unload(stock):
    """Each diffusers LoRA operation, in a user's order, on stock and patched transformers side by side."""
    ref, pipe = copy.deepcopy(stock), copy.deepcopy(stock)
    use_wan_kernels(pipe)
    base = _forward(ref.transformer)
    steps = [
        ("load style", lambda p: p.load_lora_weights(_lora(seed=1), adapter_name="style"), {}),
        ("load motion", lambda p: p.load_lora_weights(_qkv_only(_lora(seed=2)), adapter_name="motion"), {}),
        ("set_adapters style, motion", lambda p: p.set_adapters(["style", "motion"], [0.5, 1.0]), {}),
        ("attention_kwargs scale", lambda p: None, {"attention_kwargs": {"scale": 0.3}}),
        ("fuse_lora", lambda p: p.fuse_lora(lora_scale=0.7), {}),
        ("unfuse_lora", lambda p: p.unfuse_lora(), {}),
        ("disable_lora", lambda p: p.disable_lora(), {}),
        ("enable_lora", lambda p: p.enable_lora(), {}),
        ("set_adapters motion", lambda p: p.set_adapters("motion"), {}),
        ("unload_lora_weights", lambda p: p.unload_lora_weights(), {}),
    ]
    for name, op, kw in steps:
        op(ref), op(pipe)
        expected, out = _forward(ref.transformer, **kw), _forward(pipe.transformer, **kw)
        print(f"{name}: effect {_err(expected, base):.3f}, patched vs stock {_err(out, expected):.2e}")
        assert _err(out, expected) <= FP32_TOL, name
        if name not in ("disable_lora", "unload_lora_weights"):
            assert _err(expected, base) > 0.05, name  # the step is not a no-op
    assert _err(out, base) <= FP32_TOL  # unloaded: the base model again


# ---------------------------------------------------------------------------------------------
# Memory and saving: no second copy of the weights

def _weight_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_patch_adds_no_weights_and_saves_diffusers_keys(stock, tmp_path):
    from safetensors import safe_open

    ref = stock.transformer
    patched = _patched(copy.deepcopy(ref))
    assert _weight_bytes(patched) == _weight_bytes(ref)  # <= stock + 1% asked; exactly stock given
    assert list(patched.state_dict()) == list(ref.state_dict())
    keys = {}
    for name, t in (("stock", ref), ("patched", patched)):
        t.save_pretrained(tmp_path / name)
        with safe_open(str(tmp_path / name / "diffusion_pytorch_model.safetensors"), "pt") as f:
            keys[name] = sorted(f.keys())
    assert keys["patched"] == keys["stock"]


# ---------------------------------------------------------------------------------------------
# Layerwise casting, GGUF, offloading, cache hooks

@pytest.mark.slow
def test_layerwise_fp8_casting(stock):
    ref = copy.deepcopy(stock.transformer)
    patched = _patched(copy.deepcopy(stock.transformer))
    for t in (ref, patched):
        t.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert ref.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    expected = _forward(ref)
    assert _err(expected, _forward(stock.transformer)) > 1e-3  # fp8 storage really rounds the weights
    assert _err(_forward(patched), expected) <= FP32_TOL


def _write_gguf(model, tmp_path) -> str:
    """`model` as a GGUF file the way city96's Wan GGUFs hold it (original key names, arch "wan"): 2-D weights
    Q8_0, the rest (biases, norms, modulation, the 5-D patch embedding) F32."""
    gguf = pytest.importorskip("gguf")
    from safetensors.torch import load_file

    model.save_pretrained(str(tmp_path / "orig.safetensors"), format="original")
    path = str(tmp_path / "wan.gguf")
    w = gguf.GGUFWriter(path, "wan")
    for k, t in load_file(str(tmp_path / "orig.safetensors")).items():
        a = t.float().numpy()
        if a.ndim == 2 and "modulation" not in k:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(k, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(k, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.slow
def test_gguf_transformer(model, stock, tmp_path):
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    path = _write_gguf(model, tmp_path)
    model.save_pretrained(str(tmp_path / "config"), format="diffusers")  # from_single_file needs config= offline

    def load():
        return WanTransformer3DModel.from_single_file(
            path, config=str(tmp_path / "config"), torch_dtype=torch.float32,
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))

    ref, patched = load(), _patched(load())  # two loads: diffusers' GGUFParameter cannot be deep-copied
    assert ref.blocks[0].attn1.to_q.weight.dtype == torch.uint8  # Q8_0 blocks
    expected = _forward(ref)
    assert _err(expected, _forward(stock.transformer)) > 1e-3  # the quantized weights are what ran
    assert _err(_forward(patched), expected) <= FP32_TOL


@pytest.mark.slow
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload(stock, offload_type):
    cpu = torch.device("cpu")
    ref = copy.deepcopy(stock.transformer)
    patched = _patched(copy.deepcopy(stock.transformer))
    for t in (ref, patched):
        t.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type,
                               **({"num_blocks_per_group": 1} if offload_type == "block_level" else {}))
    assert _err(_forward(patched), _forward(ref)) <= FP32_TOL


def _block_calls(transformer) -> list:
    """Appends to the list each time the last block really computes (the cache hooks replace the block's
    forward, so a hook on the block itself would fire on skipped calls too)."""
    calls = []
    transformer.blocks[-1].ffn.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["FirstBlockCache", "MagCache"])
def test_cache_hooks_apply(stock, cache):
    from diffusers import FirstBlockCacheConfig, MagCacheConfig

    steps = 6
    config = {"FirstBlockCache": lambda: FirstBlockCacheConfig(threshold=0.6),
              "MagCache": lambda: MagCacheConfig(threshold=0.5, retention_ratio=0.3, num_inference_steps=steps,
                                                 mag_ratios=[1.0] * steps)}[cache]
    ref, pipe = copy.deepcopy(stock), copy.deepcopy(stock)
    use_wan_kernels(pipe)
    calls = {}
    for name, p in (("stock", ref), ("patched", pipe)):
        p.transformer.enable_cache(config())
        calls[name] = _block_calls(p.transformer)
    expected, out = _generate(ref, steps), _generate(pipe, steps)
    print(f"{cache}: last block ran {len(calls['stock'])} / {2 * steps} times; "
          f"patched vs stock {_err(out, expected):.2e}")
    assert len(calls["patched"]) == len(calls["stock"]) < 2 * steps  # the cache skipped blocks, the same ones
    assert _err(out, expected) <= FP32_TOL


# ---------------------------------------------------------------------------------------------
# Attention backends

def test_set_attention_backend_hands_attention_back(stock, monkeypatch):
    from diffusers.models.transformers import transformer_wan

    dispatched = []
    real = transformer_wan.dispatch_attention_fn
    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", lambda *a, **k: dispatched.append(1) or real(*a, **k))
    patched = _patched(copy.deepcopy(stock.transformer))
    expected = _forward(stock.transformer)
    dispatched.clear()
    ours = _forward(patched)
    assert not dispatched and _err(ours, expected) <= FP32_TOL  # the wan kernels ran

    patched.set_attention_backend("native")
    out = _forward(patched)
    assert len(dispatched) == 2 * CFG.num_layers  # diffusers' own attention, self + cross per block
    assert torch.equal(out, expected)
    patched.reset_attention_backend()
    dispatched.clear()
    assert torch.equal(_forward(patched), ours) and not dispatched  # back on the kernels


@pytest.mark.slow
def test_parallel_config_hands_attention_back(stock, monkeypatch):
    """enable_parallelism sets each processor's `_parallel_config`: diffusers' processor then runs with it (a
    real context-parallel run needs a process group; the config is recorded and passed through instead)."""
    from diffusers.models.transformers import transformer_wan

    seen = []
    real = transformer_wan.dispatch_attention_fn

    def dispatch(*a, parallel_config=None, **k):
        seen.append(parallel_config)
        return real(*a, **k)

    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", dispatch)
    patched = _patched(copy.deepcopy(stock.transformer))
    config = object()
    with pytest.warns(UserWarning, match="context parallelism is enabled, attention runs on diffusers'"):
        for b in patched.blocks:
            b.attn1.processor._parallel_config = config
            b.attn2.processor._parallel_config = config
    assert torch.equal(_forward(patched), _forward(stock.transformer))
    assert seen.count(config) == CFG.num_layers  # self-attention gets the config, cross-attention None (stock)
    for b in patched.blocks:
        b.attn1.processor._parallel_config = b.attn2.processor._parallel_config = None
    seen.clear()
    assert _err(_forward(patched), _forward(stock.transformer)) <= FP32_TOL
    assert len(seen) == 2 * CFG.num_layers  # only the stock forward dispatched: the patched one is on the kernels


@pytest.mark.slow
@pytest.mark.parametrize("how", ["model", "repeated_blocks"])
def test_compile_fullgraph(stock, how):
    """torch.compile(fullgraph=True) traces the processor (its module checks become guards); aot_eager keeps
    it fast on CPU."""
    patched = _patched(copy.deepcopy(stock.transformer))
    if how == "model":
        patched = torch.compile(patched, fullgraph=True, backend="aot_eager")
    else:
        patched.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    assert _err(_forward(patched), _forward(stock.transformer)) <= FP32_TOL


def _uneven(seed: int):
    """A tiny diffusers Wan transformer (head_dim 128) whose self-attention has log-normal RMSNorm gains and a key
    bias: the uneven channels the 8-bit attention's balance is for (tests/test_model_balance.py's model)."""
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128,
                                            in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                            num_layers=2).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for blk in model.blocks:
            a, C = blk.attn1, blk.attn1.inner_dim
            a.norm_q.weight.copy_(torch.exp(torch.randn(C, generator=g)))
            a.norm_k.weight.copy_(torch.exp(torch.randn(C, generator=g)))
            a.to_k.bias += 3 * torch.randn(C, generator=g)
    return model


@torch.no_grad()
def _forward_uneven(model) -> torch.Tensor:
    """384 tokens (3 frames of 16 x 16 latents), two timesteps."""
    g = torch.Generator().manual_seed(0)
    return model(torch.randn(2, 4, 3, 16, 16, generator=g), torch.tensor([700.0, 300.0]),
                 torch.randn(2, 16, 32, generator=g), return_dict=False)[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_int8_first_call_measures_the_balance(seed):
    """attention="int8": each self-attention's first call measures q and k and runs the unfused op (which balances
    them itself); later calls quantize q in the projection's kernel with that balance folded into the norm weights
    (wan_model/core/balance.py), exactly the folded projection then the op less its own balance, and cut the error
    of the unbalanced fused q (seeds 0-3: 0.57-0.66x; bar 0.85x, tests/test_model_balance.py's)."""
    from wan_kernels.ref.attention_int8 import attention_int8
    from wan_kernels.ref.qk_norm_rope import qk_norm_rope
    from wan_kernels.ref.qkv_rope import qkv_rope

    stock = _uneven(seed)
    want = _forward_uneven(stock)
    patched = use_wan_kernels(copy.deepcopy(stock), attention="int8")
    procs = [b.attn1.processor for b in patched.blocks]
    assert all(p.balance is None for p in procs)
    first, later = _forward_uneven(patched), _forward_uneven(patched)
    ref = use_wan_kernels(copy.deepcopy(stock))  # bf16 processors, the self-attention on the balanced int8 op
    for b in ref.blocks:
        b.attn1.processor.self_attention = lambda qkv: attention_int8(*qkv)
    assert torch.equal(_forward_uneven(ref), first)
    balances = [p.balance for p in procs]
    assert all(not torch.allclose(b, torch.ones_like(b)) for b in balances)
    for p in procs:
        p.balance = torch.ones_like(p.balance)
    unbalanced = _forward_uneven(patched)
    err = {name: ((out - want).norm() / want.norm()).item()
           for name, out in (("first", first), ("later", later), ("unbalanced", unbalanced))}
    print(f"seed {seed}: int8 relative error {err}, later / unbalanced {err['later'] / err['unbalanced']:.3f}")
    assert 0 < err["later"] < 0.85 * err["unbalanced"], err
    for p, b in zip(procs, balances):
        p.balance = b
        p.qkv_rope, p.qk_norm_rope = qkv_rope, qk_norm_rope  # the references the int8 forms' are made of
        p.self_attention = lambda qkv: attention_int8(*qkv, balance=False)
    assert torch.equal(_forward_uneven(patched), later)


@pytest.mark.slow
def test_int8_first_call_under_compile():
    """torch.compile(fullgraph=True) traces the measuring first call (the processor's balance set as a side
    effect) and the fused calls after it: the same outputs as eager."""
    stock = _uneven(0)
    eager = use_wan_kernels(copy.deepcopy(stock), attention="int8")
    want = [_forward_uneven(eager) for _ in range(2)]
    patched = use_wan_kernels(copy.deepcopy(stock), attention="int8")
    compiled = torch.compile(patched, fullgraph=True, backend="aot_eager")
    for i, w in enumerate(want):
        assert _err(_forward_uneven(compiled), w) <= FP32_TOL, i
        assert all(b.attn1.processor.balance is not None for b in patched.blocks)


@pytest.mark.slow
def test_fuse_qkv_projections_is_honoured(stock):
    """After diffusers' fuse_qkv_projections stock runs to_qkv / to_kv: so do we (a LoRA loaded on to_q
    afterwards is then ignored by both)."""
    ref, patched = copy.deepcopy(stock.transformer), _patched(copy.deepcopy(stock.transformer))
    for t in (ref, patched):
        t.fuse_qkv_projections()
        with torch.no_grad():
            for b in t.blocks:
                b.attn1.to_qkv.weight.mul_(1.5)  # the fused copy now differs from to_q/to_k/to_v: which one ran?
                b.attn2.to_kv.weight.mul_(0.5)
    expected = _forward(ref)
    assert _err(expected, _forward(stock.transformer)) > 1e-2
    assert _err(_forward(patched), expected) <= FP32_TOL


# ---------------------------------------------------------------------------------------------
# Our WanModel as pipe.transformer

@pytest.mark.slow
def test_wan_model_as_pipeline_transformer(model, stock, tmp_path):
    stock.transformer.save_pretrained(tmp_path / "transformer")
    ours = WanModel.from_pretrained(tmp_path, subfolder="transformer", torch_dtype=torch.float32)
    assert ours.dtype == torch.float32
    assert torch.equal(WanModel.from_pretrained(tmp_path / "transformer", dtype=torch.float32).proj_out.weight,
                       ours.proj_out.weight)
    pipe = copy.deepcopy(stock)
    pipe.transformer = ours
    expected, out = _generate(stock), _generate(pipe)
    print(f"WanModel in WanPipeline vs stock: {_err(out, expected):.2e}")
    assert _err(out, expected) <= FP32_TOL
    assert use_wan_kernels(pipe) is pipe  # nothing to patch: left alone


@pytest.mark.slow
def test_wan_model_diffusers_call_signature(model, stock):
    x, t, text = _inputs()
    expected = _forward(stock.transformer)
    with torch.no_grad(), model.cache_context("cond", step_index=0):
        as_tuple = model(x, t, text, None, False, {"scale": 1.0})
        as_dict = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=True)
        plain = model(x, t, text)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert _err(as_tuple[0], expected) <= FP32_TOL
    assert torch.equal(as_dict.sample, as_tuple[0]) and torch.equal(as_dict[0], plain)
    with pytest.raises(ValueError, match=r"attention_kwargs \['mask'\] are not supported"):
        model(x, t, text, attention_kwargs={"mask": None})


def test_from_pretrained_dtype_spellings(model, tmp_path):
    model.save_pretrained(str(tmp_path / "t"))
    bf16 = WanModel.from_pretrained(tmp_path / "t", torch_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.scale_shift_table.dtype == torch.float32  # diffusers' fp32 rule
    fp16 = WanModel.from_pretrained(tmp_path / "t", dtype=torch.float16, torch_dtype=torch.float16)
    assert fp16.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype=torch.float16 and torch_dtype=torch.bfloat16 disagree"):
        WanModel.from_pretrained(tmp_path / "t", dtype=torch.float16, torch_dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Our WanModel as pipe.transformer under sequence parallelism: diffusers' enable_parallelism(config=...) on
# 2 gloo processes (127.0.0.1); each rank runs the pipeline and the forward single-process first, then parallel.

PARALLEL_TIMEOUT_S = 180  # both ranks: imports (~10 s each on 2 shared cores) + 3 pipelines + 3 forwards each


def _parallel_worker(rank: int, port: int, out_path: str) -> None:
    import json
    from datetime import timedelta

    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    model = random_model(CFG, seed=3).eval()
    pipe = _pipeline(model)
    _, t, text = _inputs()
    x = torch.randn(2, CFG.in_channels, 1, 6, 6, generator=torch.Generator().manual_seed(1))  # 9 tokens: odd

    @torch.no_grad()
    def forward():  # WanPipeline's call
        return pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, attention_kwargs=None,
                                return_dict=False)[0]

    want_forward, want_pipeline = forward(), _generate(pipe)
    results = {}
    for u, r in ((2, 1), (1, 2)):
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=u, ring_degree=r))
        sp = model._parallel
        got_forward, got_pipeline = forward(), _generate(pipe)
        pipe.transformer.disable_parallelism()
        results[f"u{u}r{r}"] = {"degrees": [sp.U, sp.R], "forward": _err(got_forward, want_forward),
                                "pipeline": _err(got_pipeline, want_pipeline)}
    with open(out_path, "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.subprocess
def test_wan_model_pipeline_under_diffusers_enable_parallelism(tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(r), str(port), str(outs[r])], cwd=root,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    t0, errs = time.monotonic(), []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=max(1.0, PARALLEL_TIMEOUT_S - (time.monotonic() - t0)))[1][-3000:])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            errs.append("TIMEOUT\n" + p.communicate()[1][-3000:])
    assert [p.returncode for p in procs] == [0, 0], errs
    for rank, out in enumerate(outs):
        for layout, got in json.loads(out.read_text()).items():
            print(f"rank {rank} {layout}: forward {got['forward']:.2e}, pipeline {got['pipeline']:.2e}")
            assert got["degrees"] == [int(layout[1]), int(layout[3])], (rank, layout, got)
            assert got["forward"] <= FP32_TOL and got["pipeline"] <= FP32_TOL, (rank, layout, got)


def test_diffusers_parallel_config_maps_or_is_a_clear_error(model):
    from diffusers import ContextParallelConfig, ParallelConfig, TensorParallelConfig

    from wan_model.compat.diffusers import parallel_degrees

    assert parallel_degrees(ContextParallelConfig(ulysses_degree=2, ring_degree=3)) == (2, 3)
    assert parallel_degrees(ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=4))) == (1, 4)
    cases = [(dict(config=ContextParallelConfig(ulysses_degree=2), cp_plan={"": {}}), ValueError, "cp_plan is a plan"),
             (dict(config=TensorParallelConfig(tp_degree=2)), ValueError, r"tensor parallelism \(TensorParallelConfig"),
             (dict(config=ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=2))), ValueError,
              "tensor parallelism"),
             (dict(config=ParallelConfig()), ValueError, "a ParallelConfig without a context_parallel_config"),
             (dict(config={"ulysses_degree": 2}), TypeError, "must be a diffusers ContextParallelConfig or "
                                                            "ParallelConfig, got dict"),
             (dict(config=ContextParallelConfig(ulysses_degree=2, mesh=object())), ValueError,
              r"ContextParallelConfig\(mesh=...\) is not supported; pass group="),
             (dict(ring_degree=2, config=ContextParallelConfig(ulysses_degree=2)), ValueError,
              "either as ulysses_degree/ring_degree or in config, not both")]
    for kw, error, match in cases:
        with pytest.raises(error, match=match):
            model.enable_parallelism(**kw)
        assert model._parallel is None
    with pytest.raises(RuntimeError, match="init_process_group first"):  # mapped, then our own check
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))


if __name__ == "__main__":
    import sys

    _parallel_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])


# ---------------------------------------------------------------------------------------------
# Patched vs unpatched forwards (tests/conftest.py's fp32 pairs)

def _run(ref, inputs):
    x, t, text, img = inputs
    with torch.no_grad():
        return ref(x, t, text, img, return_dict=False)[0]


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["ref", "auto"])
@pytest.mark.parametrize("variant", ["tiny-t2v", "tiny-i2v", "tiny-flf2v", "tiny-ti2v"])
def test_patched_diffusers_matches_unpatched(fp32_models, variant, impl):
    model, ref = fp32_models[variant]
    inputs = make_inputs(model.config)
    expected = _run(ref, inputs)
    patched = use_wan_kernels(copy.deepcopy(ref), impl=impl)
    assert all(isinstance(b.attn1.processor, WanKernelsAttnProcessor) and not hasattr(b.attn1, "to_qkv")
               for b in patched.blocks)  # the processor fuses q|k|v per call: no second copy of the weights
    err = (_run(patched, inputs) - expected).abs().max().item()
    print(f"{variant} impl={impl}: patched vs unpatched diffusers {err:.3e}")
    assert err <= FP32_TOL


def test_patches_every_transformer_of_a_pipeline(fp32_models):
    _, ref = fp32_models["tiny-t2v"]
    pipe = types.SimpleNamespace(transformer=copy.deepcopy(ref), transformer_2=copy.deepcopy(ref), vae=None)
    assert use_wan_kernels(pipe) is pipe
    for t in (pipe.transformer, pipe.transformer_2):
        assert all(isinstance(b.attn2.processor, WanKernelsAttnProcessor) for b in t.blocks)
    with pytest.raises(TypeError, match="expected a WanTransformer3DModel or a pipeline"):
        use_wan_kernels(types.SimpleNamespace(unet=None))
