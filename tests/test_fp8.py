"""FP8 weights end to end (wan_kernels/fp8.py, wan::fp8_linear, FP8Linear, quantize("fp8"), ComfyUI fp8 files):
bytes checked against comfy-kitchen (ComfyUI's kernels, eager CPU backend), W8A8 numerics through torch._scaled_mm
(which torch 2.14 runs on CPU), the dispatcher's W8A8/W8A16 choice per simulated capability, SNR vs the dense
model, bit-exact save/load round trips and the errors."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file


from wan_kernels import fp8, routing, samples
from wan_kernels._spec import SPECS
from wan_kernels.linear import FP8Linear
from wan_model.testing import make_inputs, random_model
from wan_model.core.config import WanConfig
from wan_model.compat.layouts import COMFY_PREFIX, CheckpointError, diffusers_to_original_key, native_to_diffusers
from wan_model.core.model import qkv_module_then_norm_rope
from wan_model.model import WanModel
from wan_model.compat.quantize import DEFAULT_KEEP, FP8Config, FP8StackedKV, NVFP4Config, layer_groups

ck = pytest.importorskip("comfy_kitchen")  # a test dependency (requirements.txt); runs on CPU
from comfy_kitchen.tensor import QuantizedTensor, TensorCoreFP8Layout  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _bits(t):
    return t.reshape(-1).view(torch.uint8) if t.dtype.itemsize == 1 else t.reshape(-1)


def _snr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    return 10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum()).item()


def _weight(n=48, k=64, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * torch.rand(n, 1) * 3
    w[3] = 0  # an all-zero row
    return w


# ---------------------------------------------------------------------------------------------
# the format, against comfy-kitchen

@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_is_comfy_kitchens(dtype):
    w = _weight()
    qt = QuantizedTensor.from_float(w, "TensorCoreFP8Layout", dtype=dtype)
    s = fp8.scale_of(w, dtype=dtype)
    assert s.dtype == torch.float32 and s.shape == () and torch.equal(s, qt._params.scale)  # amax / max
    q = fp8.quantize(w, s, dtype)
    assert q.dtype == dtype and torch.equal(_bits(q), _bits(qt._qdata))
    assert torch.equal(fp8.dequantize(q, s), qt.dequantize())  # decode direction: fp8 * scale
    # per output row: each row is comfy-kitchen's per-tensor quantization of that row
    sr = fp8.scale_of(w, per_channel=True, dtype=dtype)
    assert sr.shape == (48, 1) and sr[3].item() == 1.0  # an all-zero row gets scale 1 (codes 0), not 0 (NaN)
    qr = fp8.quantize(w, sr, dtype)
    for i in (0, 7, 47):
        assert torch.equal(_bits(qr[i]), _bits(ck.quantize_per_tensor_fp8(w[i], sr[i, 0], dtype)))
    assert torch.equal(fp8.dequantize(qr[3:4], sr[3:4]), torch.zeros(1, 64))


def test_quantize_clamps_instead_of_nan():
    w = torch.tensor([[1.0, -2.0, 0.5, 1e-9]])
    q = fp8.quantize(w, torch.tensor(1 / 448), E4M3)  # 2 * 448 = 896 is past e4m3's 448 (torch's cast: NaN)
    assert q.float().tolist() == [[448.0, -448.0, 224.0, 0.0]]


# ---------------------------------------------------------------------------------------------
# the op: W8A16 reference, W8A8 through torch._scaled_mm, the dispatcher's choice

def test_reference_is_the_dequantized_matmul():
    x, w, s, _, b = samples.op_inputs()["fp8_linear"]
    want = x.double() @ (w.double() * s.double()).t() + b.double()
    torch.testing.assert_close(fp8.fp8_linear(x, w, s, None, b).double(), want, rtol=1e-6, atol=1e-5)  # fp32 GEMM


def test_w8a8_is_comfy_kitchens_fp8_linear():
    """Both operands fp8 QuantizedTensors: comfy-kitchen's aten.linear handler runs scaled_mm on the same bytes
    (dynamic per-tensor activation scale amax / 448) as our W8A8 path; fp32 so that its x quantization (in x's
    dtype) equals ours (in fp32)."""
    g = torch.Generator().manual_seed(1)
    w, x, b = _weight(), torch.randn(2, 5, 64, generator=g), torch.randn(48, generator=g)
    qw, qx = QuantizedTensor.from_float(w, "TensorCoreFP8Layout"), QuantizedTensor.from_float(x, "TensorCoreFP8Layout")
    assert torch.equal(_bits(qx._qdata), _bits(fp8.quantize(x, fp8.activation_scale(x))))
    theirs = torch.nn.functional.linear(qx, qw, b)
    ours = fp8.fp8_linear_w8a8(x, qw._qdata, qw._params.scale, None, b)
    # same fp8 products, fp32 accumulation; the epilogues apply scales and bias in another order: a few ulp
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
    # and it is W8A8, not W8A16: the activation rounding shows
    assert (ours - fp8.fp8_linear(x, qw._qdata, qw._params.scale, None, b)).abs().max() > 1e-2


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_numerics(per_channel, static):
    """W8A8 == (x rounded to e4m3 with its scale) @ dequantized w, in fp64, to fp32 rounding; rowwise scales
    for per-channel weights, a static input_scale when given."""
    w, x = _weight(), torch.randn(7, 64, generator=torch.Generator().manual_seed(2))
    s = fp8.scale_of(w, per_channel)
    q = fp8.quantize(w, s)
    xs = torch.tensor(0.01) if static else fp8.activation_scale(x)  # 0.01 * 448 < amax(x): clamps some
    got = fp8.fp8_linear_w8a8(x, q, s, xs if static else None, None)
    want = fp8.quantize(x, xs).double() * xs.double() @ (q.double() * s.double()).t()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)


def _cuda_key(args):
    return torch.ops.wan.fp8_linear.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)


def _calls():
    """(args, W8A8 takes it) of calls on bf16/fp16/fp32 inputs and awkward shapes."""
    g = torch.Generator().manual_seed(3)

    def call(n, k, dtype, per_channel=False, bias_dtype=None, wdtype=E4M3):
        w = torch.randn(n, k, generator=g)
        s = fp8.scale_of(w, per_channel, wdtype)
        bias = torch.randn(n, generator=g).to(bias_dtype or dtype)
        return (torch.randn(3, k, generator=g).to(dtype), fp8.quantize(w, s, wdtype), s, None, bias)

    return [(call(32, 64, torch.bfloat16), True), (call(32, 64, torch.float16), True),
            (call(32, 64, torch.bfloat16, per_channel=True), True),
            (call(32, 64, torch.bfloat16, wdtype=E5M2), True),
            (call(32, 64, torch.float16, per_channel=True), False),  # rowwise scaling writes bf16 only
            (call(32, 64, torch.bfloat16, per_channel=True, wdtype=E5M2), False),
            (call(32, 64, torch.float32), False),                     # _scaled_mm: no fp32 output with a bias
            (call(32, 64, torch.bfloat16, bias_dtype=torch.float32), False),
            (call(32, 40, torch.bfloat16), False), (call(24, 64, torch.bfloat16), False)]  # K, N % 16


@pytest.mark.parametrize("cap, w8a8", [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True),
                                       ((10, 0), True), ((10, 3), True), ((12, 0), True), ((7, 5), False)])
def test_dispatcher_runs_w8a8_from_sm89(cap, w8a8, capability, monkeypatch):
    capability(cap)
    assert routing.auto_backend("fp8_linear", cap) == ("cuda" if w8a8 else "ref")
    ran = []
    real = routing.backend_fn
    monkeypatch.setattr(routing, "backend_fn",
                        lambda s, b, cap=None: (lambda *a: ran.append(b) or real(s, "ref")(*a)))
    routing.clear_caches()
    for args, takes in _calls():
        _cuda_key(args)
        assert ran.pop() == ("cuda" if w8a8 and takes else "ref"), [tuple(a.shape) for a in args[:3]]


def test_cuda_kernel_is_torch_scaled_mm():
    """The internal op's CUDA kernel is the W8A8 function (registered from Python: torch ships the kernel); run
    through the CUDA key on CPU tensors, it is torch._scaled_mm's result."""
    spec = SPECS["fp8_linear"]
    assert isinstance(spec.cuda, routing.TorchCudaKernel) and spec.cuda.fn is fp8.fp8_linear_w8a8
    for args, takes in _calls()[:3]:
        got = torch.ops.wan.fp8_linear_scaled_mm.default.redispatch(
            torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)
        assert torch.equal(got, fp8.fp8_linear_w8a8(*args))
        assert not torch.equal(got, fp8.fp8_linear(*args))  # W8A8, not the reference


def test_named_cuda_backend_refused_before_sm89(capability):
    capability((8, 6))
    with pytest.raises(routing.BackendUnavailableError, match=r"needs compute capability >= \(8, 9\).*\(8, 6\)"):
        routing.resolve("fp8_linear", "cuda", torch.device("cuda", 0))


def test_op_errors():
    x, w, s, _, b = samples.op_inputs()["fp8_linear"]
    op = torch.ops.wan.fp8_linear
    cases = [((x, w.float(), s, None, b), r"w must be 2-D float8_e4m3fn/float8_e5m2 \[N, K\], got shape \(32, 64\) "
                                          r"dtype torch.float32"),
             ((x, w, s[:4], None, b), r"w_scale must be float32 \[\] \(per tensor\) or \[32, 1\] .*got shape \(4, 1\)"),
             ((x, w, s.double(), None, b), r"w_scale must be float32 .*dtype torch.float64"),
             ((x[..., :32], w, s, None, b), r"x must be \[\.\.\., 64\] for w of shape \(32, 64\), got shape \(2, 5, 32\)"),
             ((x, w, s, torch.ones(2), b), r"input_scale must be a 1-element float32 tensor, got shape \(2,\)"),
             ((x, w, s, None, b[:3]), r"bias must be \[32\], got shape \(3,\)")]
    for args, message in cases:
        with pytest.raises(ValueError, match="fp8_linear: " + message):
            op(*args)


def test_gradient_in_x_only():
    x, w, s, _, b = samples.op_inputs(torch.float64 if False else torch.float32)["fp8_linear"]
    x = x.detach().requires_grad_()
    gy = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    gx, = torch.autograd.grad(torch.ops.wan.fp8_linear(x, w, s, None, b), x, gy)
    torch.testing.assert_close(gx.double(), gy.double() @ (w.double() * s.double()), rtol=1e-6, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"differentiable only in x, but bias requires grad"):
        torch.ops.wan.fp8_linear(x, w, s, None, b.clone().requires_grad_())


# ---------------------------------------------------------------------------------------------
# FP8Linear

@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_linear_module(per_channel):
    lin = torch.nn.Linear(64, 48)
    q = FP8Linear.from_linear(lin, per_channel=per_channel)
    s = fp8.scale_of(lin.weight, per_channel)
    assert q.weight.dtype == E4M3 and torch.equal(q.weight_scale, s)
    assert torch.equal(_bits(q.weight), _bits(fp8.quantize(lin.weight, s)))
    assert torch.equal(q.dense_weight(), fp8.dequantize(q.weight, s))
    x = torch.randn(4, 64)
    assert torch.equal(q(x), fp8.fp8_linear(x, q.weight, s, None, q.bias))
    # .to(dtype) keeps the fp8 weight and fp32 scales
    h = copy.deepcopy(q).to(torch.bfloat16)
    assert h.weight.dtype == E4M3 and h.weight_scale.dtype == torch.float32 and h.bias.dtype == torch.bfloat16
    # a new dense weight (a LoRA fused in) gets a fresh scale of the same granularity
    new = q.dense_weight() + 0.5
    q.set_dense_weight(new)
    assert torch.equal(q.weight_scale, fp8.scale_of(new, per_channel))
    assert torch.equal(_bits(q.weight), _bits(fp8.quantize(new, fp8.scale_of(new, per_channel))))
    with pytest.raises(ValueError, match=r"set_dense_weight: weight must be \[48, 64\], got \[64, 48\]"):
        q.set_dense_weight(new.t())


# ---------------------------------------------------------------------------------------------
# the model

@pytest.fixture(scope="module")
def dense():
    return random_model(WanConfig.from_preset("tiny-i2v"), seed=5).eval()


def _run(model, dtype=torch.float32):
    x, t, text, img = make_inputs(model.config, dtype)
    with torch.no_grad():
        return model(x, t, text, img)


@pytest.mark.slow
def test_quantize_structure_and_shared_scales(dense):
    model = copy.deepcopy(dense).quantize("fp8")
    assert model.quantization == FP8Config() and model.quantization.keep == DEFAULT_KEEP
    ce = model.condition_embedder
    assert all(type(m) is torch.nn.Linear for m in (ce.time_embedder["linear_1"], ce.text_embedder["linear_2"],
                                                    ce.image_embedder.ff["proj_in"], model.proj_out))
    for b, db in zip(model.blocks, dense.blocks):
        assert isinstance(b.attn1.to_qkv, FP8Linear) and b.attn1.project_qkv is qkv_module_then_norm_rope
        # the fused QKV: ONE per-tensor scale, the max over q, k, v of amax / 448
        assert b.attn1.to_qkv.weight_scale.shape == ()
        assert torch.equal(b.attn1.to_qkv.weight_scale, db.attn1.to_qkv.weight.abs().amax() / 448)
    for kv, dkv in ((model.cross_kv, dense.cross_kv), (model.cross_kv_img, dense.cross_kv_img)):
        assert isinstance(kv, FP8StackedKV) and torch.equal(kv.weight_scale, dkv.weight.abs().amax() / 448)
    pc = copy.deepcopy(dense).quantize("fp8", FP8Config(per_channel=True))
    assert pc.cross_kv.weight_scale.shape == (pc.cross_kv.out_features, 1)
    with pytest.raises(ValueError, match="quantize\\('fp8'\\) takes an FP8Config, got NVFP4Config"):
        copy.deepcopy(dense).quantize("fp8", NVFP4Config())
    with pytest.raises(ValueError, match="fp8 dtype must be one of"):
        FP8Config(dtype="float8_e4m3fnuz")


@pytest.mark.slow
def test_snr_vs_dense_and_equal_to_dequantized(dense):
    want = _run(dense)
    for per_channel in (False, True):
        model = copy.deepcopy(dense).quantize("fp8", FP8Config(per_channel=per_channel))
        out = _run(model)
        snr = _snr_db(want, out)
        print(f"tiny-i2v fp8 {'per-channel' if per_channel else 'per-tensor'} (W8A16, fp32 activations) vs dense: "
              f"{snr:.2f} dB")
        assert snr >= 25.0  # measured 30-31 dB on these random weights (e4m3: 3 mantissa bits, ~2^-5 relative)
        # W8A16 is exactly a dense model holding the dequantized weights, up to GEMM order (fp32)
        deq = copy.deepcopy(dense)
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, FP8Linear):
                    deq.get_submodule(name).weight.copy_(m.dense_weight())
        torch.testing.assert_close(out, _run(deq), rtol=1e-4, atol=1e-4)  # fp32 GEMM order through 2 blocks


# ---------------------------------------------------------------------------------------------
# checkpoints

def _same_state(a: WanModel, b: WanModel):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(_bits(sa[k]), _bits(sb[k])), k


@pytest.fixture(scope="module")
def quantized(dense):
    return {pc: copy.deepcopy(dense).quantize("fp8", FP8Config(per_channel=pc)) for pc in (False, True)}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["diffusers", "original", "comfyui", "comfyui-scaled-fp8"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_round_trip_bit_exact(quantized, fmt, per_channel, tmp_path):
    model = quantized[per_channel]
    path = tmp_path / (fmt if fmt == "diffusers" else f"{fmt}.safetensors")
    if per_channel and fmt.startswith("comfyui"):
        with pytest.raises(ValueError, match=r"ComfyUI's fp8 layers hold one scale per tensor .*per-row scales"):
            model.save_pretrained(path, format=fmt)
        assert not path.exists()  # the save is atomic: nothing left behind
        return
    model.save_pretrained(path, format=fmt)
    got = WanModel.from_pretrained(path, dtype=torch.float32, impl=model.impl)
    assert isinstance(got.blocks[0].ffn["proj_in"], FP8Linear) and got.quantization.layers is not None
    _same_state(got, model)  # the same fp8 bytes and scales
    assert torch.equal(_run(got), _run(model))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["comfyui", "comfyui-scaled-fp8"])
def test_comfyui_file_read_by_comfy_kitchen(quantized, fmt, tmp_path):
    """What ComfyUI's loader does with our file (comfy/ops.py mixed_precision_ops: the marker's JSON, a single
    weight_scale into TensorCoreFP8Layout.Params; legacy files first through comfy/utils.py convert_old_quants:
    the `scaled_fp8` sentinel's dtype is the format, `scale_weight` becomes weight_scale) dequantizes our fp8
    layers, fused groups' members included, to our values."""
    model = quantized[False]
    path = tmp_path / "c.safetensors"
    model.save_pretrained(path, format=fmt)
    sd, ours = load_file(path), native_to_diffusers(dict(model.state_dict()), model.config)
    if fmt == "comfyui-scaled-fp8":
        sentinel = sd[COMFY_PREFIX + "scaled_fp8"]
        assert sentinel.dtype == E4M3 and sentinel.numel() == 0  # 2 elements would ask for full-precision matmuls
        assert not any(k.endswith((".comfy_quant", ".weight_scale")) for k in sd)
    layers = [m for _, ms in layer_groups(model.config) for m in ms if m + ".weight_scale" in ours]
    assert "blocks.1.attn1.to_k" in layers and "blocks.0.attn2.add_v_proj" in layers
    for layer in layers:
        key = COMFY_PREFIX + diffusers_to_original_key(layer)
        if fmt == "comfyui":
            assert json.loads(sd[key + ".comfy_quant"].numpy().tobytes()) == {"format": "float8_e4m3fn"}
            scale = sd[key + ".weight_scale"]
        else:
            scale = sd[key + ".scale_weight"]
        w = sd[key + ".weight"]
        assert w.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == ()
        params = TensorCoreFP8Layout.Params(scale=scale, orig_dtype=torch.float32, orig_shape=tuple(w.shape))
        theirs = QuantizedTensor(w, "TensorCoreFP8Layout", params).dequantize()
        assert torch.equal(theirs, fp8.dequantize(ours[layer + ".weight"], ours[layer + ".weight_scale"]))


def _comfy_kitchen_file(model: WanModel, path) -> WanModel:
    """A ComfyUI fp8 file quantized by comfy-kitchen (TensorCoreFP8Layout, as ComfyUI's state_dict() writes it):
    EVERY quantizable Linear with its own per-tensor scale, the members of our fused groups (q, k, v; the
    cross-attention k, v of each layer) included. Returns the dense model holding comfy-kitchen's dequantized
    weights."""
    sd = native_to_diffusers(dict(model.state_dict()), model.config)
    out, ref = {}, dict(sd)
    for _, members in layer_groups(model.config):
        if members[0].startswith(("condition_embedder.text", "condition_embedder.image", "proj_out")):
            continue  # our default keep list
        for m in members:
            qt = QuantizedTensor.from_float(sd[m + ".weight"].float(), "TensorCoreFP8Layout")
            key = COMFY_PREFIX + diffusers_to_original_key(m)
            out[key + ".weight"], out[key + ".weight_scale"] = qt._qdata, qt._params.scale
            out[key + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                      dtype=torch.uint8)
            ref[m + ".weight"] = qt.dequantize()
    for k, v in sd.items():
        out.setdefault(COMFY_PREFIX + diffusers_to_original_key(k), v.contiguous())
    save_file(out, path)
    from wan_model.io.checkpoint import model_from_state_dict
    return model_from_state_dict(ref, model.config, torch.float32, impl=model.impl)


@pytest.mark.slow
def test_comfy_kitchen_quantized_file_loads_in_fp8(dense, tmp_path):
    path = tmp_path / "ck.safetensors"
    ref = _comfy_kitchen_file(dense, path)
    got = WanModel.from_pretrained(path, dtype=torch.float32, impl=dense.impl)
    qkv = got.blocks[0].attn1.to_qkv
    assert isinstance(qkv, FP8Linear) and qkv.weight.dtype == E4M3
    # q, k, v came with three scales: kept exactly as a per-row scale of the fused module (no re-quantization)
    assert qkv.weight_scale.shape == (3 * 256, 1) and qkv.weight_scale.unique().numel() == 3
    torch.testing.assert_close(qkv.dense_weight(), ref.blocks[0].attn1.to_qkv.weight, rtol=0, atol=0)
    torch.testing.assert_close(got.cross_kv.dense_weight(), ref.cross_kv.weight, rtol=0, atol=0)
    out, want = _run(got), _run(ref)
    err = (out - want).abs().max().item()
    print(f"comfy-kitchen fp8 file in our model (W8A16) vs dense with comfy-kitchen's dequantized weights: {err:.2e}")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)  # same weights; fp32 GEMM order through 2 blocks
    # saved back as ComfyUI: comfy-kitchen's bytes and scales, layer for layer
    got.save_pretrained(tmp_path / "back.safetensors", format="comfyui")
    a, b = load_file(path), load_file(tmp_path / "back.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(_bits(a[k]), _bits(b[k])), k


@pytest.mark.slow
def test_legacy_scaled_file_keeps_fp8(dense, tmp_path):
    """A legacy `scaled_fp8` file quantizing every 2-D weight (time embedder included, which diffusers keeps in
    fp32) with `scale_input` 1.0 (= none): the quantizable layers load as FP8Linear with the file's bytes, the
    others are dequantized (exact)."""
    sd = load_file(_saved(dense, tmp_path, "comfyui"))
    scaled = {COMFY_PREFIX + "scaled_fp8": torch.empty(0, dtype=E4M3)}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            s = v.abs().amax().float() / 448
            scaled[k], scaled[k[:-7] + ".scale_weight"] = fp8.quantize(v, s), s.reshape(1)
            scaled[k[:-7] + ".scale_input"] = torch.ones(1)
        else:
            scaled[k] = v
    save_file(scaled, tmp_path / "legacy.safetensors")
    got = WanModel.from_pretrained(tmp_path / "legacy.safetensors", dtype=torch.float32)
    ffn = got.blocks[1].ffn["proj_out"]
    key = COMFY_PREFIX + "blocks.1.ffn.2"
    assert isinstance(ffn, FP8Linear) and ffn.input_scale is None  # scale_input 1.0: dynamic activation scale
    assert torch.equal(_bits(ffn.weight), _bits(scaled[key + ".weight"]))
    assert torch.equal(ffn.weight_scale, scaled[key + ".scale_weight"].reshape(()))
    te = got.condition_embedder.time_embedder["linear_1"]
    assert type(te) is torch.nn.Linear and te.weight.dtype == torch.float32
    k = COMFY_PREFIX + "time_embedding.0"
    assert torch.equal(te.weight, fp8.dequantize(scaled[k + ".weight"], scaled[k + ".scale_weight"]))
    assert type(got.proj_out) is FP8Linear  # in the file as fp8: kept so, whatever our default keep list


def _saved(model, tmp_path, fmt):
    path = tmp_path / f"{fmt}-dense.safetensors"
    model.save_pretrained(path, format=fmt)
    return path


def test_checkpoint_errors(quantized, tmp_path):
    path = tmp_path / "o.safetensors"
    quantized[False].save_pretrained(path, format="original")
    sd = load_file(path)
    cases = [({k: v for k, v in sd.items() if k != "blocks.0.ffn.0.weight_scale"},
              CheckpointError, r"fp8 tensors without their scale .*\['blocks\.0\.ffn\.0\.weight'\]"),
             (dict(sd, **{"blocks.0.ffn.0.weight_scale": torch.ones(3)}),
              CheckpointError, r"blocks\.0\.ffn\.0\.weight_scale: the scale of FP8 weight blocks\.0\.ffn\.0\.weight "
                               r"\(512, 256\) must be float32 \[\] or \[512, 1\], got shape \(3,\)")]
    for i, (change, err, message) in enumerate(cases):
        save_file(change, tmp_path / f"bad{i}.safetensors")
        with pytest.raises(err, match=message):
            WanModel.from_pretrained(tmp_path / f"bad{i}.safetensors")
    comfy = load_file(_saved(quantized[False], tmp_path, "comfyui"))
    layer = COMFY_PREFIX + "blocks.0.ffn.0"
    bad = [({k: v for k, v in comfy.items() if k != layer + ".weight_scale"},
            r"blocks\.0\.ffn\.0: ComfyUI quantized weight format \{'format': 'float8_e4m3fn'\} is not supported .*"
            r"got weight_scale None"),
           (dict(comfy, **{layer + ".weight_scale": torch.ones(2, 2)}),
            r"blocks\.0\.ffn\.0\.comfy_quant: an fp8 weight scale is one float per tensor .*got shape \(2, 2\)"),
           (dict(comfy, **{layer + ".comfy_quant": torch.tensor(list(b'{"format": "float8_e5m2"}'), dtype=torch.uint8)}),
            r"blocks\.0\.ffn\.0\.comfy_quant: says float8_e5m2, but blocks\.0\.ffn\.0\.weight is torch\.float8_e4m3fn"),
           ({k: v for k, v in comfy.items() if k not in (layer + ".weight_scale", layer + ".comfy_quant")},
            r"fp8 weights without a scale .*blocks\.0\.ffn\.0\.weight")]
    for i, (change, message) in enumerate(bad):
        save_file(change, tmp_path / f"cbad{i}.safetensors")
        with pytest.raises(CheckpointError, match=message):
            WanModel.from_pretrained(tmp_path / f"cbad{i}.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("fmt, flag", [("comfyui", "fp8"), ("original", "fp8-per-channel")])
def test_streaming_convert_equals_in_memory(dense, fmt, flag, tmp_path):
    """`convert --quantize fp8` (one tensor at a time; fused groups' shared scale from a first pass over their
    members) writes the bytes of from_pretrained(src).quantize("fp8") saved in the format."""
    from wan_model.cli import main as cli_main

    src = tmp_path / "bf16"
    copy.deepcopy(dense).to_dtype(torch.bfloat16).save_pretrained(src)
    out = tmp_path / "stream.safetensors"
    assert cli_main(["convert", str(src), str(out), "--format", fmt, "--quantize", flag, "--no-progress"]) == 0
    config = FP8Config(per_channel=flag == "fp8-per-channel")
    WanModel.from_pretrained(src, dtype=torch.bfloat16).quantize("fp8", config).save_pretrained(
        tmp_path / "mem.safetensors", format=fmt)
    a, b = load_file(out), load_file(tmp_path / "mem.safetensors")
    assert set(a) == set(b) and any(v.dtype == E4M3 for v in a.values())
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(_bits(a[k]), _bits(b[k])), k
    from wan_model.io.convert import convert_checkpoint
    with pytest.raises(CheckpointError, match="is already FP8-quantized|ComfyUI fp8-scaled file is not supported"):
        convert_checkpoint(out, tmp_path / "again.safetensors", fmt, quantize="fp8", progress=False)


BAD_SCALES = [0.0, -0.5, float("nan"), float("inf")]


@pytest.mark.parametrize("bad", BAD_SCALES)
def test_op_refuses_bad_scale_values(bad):
    """A w_scale / input_scale of 0, < 0, NaN or inf would zero, sign-flip or poison the layer: ValueError naming
    the argument and the value, at the dispatcher op and the wrapper, per tensor and per row (CPU tensors)."""
    x, w, s, _, b = samples.op_inputs()["fp8_linear"]
    per_row = s.clone()
    per_row[5, 0] = bad
    cases = [((x, w, torch.tensor(bad), None, b), rf"w_scale must be finite and > 0, got {bad}"),
             ((x, w, per_row, None, b), rf"w_scale must be finite and > 0, got {bad} at \[5, 0\]"),
             ((x, w, s, torch.tensor(bad), b), rf"input_scale must be finite and > 0, got {bad}")]
    for args, message in cases:
        for op in (torch.ops.wan.fp8_linear, fp8_linear_wrapper):
            with pytest.raises(ValueError, match="fp8_linear: " + message):
                op(*args)
    with pytest.raises(ValueError, match=rf"fp8_linear: w_scale must be finite and > 0, got {bad}"):
        fp8_linear_wrapper(x, w, bad, None, b)  # a Python float, refused before it becomes a tensor


def fp8_linear_wrapper(*args):
    from wan_kernels import fp8_linear
    return fp8_linear(*args, impl="ref")


def test_op_takes_python_float_scales():
    x, w, s, _, b = samples.op_inputs()["fp8_linear"]
    s = s.amax()  # one per-tensor scale
    want = fp8_linear_wrapper(x, w, s, torch.tensor(0.02), b)
    assert torch.equal(fp8_linear_wrapper(x, w, s.item(), 0.02, b), want)


@pytest.mark.slow
@pytest.mark.parametrize("fmt, per_channel", [("original", False), ("diffusers", True), ("comfyui", False),
                                              ("comfyui-scaled-fp8", False)])
@pytest.mark.parametrize("bad", BAD_SCALES)
def test_checkpoint_scale_values_refused(quantized, fmt, per_channel, bad, tmp_path):
    """Every fp8 scale flavour (ours per tensor / per row, ComfyUI comfy_quant `weight_scale` and `input_scale`,
    legacy scaled_fp8 `scale_weight`) of 0, < 0, NaN or inf is refused on load: CheckpointError naming the file,
    the key and the value (it used to load and zero, sign-flip or NaN the layer)."""
    src = tmp_path / ("src" if fmt == "diffusers" else "src.safetensors")
    quantized[per_channel].save_pretrained(src, format=fmt)
    path = src / "diffusion_pytorch_model.safetensors" if fmt == "diffusers" else src
    sd = load_file(path)
    prefix = COMFY_PREFIX if fmt.startswith("comfyui") else ""
    layer = prefix + ("blocks.0.ffn.net.0.proj" if fmt == "diffusers" else "blocks.0.ffn.0")
    key = layer + (".scale_weight" if fmt == "comfyui-scaled-fp8" else ".weight_scale")
    scale = sd[key].clone()
    scale.view(-1)[min(7, scale.numel() - 1)] = bad
    keys = [(key, scale)]
    if fmt == "comfyui":  # a static activation scale too
        keys.append((layer + ".input_scale", torch.tensor(bad)))
    for k, v in keys:
        save_file(dict(sd, **{k: v}), path)
        where = f"{path}: {k}: a scale must be finite and > 0, got {bad}" + (" at [7, 0]" if per_channel else "")
        with pytest.raises(CheckpointError, match=re.escape(where)):
            WanModel.from_pretrained(src)


@pytest.mark.parametrize("bad", [0.0, float("nan")])
def test_streaming_convert_refuses_bad_scale_values(quantized, bad, tmp_path):
    """The streaming converter (LazyCheckpoint: `convert --quantize`) reads the same scale values as a load and
    refuses them alike, before anything is written (it used to requantize the garbage layer)."""
    from wan_model.io.convert import convert_nvfp4

    src = tmp_path / "src.safetensors"
    quantized[False].save_pretrained(src, format="original")
    sd = load_file(src)
    key = "blocks.0.ffn.0.weight_scale"
    save_file(dict(sd, **{key: torch.tensor(bad)}), src)
    with pytest.raises(CheckpointError, match=re.escape(f"{src}: {key}: a scale must be finite and > 0, got {bad}")):
        convert_nvfp4(src, tmp_path / "dst", config=NVFP4Config(), progress=False)
    assert not (tmp_path / "dst").exists()
