"""Analytic cost model of the Wan DiT: FLOPs, bytes, weight/activation/K-V-cache bytes per op and layer.

Counting rules (what the tests hold the model to, tests/test_cost.py):

* FLOPs are matrix-product FLOPs (2 per multiply-add: GEMMs, the conv patch embedding, q k^T and p v),
  as `torch.utils.flop_counter.FlopCounterMode` counts them; softmax/norm/elementwise work is 0. They equal
  the counter on a real forward of `WanModel(impl="ref")` and of the fused model (the `wan` op formulas are
  in `wan_kernels/flops.py`, imported here lazily by `flop_counter()`).
* Bytes are kernel-level HBM traffic with no cache reuse: every kernel reads its inputs and writes its
  outputs once (views are free; a broadcast operand counts its distinct elements). The kernels are not listed
  by hand: the model's parts (the transformer block, the VACE block, the head, `prepare_context`'s embedders and
  stacked K/V, the patch, time and control embeddings) run on meta tensors of the real shapes under a dispatch
  mode (`_kernel_trace`) that records each op as one kernel:
    - impl="ref":   one aten op of the eager reference path (fp32 casts, materialised [B, H, S, Sk] attention
                    scores, ...);
    - impl="fused": a `wan` op is one kernel counted by its spec (`OpSpec.cost`: qk_norm_rope in one pass,
                    flash attention: q, k, v read once, out written once); every other op as in the ref path.
  tests/test_cost.py holds the blocks to an independent byte count attributed by source line, to closed forms
  and to the flop counter, and the context and head to the independent count in total. TI2V's per-token
  timesteps: torch.unique cannot run on meta tensors; the trace is told how many values it finds
  (`timestep_rows`). The VACE hint's scale and add (two elementwise ops of the forward's loop) are traced as
  written there.
* Weight formats change the block GEMM weights (and the stacked cross-attention K/V weights): bf16 2 bytes
  per element, fp8 1 byte + a 4-byte per-tensor scale, nvfp4 K/2 + K/16 bytes per row + a 4-byte global
  scale; embedders, norms and the head stay as stored (bf16 / fp32). nvfp4 GEMMs run at the fp4 tensor-core
  peak where a GPU has one (W4A4, Blackwell), else at the bf16 peak (W4A16 dequantising fallback); fp8 at the
  bf16 peak (the peak table has no fp8 column). Activations are bf16 in every format.
* VACE models (config.vace_layers): the control branch is counted as it runs (wan_model/core/model.py): the
  control patch embedding and VACE block 0's proj_in once ("embed"), ONE VACE block (a block's ops + its proj_out
  hint and the scaled hint added to the stream) times len(vace_layers) (`ModelCost.vace`), the VACE blocks'
  cross-attention K/V in the context; the control latents are taken as long as the latents. The VACE branch
  stays bf16 in every weight format (quantization leaves it dense).
* Roofline per kernel: max(FLOPs / peak, bytes / bandwidth) with `wan_kernels.hardware.PEAKS`; an op is
  compute-bound when its summed compute time exceeds its summed memory time.

Shapes: a video of `frames` x `height` x `width` pixels is `(frames - 1) // 4 + 1` latent frames of
height/8 x width/8 (height/16 x width/16 for TI2V-5B's VAE), patched by `patch_size` (1, 2, 2): 1280x720,
81 frames -> 21 x 45 x 80 = 75,600 tokens; 832x480 -> 21 x 30 x 52 = 32,760. Text context 512 tokens, CLIP
image tokens 257 (FLF2V 514).
"""

from __future__ import annotations

import dataclasses
import functools
import math

from wan_model.core.config import TEXT_TOKENS, WanConfig

FORMATS = ("bf16", "fp8", "nvfp4")
RESOLUTIONS = {"480p": (832, 480), "720p": (1280, 720)}
IMAGE_TOKENS = 257
A, F32 = 2, 4  # bytes of a bf16 activation, of an fp32 value

# The design document's targets (no shapes given): (label, GPU, weight format, block ms, model ms, memory GB).
TARGETS = (("FP16 on Ampere/Hopper", "H100", "bf16", 10.0, 500.0, 8.0),
           ("NVFP4 on Blackwell", "B200", "nvfp4", 2.0, 100.0, 2.0))


def weight_nbytes(n_out: int, k_in: int, fmt: str = "bf16") -> int:
    """Bytes of one [n_out, k_in] linear weight stored in `fmt`."""
    if fmt == "bf16":
        return 2 * n_out * k_in
    if fmt == "fp8":
        return n_out * k_in + 4
    if fmt == "nvfp4":
        if k_in % 16:
            raise ValueError(f"nvfp4 needs K % 16 == 0, got K={k_in}")
        return n_out * (k_in // 2 + k_in // 16) + 4
    raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel: matmul FLOPs, bytes read / written, the batch-independent part of them (`const`:
    weights, biases, norm weights, RoPE tables), the parameter bytes it reads (`weight`), and the compute
    peak it runs at ("bf16" or "fp4")."""
    name: str
    flops: int = 0
    read: int = 0
    write: int = 0
    const: int = 0
    weight: int = 0
    peak: str = "bf16"

    @property
    def bytes(self) -> int:
        return self.read + self.write

    def time_s(self, peak: dict) -> tuple[float, float]:
        """(compute seconds, memory seconds) on a `wan_kernels.hardware.PEAKS` entry."""
        compute = peak.get(self.peak) or peak["bf16"]
        return self.flops / (compute * 1e12), self.bytes / (peak["gbps"] * 1e9)


@dataclasses.dataclass(frozen=True)
class OpCost:
    """One op of the model (a row of the table): its kernels and their sums."""
    name: str
    scope: str                  # "context" | "embed" | "block" | "head"
    kernels: tuple[Kernel, ...]

    flops = property(lambda self: sum(k.flops for k in self.kernels))
    read = property(lambda self: sum(k.read for k in self.kernels))
    write = property(lambda self: sum(k.write for k in self.kernels))
    bytes = property(lambda self: self.read + self.write)
    weight_bytes = property(lambda self: sum(k.weight for k in self.kernels))
    const_bytes = property(lambda self: sum(k.const for k in self.kernels))

    @property
    def activation_bytes(self) -> int:
        """Largest activation working set of one kernel of the op (non-constant reads + writes)."""
        return max((k.bytes - k.const for k in self.kernels), default=0)

    def roofline(self, peak: dict) -> tuple[float, str]:
        """(seconds, "compute"|"memory") on a peak-table entry: per-kernel max(compute, memory), summed."""
        times = [k.time_s(peak) for k in self.kernels]
        compute, memory = sum(t[0] for t in times), sum(t[1] for t in times)
        return sum(max(t) for t in times), ("compute" if compute >= memory else "memory")


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    latent: tuple[int, int, int]     # latent frames, height, width (before patching)
    grid: tuple[int, int, int]       # patched grid
    text_tokens: int
    image_tokens: int
    timestep_rows: int               # rows the time MLP runs on

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)


def latent_shape(cfg: WanConfig, width: int, height: int, frames: int) -> tuple[int, int, int]:
    """Latent (frames, height, width) of a video: VAE stride 4 in time, 8 in space (16 for TI2V-5B)."""
    down = 16 if cfg.in_channels == 48 else 8
    if width % (down * cfg.patch_size[2]) or height % (down * cfg.patch_size[1]):
        raise ValueError(f"{width}x{height} is not a multiple of {down * cfg.patch_size[2]}x"
                         f"{down * cfg.patch_size[1]} (VAE stride {down} x patch)")
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4k + 1 (VAE temporal stride 4), got {frames}")
    return (frames - 1) // 4 + 1, height // down, width // down


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Cost of ONE forward of one transformer (one expert) for a batch: op rows by scope."""
    config: WanConfig
    shape: Shape
    impl: str
    weight_format: str
    context: tuple[OpCost, ...]      # text/image embedders + cross-attention K/V projections (cacheable)
    embed: tuple[OpCost, ...]        # patch + time embedding
    block: tuple[OpCost, ...]        # ONE transformer block (all num_layers blocks cost the same)
    head: tuple[OpCost, ...]
    vace: tuple[OpCost, ...] = ()    # ONE VACE block (all num_vace_layers cost the same); () without VACE

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def num_vace_layers(self) -> int:
        return len(self.config.vace_layers) if self.config.has_vace else 0

    def ops(self, include_context: bool = True) -> list[tuple[OpCost, int]]:
        """(op, multiplicity) over one forward."""
        rows = [(o, 1) for o in (self.context if include_context else ())]
        return rows + [(o, 1) for o in self.embed] + [(o, self.num_layers) for o in self.block] + \
            [(o, self.num_vace_layers) for o in self.vace] + [(o, 1) for o in self.head]

    def total(self, attr: str, include_context: bool = True) -> int:
        return sum(getattr(o, attr) * n for o, n in self.ops(include_context))

    def flops(self, include_context: bool = True) -> int:
        return self.total("flops", include_context)

    def bytes(self, include_context: bool = True) -> int:
        return self.total("bytes", include_context)

    def block_total(self, attr: str) -> int:
        return sum(getattr(o, attr) for o in self.block)

    def attention_flops(self, include_context: bool = True) -> int:
        return sum(o.flops * n for o, n in self.ops(include_context) if o.name.endswith("attention"))

    @property
    def kv_cache_bytes(self) -> int:
        """Cross-attention K/V of every layer (and VACE block) for the batch's context (text + image), bf16."""
        s = self.shape
        return (self.num_layers + self.num_vace_layers) * 2 * (s.text_tokens + s.image_tokens) * self.config.dim * \
            A * s.batch

    @property
    def weight_bytes(self) -> int:
        return parameter_bytes(self.config, self.weight_format)

    @property
    def activation_peak_bytes(self) -> int:
        """High-water mark of the bytes a forward holds beyond the parameters and the caller's inputs: the tensors
        it allocates, the prepared context's cross-attention K/V (`kv_cache_bytes`: prepared once per generation,
        resident through every step) and the RoPE tables (cached on the device by the first forward).

        impl="fused": `activation_live_points` (a forward's live set at its candidate peaks), exact for T2V, I2V,
        FLF2V and VACE forwards in every weight format (tests/test_cost.py holds it equal to the storage bytes live
        in a forward on meta tensors; TI2V's per-token modulation: in one block).
        impl="ref" (an estimate, not validated): the largest kernel working set + the streams + K/V + RoPE."""
        if self.impl == "fused":
            resident, points = activation_live_points(self)
            return resident + max(points.values())
        s, c = self.shape, self.config
        work = max(o.activation_bytes for o, _ in self.ops(include_context=False))
        rope = 2 * s.tokens * (c.attention_head_dim // 2) * F32
        streams = 1 + (1 + self.num_vace_layers if c.has_vace else 0)
        return work + streams * s.batch * s.tokens * c.dim * A + self.kv_cache_bytes + rope

    def memory_bytes(self) -> int:
        """Weights + activation peak (per-step figure: does not grow with steps)."""
        return self.weight_bytes + self.activation_peak_bytes

    def roofline(self, peak: dict, include_context: bool = True) -> float:
        return sum(o.roofline(peak)[0] * n for o, n in self.ops(include_context))

    def block_roofline(self, peak: dict) -> float:
        return sum(o.roofline(peak)[0] for o in self.block)


# ---------------------------------------------------------------------------------------------
# Live activation bytes of a forward (impl="fused")

def activation_live_points(c: ModelCost) -> tuple[int, dict[str, int]]:
    """The live bytes of one forward of `c` with the `wan` ops (impl="fused", bf16 activations), the context
    prepared: (resident, {point in a block: bytes live there on top of resident});
    `ModelCost.activation_peak_bytes` is resident + the largest point.

    Python frees a tensor when its last reference goes, so the live set follows the names WanBlock.forward binds
    (wan_model/core/model.py). Held through the blocks ("resident"): the K/V of every layer, the RoPE tables, the
    time embedding (temb [B, 1|S, C], temb_proj [B, 1|S, 6, C], bf16), the block's input x (the caller's `args`).
    VACE: the hints run first; the last VACE block runs with x, its control-stream input, the n - 1 scaled hints
    before it and the unscaled hint of the block before (still bound to the loop's `hint`) held: n + 2 streams
    (the main blocks hold n + 1: x and the n hints), and the default scales (n bf16 values).
    Inside a block, with X = B S C bf16 bytes (one stream) and M the fp32 modulation vectors [B, 1|S, 6, C]:
    WanBlock.forward drops each activation after its last use (`del`), so at each point only what is still needed
    is live (besides mods, M):
      modulation    2M (temb_proj.float() + mods)
      qk_norm_rope  M + 7X    n, the QKV GEMM's [B, S, 3C] output, q, k, v
      cross_norm    M + 5X    x, x.float() and the fp32 LayerNorm output (+ its mean, rstd)
      cross_q       M + 9X    x, n, to_q's output and F.rms_norm's three fp32 [B, S, C] (+ rsqrt)
      ffn           M + 2X + 2 B S F   x, proj_out's output, proj_in's output and its GELU ([B, S, F] bf16 each)
    (1.3B, F = 5.8 C: the FFN is the peak; 14B, F = 2.7 C: cross_q. Before the `del`s, q, k, v, o and each norm
    output stayed bound to the end of the block: 14B 480p CFG peaked at 10.25 GB, now 7.57.)
    Every block frees all but its output, so a forward of L blocks peaks in every block alike (the oracle runs
    a whole forward). Outside the blocks (patch embedding: 2X; head: 2X + the output) the live set is smaller
    than any block point. Quantized weights (fp8, nvfp4): the same names and points; what a quantized GEMM
    allocates while it runs (its quantized input) comes and goes below them. Not counted: a CUDA kernel's own
    workspace and the caching allocator's rounding (what max_memory_allocated on a GPU adds)."""
    cfg = c.config
    B, S, C, D, Fd = c.shape.batch, c.shape.tokens, cfg.dim, cfg.attention_head_dim, cfg.ffn_dim
    N = B * S
    X, R = N * C * A, B * (S if cfg.expand_timesteps else 1)
    M = R * 6 * C * F32
    n_vace = c.num_vace_layers
    streams = 1 + (1 + n_vace if cfg.has_vace else 0)
    resident = c.kv_cache_bytes + 2 * S * (D // 2) * F32 + R * 7 * C * A + streams * X + n_vace * A
    return resident, {"modulation": 2 * M,
                      "qk_norm_rope": M + 7 * X,
                      "cross_norm": M + 5 * X + 2 * N * F32,
                      "cross_q": M + 9 * X + N * F32,
                      "ffn": M + 2 * X + 2 * N * Fd * A}


# ---------------------------------------------------------------------------------------------
# The kernels: traced on meta tensors, not mirrored. Each part of the model (a WanBlock, a VaceBlock, the head,
# prepare_context, the embeddings) runs on meta tensors of the real shapes (nothing is computed or allocated) under
# a dispatch mode that turns every op into a Kernel; hooks on the modules, the bound `wan` ops and the per-role
# functions say which row of the table each kernel belongs to.

# Block linears that a weight format applies to (plus the stacked cross-attention K/V weights).
_QUANTIZED = ("attn1.to_qkv.weight", "attn1.to_out.weight", "attn2.to_q.weight", "attn2.to_out.weight",
              "ffn.proj_in.weight", "ffn.proj_out.weight")


def _meta(*shape: int, dtype=None):
    """A bf16 (or `dtype`) tensor of `shape` on the meta device."""
    import torch

    return torch.empty(shape, dtype=dtype or torch.bfloat16, device="meta")


def _distinct_bytes(t) -> int:
    """Bytes of the distinct elements of `t` (a stride-0, broadcast dimension counts once)."""
    return math.prod(n for n, st in zip(t.shape, t.stride()) if st != 0) * t.element_size()


def _kernel_trace():
    """A TorchDispatchMode class recording every op as (label, Kernel); built on first use (torch imported lazily).

    Per op: FLOPs from torch's flop counter formulas (aten matmuls, convolutions) and, for a `wan` op, all of FLOPs
    and bytes from its spec (`OpSpec.cost`: one fused kernel); otherwise bytes = the distinct bytes of its tensor
    inputs (read) and outputs (written). A fill (new_zeros, zeros_like, ...) reads nothing: its tensor argument only
    gives dtype and device. Allocations (empty, new_empty, empty_like, ...), ops whose outputs alias an input (views,
    and in-place ops: F.rms_norm's eps add on [N] fp32 values goes uncounted, 8 bytes per token) and
    aten._unsafe_view (a view whose schema does not say so) move nothing. `const`: bytes that do not depend on the
    batch: the inputs that are `constants` (parameters, RoPE tables) or are computed from constants only (a
    parameter cast to fp32); `weight`: the bytes of parameters read, as stored: `stored` maps a parameter to its
    bytes and compute peak in the weight format (a quantized GEMM weight: `weight_nbytes`, at the "fp4" peak for
    NVFP4)."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import wan_kernels  # noqa: F401  (registers the specs)
    from wan_kernels._spec import SPECS

    registry = flop_counter().flop_registry
    free = ("aten._unsafe_view.default",)

    class Marks:
        """A value per tensor, by identity (tensors compare elementwise), dropped when the tensor goes."""

        def __init__(self, items=()):
            self._d = {}
            for t, v in items:
                self[t] = v

        def __setitem__(self, t, v) -> None:
            k = id(t)
            self._d[k] = (weakref.ref(t, lambda _, k=k: self._d.pop(k, None)), v)

        def get(self, t):
            e = self._d.get(id(t))
            return e[1] if e is not None and e[0]() is t else None

    class KernelTrace(TorchDispatchMode):
        def __init__(self, constants=(), stored=None, unique_rows: int | None = None):
            super().__init__()
            self.label, self.kernels, self.unique_rows = None, [], unique_rows
            self._const = Marks((t, True) for t in constants)
            self._stored = Marks((stored or {}).items())   # parameter (and its views) -> (bytes, peak)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if str(func) == "aten._unique2.default" and self.unique_rows is not None:
                x = args[0]  # data-dependent: meta tensors cannot run it; the caller says how many values it finds
                out = (x.new_empty(self.unique_rows), x.new_empty(x.shape, dtype=torch.long),
                       x.new_empty(0, dtype=torch.long))
            else:
                out = func(*args, **kwargs)
            ins = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            name = func._overloadpacket.__name__
            if name.startswith("new_") or name.endswith("_like"):
                ins = []  # new_zeros, zeros_like, ...: their tensor argument gives dtype and device, it is not read
            if any(r.alias_info is not None for r in func._schema.returns) or "empty" in name or str(func) in free:
                src = next((t for t in ins if self._const.get(t)), None)
                for t in outs if src is not None else ():  # a view of a constant (a parameter) is one
                    self._const[t] = True
                    if (s := self._stored.get(src)) is not None:  # its share of the parameter's stored bytes
                        self._stored[t] = (s[0] * _distinct_bytes(t) // _distinct_bytes(src), s[1])
                return out
            if not ins and not outs:
                return out
            if func.namespace == "wan":  # one fused kernel: the op's spec counts it
                spec = SPECS[str(func._overloadpacket).removeprefix("wan.")]
                self.kernels.append((self.label, Kernel(str(func._overloadpacket), **spec.cost(*args))))
                return out

            def nbytes(t) -> int:
                s = self._stored.get(t)
                return s[0] if s is not None else _distinct_bytes(t)

            const_in = [t for t in ins if self._const.get(t)]
            write = sum(_distinct_bytes(t) for t in outs)
            const = sum(nbytes(t) for t in const_in)
            if ins and len(const_in) == len(ins):  # computed from constants only: a constant
                const += write
                for t in outs:
                    self._const[t] = True
            stored = [s for s in map(self._stored.get, ins) if s is not None]
            flops = registry[func._overloadpacket](*args, **kwargs, out_val=out) \
                if func._overloadpacket in registry else 0
            self.kernels.append((self.label, Kernel(
                str(func._overloadpacket).removeprefix("aten."), flops, sum(map(nbytes, ins)), write, const,
                sum(b for b, _ in stored), next((p for _, p in stored if p != "bf16"), "bf16"))))
            return out

    return KernelTrace


# Which row of the table a block's kernel belongs to: the row of the module, bound `wan` op (its n-th call) or
# per-role function (WanBlock's attn1.project_qkv, attn1/attn2.attend) running it; the kernels with FLOPs inside
# the QKV projection are its GEMM. A kernel outside all of them belongs to the row before it ("modulation" before
# the first), except after the self-attention's gated residual: the cross-attention's pre-norm.
_ROWS = {"attn1.project_qkv": "qk_norm_rope", "attn1.attend": "self_attention", "attn1.to_out": "self_out_proj",
         "attn2.to_q": "cross_q", "attn2.attend": "cross_attention", "attn2.to_out": "cross_out_proj",
         "ffn.proj_in": "ffn", "ffn.proj_out": "ffn", "proj_out": "hint",
         "layer_norm_modulate": ("self_norm", "ffn_norm"), "gated_residual": ("self_residual", "ffn_residual")}
_AFTER = {"self_residual": "cross_norm"}


def _traced_rows(block, call, impl: str, fmt: str, constants=(), rows=None, first: str = "modulation",
                 quantized=_QUANTIZED, unique_rows: int | None = None) -> list[tuple[str, tuple[Kernel, ...]]]:
    """[(row, its kernels)] of `call(ops)` (running the module `block` on meta tensors), rows in the order they first
    run: `rows` (default `_ROWS`) names them, `first` is the row before any of them. `impl`: "ref" (the eager
    reference path) or "fused" (the `wan` ops); `fmt`: the weight format the parameters named in `quantized` are
    read in; `constants`: the batch-independent inputs (RoPE tables); `unique_rows`: how many distinct values a
    torch.unique finds (per-token timesteps)."""
    import dataclasses as dc
    import itertools

    import torch

    from wan_model.core.model import bind_ops

    params = dict(block.named_parameters())
    stored = {}
    for name, p in params.items():
        if fmt != "bf16" and name in quantized:
            stored[p] = (weight_nbytes(p.shape[0], p.shape[1], fmt), "fp4" if fmt == "nvfp4" else "bf16")
        else:
            stored[p] = (_distinct_bytes(p), "bf16")
    trace = _kernel_trace()(list(params.values()) + list(constants), stored, unique_rows)
    trace.label, rows = first, _ROWS if rows is None else rows

    def enter(row: str) -> None:
        trace.label = row

    def leave(row: str) -> None:
        trace.label = _AFTER.get(row, row)

    def wrap(fn, rows):
        seq = iter(rows) if isinstance(rows, tuple) else itertools.repeat(rows)

        def run(*a, **kw):
            row = next(seq)
            enter(row)
            try:
                return fn(*a, **kw)
            finally:
                leave(row)
        return run

    modules = dict(block.named_modules())
    handles, held = [], []
    for key, row in rows.items():
        owner, _, attr = key.rpartition(".")
        if key in modules:
            handles += [modules[key].register_forward_pre_hook(lambda m, a, row=row: enter(row)),
                        modules[key].register_forward_hook(lambda m, a, o, row=row: leave(row))]
        elif owner in modules and attr in vars(modules[owner]):  # a per-role function the block holds
            held.append((modules[owner], attr, getattr(modules[owner], attr)))
            setattr(modules[owner], attr, wrap(held[-1][2], row))
    ops = bind_ops("auto" if impl == "fused" else "ref", "meta")
    ops = dc.replace(ops, **{name: wrap(getattr(ops, name), seq) for name, seq in rows.items()
                             if not isinstance(seq, str)})
    try:
        with torch.no_grad(), trace:
            call(ops)
    finally:
        for h in handles:
            h.remove()
        for owner, attr, fn in held:
            setattr(owner, attr, fn)
    out: dict[str, list[Kernel]] = {}
    for label, k in trace.kernels:
        out.setdefault("qkv_gemm" if label == "qk_norm_rope" and k.flops else label, []).append(k)
    return [(n, tuple(ks)) for n, ks in out.items()]


def _block_inputs(cfg: WanConfig, shape: Shape):
    """A meta WanBlock's inputs at `shape`: x, temb_proj, the RoPE tables and the layer's cross-attention K/V."""
    B, S, C, H, D = shape.batch, shape.tokens, cfg.dim, cfg.num_attention_heads, cfg.attention_head_dim
    import torch

    cos, sin = _meta(S, D // 2, dtype=torch.float32), _meta(S, D // 2, dtype=torch.float32)
    kv = [_meta(B, shape.text_tokens, H, D), _meta(B, shape.text_tokens, H, D), None, None]
    if cfg.has_image:
        kv[2:] = [_meta(B, shape.image_tokens, H, D), _meta(B, shape.image_tokens, H, D)]
    return _meta(B, S, C), _meta(B, S if cfg.expand_timesteps else 1, 6, C), cos, sin, tuple(kv)


def _meta_module(cls, cfg: WanConfig, *a):
    """A module of `cls` on the meta device, bf16 with diffusers' fp32 modules kept fp32 (as a load gives it)."""
    import torch

    from wan_model.compat.spellings import keeps_fp32

    with torch.device("meta"):
        m = cls(cfg, *a)
    for name, p in m.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else torch.bfloat16)
    return m


@functools.lru_cache(maxsize=128)  # traced once per configuration and shape
def block_ops(cfg: WanConfig, shape: Shape, impl: str, fmt: str) -> tuple[OpCost, ...]:
    """The ops of one WanBlock.forward, in order: traced (`_traced_rows`)."""
    from wan_model.core.model import WanBlock

    block, (x, temb_proj, cos, sin, kv) = _meta_module(WanBlock, cfg), _block_inputs(cfg, shape)
    rows = _traced_rows(block, lambda ops: block(x, temb_proj, cos, sin, kv, ops), impl, fmt, (cos, sin))
    return tuple(OpCost(name, "block", ks) for name, ks in rows)


# The rows of WanTransformer.prepare_context, by module.
_CONTEXT_ROWS = {"condition_embedder.text_embedder.linear_1": "text_embedder",
                 "condition_embedder.text_embedder.linear_2": "text_embedder", "cross_kv": "cross_kv_text",
                 "condition_embedder.image_embedder": "image_embedder", "cross_kv_img": "cross_kv_image",
                 "vace_cross_kv": "vace_cross_kv_text", "vace_cross_kv_img": "vace_cross_kv_image"}


def _meta_model(cfg: WanConfig):
    """A meta WanTransformer of `cfg` with one block (and one VACE block) but every layer's stacked cross-attention
    K/V: what the context and the head run (their parameters as a load gives them: bf16, diffusers' fp32 modules
    fp32, the K/V norms bf16)."""
    import torch

    from wan_model.core.model import StackedKV, WanTransformer

    one = cfg.replace(num_layers=1, **({"vace_layers": (0,)} if cfg.has_vace else {}))
    model = _meta_module(lambda c: WanTransformer(c, impl="ref", device="meta"), one)
    n_vace, C = len(cfg.vace_layers) if cfg.has_vace else 0, cfg.dim
    for name, layers in (("cross_kv", cfg.num_layers), ("cross_kv_img", cfg.num_layers), ("vace_cross_kv", n_vace),
                         ("vace_cross_kv_img", n_vace)):
        if getattr(model, name, None) is not None:
            with torch.device("meta"):
                kv = StackedKV(layers, C, C)
            setattr(model, name, kv.to(torch.bfloat16))
    return model


def context_ops(cfg: WanConfig, shape: Shape, fmt: str) -> tuple[OpCost, ...]:
    """WanTransformer.prepare_context, traced: the text (and image) embedders and each context's stacked K/V GEMM
    (the blocks' K/V weights in `fmt`; the VACE blocks' stay bf16), then per layer k's RMSNorm and the k, v copies."""
    return _context_ops(cfg, shape.batch, shape.text_tokens, shape.image_tokens, fmt)


@functools.lru_cache(maxsize=128)  # traced once per configuration and context (the video's size does not enter)
def _context_ops(cfg: WanConfig, B: int, text_tokens: int, image_tokens: int, fmt: str) -> tuple[OpCost, ...]:
    model = _meta_model(cfg)
    txt = _meta(B, text_tokens, cfg.text_dim)
    img = None
    if cfg.has_image:  # FLF2V: first and last frame interleaved per sample, half the tokens each
        n = 2 if cfg.pos_embed_seq_len else 1
        img = _meta(n * B, image_tokens // n, cfg.image_dim)
    rows = _traced_rows(model, lambda ops: model.prepare_context(txt, img), "ref", fmt, rows=_CONTEXT_ROWS,
                        first="text_embedder", quantized=("cross_kv.weight", "cross_kv_img.weight"))
    return tuple(OpCost(name, "context", ks) for name, ks in rows)


@functools.lru_cache(maxsize=128)  # traced once per configuration and shape
def vace_embed_ops(cfg: WanConfig, shape: Shape) -> tuple[OpCost, ...]:
    """The VACE ops run once per forward, traced: the control latents' tokens (WanTransformer.control_tokens: patch
    embedding, zero padding to the latents' length) and VACE block 0's proj_in added to the patched latents
    (VaceBlock.add_control). The control latents are taken as long as the latents."""
    model = _meta_model(cfg)
    B, S, C = shape.batch, shape.tokens, cfg.dim
    control = _meta(B, cfg.vace_in_channels, *shape.latent)
    tokens = _traced_rows(model, lambda ops: model.control_tokens(control, S), "ref", "bf16", rows={},
                          first="vace_patch_embed")
    add = _traced_rows(model, lambda ops: model.vace_blocks[0].add_control(_meta(B, S, C), _meta(B, S, C)), "ref",
                       "bf16", rows={}, first="vace_proj_in")
    return tuple(OpCost(name, "embed", ks) for name, ks in tokens + add)


@functools.lru_cache(maxsize=128)  # traced once per configuration and shape
def vace_block_ops(cfg: WanConfig, shape: Shape, impl: str) -> tuple[OpCost, ...]:
    """ONE VACE block, traced: a block's ops (bf16 weights: the branch stays dense) on the control stream, then the
    hint: its proj_out, the hint times its scale (a 0-dim tensor) and the add to the latent stream after block
    vace_layers[j] (WanTransformer._vace_hints and the block loop of its forward)."""
    from wan_model.core.model import VaceBlock

    block, (x, temb_proj, cos, sin, kv) = _meta_module(VaceBlock, cfg, False), _block_inputs(cfg, shape)
    scale = _meta()                                               # control_hidden_states_scale[j]

    def call(ops):
        hint, _ = block(x, x, temb_proj, cos, sin, kv, ops)
        return x + hint * scale

    rows = _traced_rows(block, call, impl, "bf16", (cos, sin, scale))
    return tuple(OpCost("vace_" + name, "vace", ks) for name, ks in rows)


@functools.lru_cache(maxsize=128)  # traced once per configuration and shape
def embed_ops(cfg: WanConfig, shape: Shape) -> tuple[OpCost, ...]:
    """The patch embedding (WanTransformer.patch_tokens) and the time embedding (TimeTextImageEmbedding.time: the
    sinusoid, the MLP and time_proj on `timestep_rows` rows; per-token timesteps (TI2V): torch.unique finds that many
    and the rows are gathered back to the tokens), traced."""
    import torch

    model = _meta_model(cfg)
    B, S = shape.batch, shape.tokens
    x = _meta(B, cfg.in_channels, *shape.latent)
    patch = _traced_rows(model, lambda ops: model.patch_tokens(x), "ref", "bf16", rows={}, first="patch_embed")
    t = _meta(B, S, dtype=torch.float32) if cfg.expand_timesteps else _meta(shape.timestep_rows, dtype=torch.float32)
    time = _traced_rows(model, lambda ops: model.condition_embedder.time(t, torch.bfloat16), "ref", "bf16", rows={},
                        first="time_embedder", unique_rows=shape.timestep_rows)
    return tuple(OpCost(name, "embed", ks) for name, ks in patch + time)


@functools.lru_cache(maxsize=128)  # traced once per configuration and shape
def head_ops(cfg: WanConfig, shape: Shape, impl: str = "fused") -> tuple[OpCost, ...]:
    """The output head (WanTransformer.head: adaLN, proj_out, unpatchify), traced as one row."""
    model = _meta_model(cfg)
    B, C = shape.batch, cfg.dim
    x, temb = _meta(B, shape.tokens, C), _meta(B, shape.tokens if cfg.expand_timesteps else 1, C)
    rows = _traced_rows(model, lambda ops: model.head(x, temb, shape.grid, ops), impl, "bf16", rows={}, first="head")
    return tuple(OpCost(name, "head", ks) for name, ks in rows)


def model_cost(cfg: WanConfig | str, width: int = 1280, height: int = 720, frames: int = 81, *, batch: int = 1,
               impl: str = "fused", weight_format: str = "bf16", latent: tuple[int, int, int] | None = None,
               text_tokens: int = TEXT_TOKENS, image_tokens: int | None = None,
               timestep_rows: int | None = None) -> ModelCost:
    """Cost of one forward of `cfg` (a WanConfig or preset name) on a video of frames x height x width
    (or an explicit `latent` (frames, height, width) grid before patching), batch `batch` (CFG batched = 2).

    impl: "ref" (the eager reference path) or "fused" (wan kernels). timestep_rows: rows of the time MLP
    (default: batch; TI2V runs the MLP on the unique timesteps, default 2: the conditioning frame's 0 and t).
    """
    if isinstance(cfg, str):
        cfg = WanConfig.from_preset(cfg)
    if impl not in ("ref", "fused"):
        raise ValueError(f"impl must be 'ref' or 'fused', got {impl!r}")
    if weight_format not in FORMATS:
        raise ValueError(f"unknown weight format {weight_format!r}; expected one of {FORMATS}")
    lat = latent if latent is not None else latent_shape(cfg, width, height, frames)
    grid = tuple(n // p for n, p in zip(lat, cfg.patch_size))
    if image_tokens is None:
        image_tokens = (cfg.pos_embed_seq_len or IMAGE_TOKENS) if cfg.has_image else 0
    if timestep_rows is None:
        timestep_rows = 2 if cfg.expand_timesteps else batch
    shape = Shape(batch, tuple(lat), grid, text_tokens, image_tokens, timestep_rows)
    embed = embed_ops(cfg, shape) + (vace_embed_ops(cfg, shape) if cfg.has_vace else ())
    return ModelCost(cfg, shape, impl, weight_format, context_ops(cfg, shape, weight_format), embed,
                     block_ops(cfg, shape, impl, weight_format), head_ops(cfg, shape, impl),
                     vace_block_ops(cfg, shape, impl) if cfg.has_vace else ())


def _one_block_model(cfg: WanConfig):
    """(a meta-device WanTransformer of `cfg` with one block and, for VACE, one VACE block (the first: its proj_in
    counted once), the number of VACE blocks `cfg` has): what the byte counts below enumerate."""
    import torch

    from wan_model.core.model import WanTransformer

    n_vace = len(cfg.vace_layers) if cfg.has_vace else 0
    with torch.device("meta"):
        model = WanTransformer(cfg.replace(num_layers=1, **({"vace_layers": (0,)} if n_vace else {})), impl="ref",
                               device="meta")
    return model, n_vace


def parameter_bytes(cfg: WanConfig, fmt: str = "bf16") -> int:
    """Bytes of all parameters of one transformer as loaded in bf16 (diffusers' fp32 modules kept fp32), the
    block linears and cross-attention K/V weights in `fmt` (the VACE branch stays bf16). Exact: enumerated from a
    meta-device WanModel."""
    from wan_model.compat.spellings import keeps_fp32

    model, n_vace = _one_block_model(cfg)
    blocks, other = 0, 0
    for name, p in model.named_parameters():
        if name.startswith("vace_"):
            n = p.numel() * (4 if keeps_fp32(name) else 2)
            other += n if name.startswith(("vace_patch_embedding.", "vace_blocks.0.proj_in.")) else n * n_vace
            continue
        if name.endswith(_QUANTIZED) or name in ("cross_kv.weight", "cross_kv_img.weight"):
            n = weight_nbytes(p.shape[0], p.shape[1], fmt)
            if name.startswith("cross_kv"):
                n = weight_nbytes(p.shape[0] * cfg.num_layers, p.shape[1], fmt)
        else:
            n = p.numel() * (4 if keeps_fp32(name) else 2)
            if name.startswith("cross_kv"):
                n *= cfg.num_layers
        if name.startswith("blocks."):
            blocks += n
        else:
            other += n
    return blocks * cfg.num_layers + other


def buffer_bytes(cfg: WanConfig) -> tuple[int, int]:
    """(per block, outside the blocks) bytes of the model's buffers: state, not weights, in no checkpoint (each
    self-attention's 8-bit channel balance, fp32 [C]: wan_model/core/balance.py); block offload streams a block's
    with it. Exact: enumerated from a meta-device WanTransformer."""
    model, n_vace = _one_block_model(cfg)
    block, other = 0, 0
    for path, m in model.named_modules():
        for key in m._non_persistent_buffers_set:  # (a quantized layer's persistent buffers are its weights)
            n = m._buffers[key].numel() * m._buffers[key].element_size()
            if path.startswith("blocks."):
                block += n
            else:
                other += n * (n_vace if path.startswith("vace_blocks.") else 1)
    return block, other


# ---------------------------------------------------------------------------------------------
# End to end and targets

def generation_cost(cost_b1: ModelCost, steps: int, cfg_guidance: bool = True) -> dict[str, float]:
    """FLOPs and bytes of a whole generation: `steps` forwards of batch 1 (2 with CFG, batched as
    wan_model.core.sampling does), the text/image context embedded and projected once (K/V cached).
    Memory footprints do not scale with steps: `memory` is the per-step peak."""
    b = 2 if cfg_guidance else 1
    c = cost_b1 if b == cost_b1.shape.batch else _rebatch(cost_b1, b)
    flops = steps * c.flops(include_context=False) + sum(o.flops for o in c.context)
    nbytes = steps * c.bytes(include_context=False) + sum(o.bytes for o in c.context)
    return {"flops": flops, "bytes": nbytes, "forwards": steps, "batch": b, "memory": c.memory_bytes()}


def _rebatch(c: ModelCost, batch: int) -> ModelCost:
    s = c.shape
    return model_cost(c.config, latent=s.latent, batch=batch, impl=c.impl, weight_format=c.weight_format,
                      text_tokens=s.text_tokens, image_tokens=s.image_tokens,
                      timestep_rows=None if c.config.expand_timesteps else batch)


def lower_bounds(c: ModelCost, peak: dict) -> dict[str, float]:
    """Physical lower bounds on a GPU (seconds, bytes): compute = GEMM FLOPs at the format's GEMM peak +
    attention FLOPs at the bf16 peak; memory = weights read once + the residual stream in and out per block;
    time = max(compute, memory). Memory footprint = weights + activation peak (batch of `c`)."""
    def bound(ops, n_blocks_io):
        compute = sum(k.flops / ((peak.get(k.peak) or peak["bf16"]) * 1e12) * n for o, n in ops for k in o.kernels)
        io = sum(o.weight_bytes * n for o, n in ops) + n_blocks_io * 2 * c.shape.batch * c.shape.tokens * \
            c.config.dim * A
        return max(compute, io / (peak["gbps"] * 1e9))

    return {"block_s": bound([(o, 1) for o in c.block], 1),
            "model_s": bound(c.ops(include_context=False), c.num_layers),
            "memory_bytes": c.memory_bytes()}


# ---------------------------------------------------------------------------------------------
# Validation helpers

def flop_counter():
    """A FlopCounterMode that also knows the `wan` ops (registers wan_kernels/flops.py on first use)."""
    import wan_kernels.flops  # noqa: F401
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


# ---------------------------------------------------------------------------------------------
# Printing

def _peaks() -> dict:
    from wan_kernels.hardware import PEAKS

    return PEAKS


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:9.2f}"


def format_report(c: ModelCost, steps: int, cfg_guidance: bool = True) -> str:
    peaks = _peaks()
    s, cfg = c.shape, c.config
    lines = [f"# Wan cost model: dim {cfg.dim} ({cfg.num_attention_heads} heads), ffn {cfg.ffn_dim}, "
             f"{cfg.num_layers} layers | latent {s.latent} -> grid {s.grid} = {s.tokens} tokens, batch {s.batch}, "
             f"text {s.text_tokens}, image {s.image_tokens} | impl={c.impl}, weights {c.weight_format}"]
    gpus = ("H100", "B200")
    w = max(18, *(len(o.name) for o, _ in c.ops()))  # VACE op names are longer
    head = (f"{'op':{w}s} {'x':>3s} {'GFLOP':>11s} {'GB read':>9s} {'GB write':>9s} {'weight MB':>10s} "
            f"{'act MB':>10s} {'FLOP/B':>7s}" + "".join(f" {g + ' ms':>10s} {'bound':>7s}" for g in gpus))
    lines += [head, "-" * len(head)]
    for o, n in c.ops():
        ai = o.flops / o.bytes if o.bytes else 0.0
        row = (f"{o.name:{w}s} {n:3d} {o.flops / 1e9:11.1f} {o.read / 1e9:9.3f} {o.write / 1e9:9.3f} "
               f"{o.weight_bytes / 1e6:10.2f} {o.activation_bytes / 1e6:10.1f} {ai:7.0f}")
        for g in gpus:
            t, b = o.roofline(peaks[g])
            row += f" {_fmt_s(t)[1:]:>10s} {b:>7s}"
        lines.append(row)
    blk_fl, blk_by = c.block_total("flops"), c.block_total("bytes")
    lines.append(f"per layer (block): {blk_fl / 1e12:.2f} TFLOP, {blk_by / 1e9:.2f} GB moved, "
                 f"weights {sum(o.weight_bytes for o in c.block) / 1e6:.1f} MB")
    fl = c.flops()
    att = c.attention_flops()
    lines.append(f"per forward: {fl / 1e15:.3f} PFLOP (attention {100 * att / fl:.1f}%: self "
                 f"{100 * sum(o.flops for o in c.block if o.name == 'self_attention') * c.num_layers / fl:.1f}%), "
                 f"{c.bytes() / 1e9:.1f} GB moved; without the cacheable context: {c.flops(False) / 1e15:.3f} PFLOP")
    lines.append(f"weights {c.weight_bytes / 1e9:.2f} GB ({c.weight_format}), cross-attn K/V cache "
                 f"{c.kv_cache_bytes / 1e6:.1f} MB, activation peak ~{c.activation_peak_bytes / 1e9:.2f} GB, "
                 f"memory ~{c.memory_bytes() / 1e9:.2f} GB")
    g = generation_cost(c if s.batch == 1 else _rebatch(c, 1), steps, cfg_guidance)
    lines.append(f"end to end: {steps} steps x {'CFG (batch 2)' if cfg_guidance else 'no CFG'}: "
                 f"{g['flops'] / 1e15:.2f} PFLOP, {g['bytes'] / 1e12:.2f} TB moved, per-step memory "
                 f"~{g['memory'] / 1e9:.2f} GB")
    lines.append("roofline per GPU (sum over kernels of max(FLOP/peak, bytes/BW); GEMM peak by weight format):")
    e2e = c if s.batch == 1 else _rebatch(c, 1)
    e2e = _rebatch(e2e, 2) if cfg_guidance else e2e
    for name, peak in peaks.items():
        fwd = c.roofline(peak, include_context=False)
        gen = steps * e2e.roofline(peak, include_context=False) + sum(o.roofline(peak)[0] for o in e2e.context)
        lines.append(f"  {name:9s} block {c.block_roofline(peak) * 1e3:10.2f} ms | forward {fwd:9.3f} s | "
                     f"generation {gen:9.1f} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# 8-bit attention: what its Q/K/V quantization moves (issue 23: "it should stay under 10 % at 480p")

def int8_quantization_bytes(batch: int, sq: int, kv_sets: list[int], heads: int, d: int, pv: str = "fp8",
                            fused_q: bool = False) -> int:
    """HBM bytes of one wan::attention_int8 call's Q/K/V quantization, counted, not modelled: the Triton quantizer
    (`wan_kernels.triton.attention_int8_quant.quantize`) runs on meta tensors, its kernel launches are collected
    and counted by `launch_bytes` (each tensor argument once, whole: tests/test_attention_int8.py holds that to the
    interpreter's recorded loads and stores), and its torch glue (the [B, H, D] statistics) by a dispatch mode that
    adds the distinct bytes of every non-view op's tensor inputs and outputs (`_kernel_trace`, the blocks'
    accounting). fused_q: q quantized by wan::qk_norm_rope_int8 (the model's single-process self-attention,
    wan::attention_int8_q8): the quantizer skips q, and what the fused kernel writes beyond `qk_norm_rope` (q's
    int8 codes and fp32 scales in place of bf16 q: negative) is counted from the two ops' specs."""
    import torch

    from wan_kernels._spec import SPECS
    from wan_kernels.triton import attention_int8_quant as quant

    kv = [_meta(batch, s, heads, d) for s in kv_sets for _ in "kv"] + [None, None]
    q = _meta(batch, sq, heads, d)
    extra = 0
    if fused_q:
        q = (_meta(batch, sq, heads, d, dtype=torch.int8), _meta(batch, heads, sq, dtype=torch.float32))
        args = (_meta(batch, sq, 3 * heads * d), _meta(heads * d), _meta(heads * d),
                _meta(sq, d // 2, dtype=torch.float32), _meta(sq, d // 2, dtype=torch.float32), heads, 1e-6)
        extra = SPECS["qk_norm_rope_int8"].cost(*args)["write"] - SPECS["qk_norm_rope"].cost(*args)["write"]
    launches, trace = [], _kernel_trace()()
    with trace:
        quant.quantize(q, *kv[:4], d ** -0.5, pv, launch=launches.append)
    return sum(k.bytes for _, k in trace.kernels) + sum(quant.launch_bytes(launch) for launch in launches) + extra


def int8_quantization_share(c: ModelCost, peak: dict, pv: str = "fp8") -> dict[str, dict[str, float]]:
    """Per role ("self": q quantized in qk_norm_rope, the model's path, on one process and sequence parallel;
    "self-unfused": q quantized by attention_int8; "cross": text + image sets in one call),
    one forward of `c` with that role on 8-bit attention: the quantization's bytes and time at the HBM peak, the
    attention's time at the int8 tensor-core peak (taken as 2x the table's bf16 rate, as on A100 / H100 / B200;
    GeForce cards run int8 at a higher multiple, where the share is larger still), and the quantization's share of
    their sum. The query is quantized whole in both roles, so cross-attention (512 text + 257 image keys) pays a
    self-attention's quantization for a sliver of its work. (A ring of R blocks quantizes each K/V block on every
    rank, R calls of S / R keys: its K/V quantization time over its attention time is R times the single-process
    ratio, the quantization being linear in the tokens and the attention quadratic; q is quantized once, fused.)"""
    cfg, s = c.config, c.shape
    H, D = cfg.num_attention_heads, cfg.attention_head_dim
    sets = [s.text_tokens] + ([s.image_tokens] if s.image_tokens else [])
    out = {}
    for role, kv, name, fused in (("self", [s.tokens], "self_attention", True),
                                  ("self-unfused", [s.tokens], "self_attention", False),
                                  ("cross", sets, "cross_attention", False)):
        q_bytes = c.num_layers * int8_quantization_bytes(s.batch, s.tokens, kv, H, D, pv, fused)
        quant_s = q_bytes / (peak["gbps"] * 1e9)
        attn_s = c.num_layers * sum(o.flops for o in c.block if o.name == name) / (2 * peak["bf16"] * 1e12)
        out[role] = {"quant_bytes": q_bytes, "quant_s": quant_s, "attention_s": attn_s,
                     "share": quant_s / (quant_s + attn_s)}
    return out


def format_int8(c: ModelCost, gpu: str, pv: str = "fp8") -> str:
    lines = [f"# 8-bit attention on {gpu} (pv {pv}), one forward, Q/K/V quantized by the Triton quantizer "
             "(statistics + one quantizing pass per tensor; self: q quantized in qk_norm_rope; the bar: under 10 % "
             "of the time at 480p):"]
    for role, p in int8_quantization_share(c, _peaks()[gpu], pv).items():
        lines.append(f"  {role:12s} attention: quantization moves {p['quant_bytes'] / 1e9:8.1f} GB = "
                     f"{p['quant_s'] * 1e3:8.1f} ms at HBM peak vs the attention {p['attention_s'] * 1e3:8.1f} ms at "
                     f"the int8 peak: {100 * p['share']:3.0f} %")
    return "\n".join(lines)


def format_targets(presets: list[str] | None = None, frames: int = 81, ulysses: int = 1, ring: int = 1) -> str:
    """The `cost --targets` table; with ulysses * ring = P > 1 (sequence parallelism) a column per target
    gains the model lower bound on P GPUs: `parallel_step` with that bound as t_1 ('-': ulysses does not
    divide the preset's heads)."""
    from wan_model.core.config import PRESETS

    peaks = _peaks()
    # VACE presets only by name (--target-presets): the default table stays the base variants'
    presets = presets or [n for n in PRESETS if not n.startswith("tiny") and not PRESETS[n].has_vace]
    P = ulysses * ring
    lines = ["# Physical lower bounds at batch 1 (one expert), 81 frames, vs the design targets:",
             "#   " + "; ".join(f"{lbl} ({gpu}, {fmt}): block < {b:g} ms, model < {m:g} ms, memory < {g:g} GB"
                               for lbl, gpu, fmt, b, m, g in TARGETS),
             "# block/model = max(FLOPs at peak, weights + residual I/O at HBM bandwidth); memory = weights + "
             "activation peak estimate (fused kernels) + K/V cache. 'ok' = the target is attainable in principle."]
    if P > 1:
        lines.append(f"# model ms x{P}: the model bound on {P} GPUs, ulysses {ulysses} x ring {ring} (compute / {P} + "
                     f"exposed communication at NVLink {', '.join(f'{t[1]} {LINK_GBPS[t[1]]:.0f}' for t in TARGETS)} GB/s)")
    head = f"{'preset':22s} {'res':5s} {'tokens':>7s} {'TFLOP/blk':>9s}"
    for lbl, gpu, fmt, *_ in TARGETS:
        head += f" | {gpu + ' ' + fmt + ' block ms':>20s} {'model ms':>10s} {'mem GB':>8s}"
        head += f" {f'model ms x{P}':>13s}" if P > 1 else ""
    lines += [head, "-" * len(head)]
    for name in presets:
        cfg = PRESETS[name]
        for res, (w, h) in RESOLUTIONS.items():
            if cfg.in_channels == 48 and h % 32:   # TI2V-5B (VAE stride 16 x patch 2): its 720p is 1280x704
                h -= h % 32
            row = None
            for lbl, gpu, fmt, tb, tm, tg in TARGETS:
                c = model_cost(cfg, w, h, frames, impl="fused", weight_format=fmt)
                if row is None:
                    row = f"{name:22s} {res:5s} {c.shape.tokens:7d} {c.block_total('flops') / 1e12:9.2f}"
                lb = lower_bounds(c, peaks[gpu])

                def mark(v, t):
                    return f"{v:.4g}{'(ok)' if v <= t else ''}"
                row += (f" | {mark(lb['block_s'] * 1e3, tb):>20s} {mark(lb['model_s'] * 1e3, tm):>10s} "
                        f"{mark(lb['memory_bytes'] / 1e9, tg):>8s}")
                if P > 1:
                    tp = ("-" if cfg.num_attention_heads % ulysses else
                          mark(parallel_step(c, gpu, ulysses, ring, forward_s=lb["model_s"])["tp_s"] * 1e3, tm))
                    row += f" {tp:>13s}"
            lines.append(row)
    return "\n".join(lines)


def plot(c: ModelCost, path: str, frames: int = 81) -> None:
    """Stacked bar of time share per op per GPU, and FLOPs per forward vs resolution (needs matplotlib)."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (in requirements.txt), which is not installed: "
                           "pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peaks = _peaks()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    names = [o.name for o, _ in c.ops()]
    bottom = [0.0] * len(peaks)
    for o, n in c.ops():
        shares = []
        for i, peak in enumerate(peaks.values()):
            shares.append(100 * o.roofline(peak)[0] * n / c.roofline(peak))
        ax1.bar(list(peaks), shares, bottom=bottom, label=o.name)
        bottom = [b + s for b, s in zip(bottom, shares)]
    ax1.set_ylabel("% of roofline time per forward")
    ax1.legend(fontsize=6, ncol=2)
    ax1.set_title(f"time share per op ({len(names)} ops)")
    sizes = [(480, 272), (640, 352), (832, 480), (960, 544), (1280, 720), (1600, 896), (1920, 1088)]
    xs, ys = [], []
    for w, h in sizes:
        cc = model_cost(c.config, w, h, frames, impl=c.impl, weight_format=c.weight_format)
        xs.append(cc.shape.tokens)
        ys.append(cc.flops() / 1e15)
    ax2.plot(xs, ys, "o-")
    ax2.set_xlabel("tokens")
    ax2.set_ylabel("PFLOP per forward")
    ax2.set_title("FLOPs vs resolution")
    fig.tight_layout()
    fig.savefig(path)


# ---------------------------------------------------------------------------------------------
# Sequence parallelism (wan_model/core/parallel.py): communication per rank and predicted scaling

# Link bandwidth per GPU and direction, GB/s: NVLink 4 through NVSwitch (H100 SXM and H20: 900 GB/s
# bidirectional). H20's peaks (not in wan_kernels.hardware.PEAKS, which lists the GPUs our kernels target):
# 148 TFLOP/s dense bf16, 4.0 TB/s HBM3 (NVIDIA H20 spec sheet).
LINK_GBPS = {"H100": 450.0, "H20": 450.0, "B200": 900.0}  # B200: NVLink 5, 1.8 TB/s bidirectional
PARALLEL_PEAKS = {"H20": {"bf16": 148.0, "fp4": 0.0, "gbps": 4000.0}}
# Published Wan2.1 T2V-14B 720p, 50 steps (REFERENCE.md section 8): GPUs -> seconds
PUBLISHED = {"H100": {1: 1837.9, 2: 945.1, 4: 497.0, 8: 287.9}, "H20": {1: 6935.5, 8: 980.5}}


def parallel_comm(c: ModelCost, ulysses: int = 1, ring: int = 1, *, int8: bool = False, pv: str = "fp8",
                  act_bytes: int = A) -> dict[str, int]:
    """Bytes ONE rank sends in one forward of `c` under wan_model/core/parallel.py with (ulysses, ring) degrees
    (it receives as many). P = U R ranks hold n = ceil(S / P) tokens (activations of `act_bytes`, bf16: 2).
      ulysses: per layer, q, k, v before and the attention output after: 4 b n C, of which (U - 1) / U leaves;
               `int8` (every layer's self-attention 8-bit: `set_attention("int8", dense_layers=())`): q, k and v
               as their codes and fp32 scales, in rows of `wan_model.core.parallel.qkv8_row(D, D, pv)` bytes per
               token and head (400 at D = 128 with fp8 P.V, 528 with fp16), and the output;
      stats:   `int8` with Ulysses: per layer, the all-reduces of the K/V statistics (fp32 sums [b, H, 2 D] and
               extrema [b, H, 2 D]), counted as a ring all-reduce sends: 2 (U - 1) / U of them;
      ring:    per layer, the K/V block (U n tokens x C / U channels = 2 b n C) makes R - 1 hops; `int8`: the
               block quantized once by its owner (`wan_model.core.parallel.kv8_layout` for `pv`: K's INT8 codes,
               V in e4m3 / fp16, fp32 scales and means, 16-byte aligned pieces) instead;
      gather:  after the blocks, all_gather of the rank's [b, n, C] to the P - 1 others."""
    s, cfg = c.shape, c.config
    P, b, C, L, H = ulysses * ring, s.batch, cfg.dim, cfg.num_layers, cfg.num_attention_heads
    n = math.ceil(s.tokens / P)
    D = C // H
    row, block, stats = 3 * act_bytes * D, 2 * b * n * C * act_bytes, 0     # q, k, v of one token and head
    if int8:
        from wan_model.core.parallel import kv8_layout, layout_bytes, qkv8_row

        row = qkv8_row(D, D, pv)[1]
        block = layout_bytes(kv8_layout(b, ulysses * n, H // ulysses, D, D, pv))
        stats = L * 2 * (4 * b * H * 2 * D) * 2 * (ulysses - 1) // ulysses
    out = {"ulysses": L * (b * n * H * row + b * n * C * act_bytes) * (ulysses - 1) // ulysses,
           "stats": stats, "ring": L * (ring - 1) * block,
           "gather": (P - 1) * b * n * C * act_bytes}
    out["total"] = sum(out.values())
    return out


def parallel_step(c: ModelCost, gpu: str, ulysses: int = 1, ring: int = 1,
                  forward_s: float | None = None) -> dict[str, float]:
    """Predicted seconds of one forward of `c` on U R GPUs `gpu` (LINK_GBPS) and the efficiency t_1 / (P t_P).

    t_1 = `forward_s` (e.g. a measured time) or the roofline forward (without the cacheable context); the
    compute splits evenly over the P ranks; the Ulysses all-to-alls and the final gather are exposed (they
    sit between kernels); each ring hop overlaps with the attention on the block in hand, so only
    max(0, hop - attention of one block) is exposed. Link time = bytes / bandwidth (no latency term)."""
    peak = PARALLEL_PEAKS.get(gpu) or _peaks()[gpu]
    link = LINK_GBPS[gpu] * 1e9
    P, L = ulysses * ring, c.num_layers
    roof = c.roofline(peak, include_context=False)
    t1 = roof if forward_s is None else forward_s
    attn = sum(o.roofline(peak)[0] for o in c.block if o.name == "self_attention") * t1 / roof  # one layer
    comm = parallel_comm(c, ulysses, ring)
    hop = comm["ring"] / max(1, L * (ring - 1)) / link
    exposed = (comm["ulysses"] + comm["gather"]) / link + L * (ring - 1) * max(0.0, hop - attn / (P * ring))
    tp = t1 / P + exposed
    return {"t1_s": t1, "tp_s": tp, "comm_s": exposed, "speedup": t1 / tp, "efficiency": t1 / (P * tp)}


def format_parallel(c: ModelCost, ulysses: int, ring: int, int8: bool = False) -> str:
    """The `cost --ulysses U --ring R` lines: bytes per rank (`int8`, `cost --int8`: also the Ulysses and ring
    bytes of the 8-bit self-attention) and predicted scaling per GPU (bf16; roofline t_1 and, for the published
    1-GPU time of T2V-14B 720p, that time as t_1; one forward = half a CFG step)."""
    comm = parallel_comm(c, ulysses, ring)
    lines = [f"sequence parallelism ulysses {ulysses} x ring {ring} = {ulysses * ring} ranks: per rank and forward "
             f"sends {comm['total'] / 1e9:.3f} GB (ulysses {comm['ulysses'] / 1e9:.3f}, ring "
             f"{comm['ring'] / 1e9:.3f}, gather {comm['gather'] / 1e9:.3f})"]
    if int8 and ulysses > 1:
        for pv in ("fp8", "fp16"):
            q8 = parallel_comm(c, ulysses, ring, int8=True, pv=pv)
            lines.append(f"  8-bit self-attention in every layer, P.V {pv}: ulysses {q8['ulysses'] / 1e9:.3f} GB "
                         f"(q, k, v as INT8 / {'e4m3' if pv == 'fp8' else 'fp16'} codes + fp32 scales: "
                         f"{100 * (1 - q8['ulysses'] / comm['ulysses']):.1f}% less) + statistics "
                         f"{q8['stats'] / 1e6:.2f} MB")
    if int8 and ring > 1:
        for pv in ("fp8", "fp16"):
            kv8 = parallel_comm(c, ulysses, ring, int8=True, pv=pv)
            lines.append(f"  8-bit self-attention in every layer, P.V {pv}: ring {kv8['ring'] / 1e9:.3f} GB (K/V "
                         f"blocks as INT8 / {'e4m3' if pv == 'fp8' else 'fp16'} codes + fp32 scales: "
                         f"{100 * (1 - kv8['ring'] / comm['ring']):.1f}% less)")
    for gpu in LINK_GBPS:
        p = parallel_step(c, gpu, ulysses, ring)
        lines.append(f"  {gpu:5s} NVLink {LINK_GBPS[gpu]:.0f} GB/s: roofline forward {p['t1_s']:.3f} s -> "
                     f"{p['tp_s']:.3f} s (comm {p['comm_s'] * 1e3:.1f} ms), speedup {p['speedup']:.2f}x, "
                     f"efficiency {100 * p['efficiency']:.1f}%")
        pub = PUBLISHED.get(gpu, {})
        if 1 in pub and c.shape.tokens == 75600 and c.config.dim == 5120 and c.shape.batch == 1:
            m = parallel_step(c, gpu, ulysses, ring, forward_s=pub[1] / 50 / 2)
            seen = pub.get(ulysses * ring)
            lines.append(f"        from the published 1-GPU time ({pub[1]} s / 50 steps / 2 forwards): "
                         f"speedup {m['speedup']:.2f}x" + (f" (published {pub[1] / seen:.2f}x)" if seen else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Block offload (wan_model/core/offload.py): does prefetch hide the host-to-device traffic?

def offload_plan(c: ModelCost, gpu: str, vram_budget, prefetch: int = 1, pcie_gbps: float = 25.0) -> dict:
    """Block offload of the model of `c` (one forward of its batch) on `gpu` under `vram_budget` (bytes or "12GB").

    block_bytes: one block's weights in the weight format (the block kernels' parameter bytes) and its buffers
    (`buffer_bytes`), = the bytes of a real block of that format; fixed_bytes: the other weights and buffers
    (always resident); activation_bytes: the
    activation peak (`ModelCost.activation_peak_bytes`: K/V and RoPE tables included). Blocks on the device:
    N + prefetch = (budget - fixed - activations) // block_bytes (wan_model.core.offload's rule with the
    activations taken out too), N at most L; the last L - N + 1 blocks are
    streamed (none when N = L). Per streamed block, transfer_s = block_bytes / pcie_gbps against compute_s (the
    block's roofline time on `gpu`): with prefetch >= 1 the copy of the next block runs during this one, so it
    hides when transfer_s <= compute_s, and a forward costs the all-resident time + streamed * max(0, transfer_s -
    compute_s); with prefetch 0 every transfer is exposed. peak_bytes = fixed + (N + prefetch) * block +
    activations. smallest_hiding_budget: the least budget whose plan hides every transfer (N = 1 when a block's
    transfer hides behind its compute; else nothing short of every block resident)."""
    from wan_model.core.offload import parse_budget

    peaks = _peaks()
    if gpu not in peaks:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(peaks)}")
    if not pcie_gbps > 0:
        raise ValueError(f"pcie_gbps must be > 0, got {pcie_gbps!r}")
    budget, L = parse_budget(vram_budget), c.num_layers
    weights = sum(o.weight_bytes for o in c.block)
    state, state_other = buffer_bytes(c.config)
    block = weights + state  # a slot holds the block's buffers too
    fixed, act = c.weight_bytes - L * weights + state_other, c.activation_peak_bytes
    peak = peaks[gpu]
    transfer, compute = block / (pcie_gbps * 1e9), c.block_roofline(peak)
    n = min((budget - fixed - act) // block - prefetch, L)
    resident_s = c.roofline(peak, include_context=False)
    plan = {"gpu": gpu, "budget_bytes": budget, "block_bytes": block, "fixed_bytes": fixed, "activation_bytes": act,
            "transfer_s": transfer, "compute_s": compute, "hides": prefetch >= 1 and transfer <= compute,
            "resident_step_s": resident_s, "prefetch": prefetch, "layers": L}
    smallest = fixed + act + ((1 + prefetch) * block if plan["hides"] else L * block)
    plan["smallest_hiding_budget"] = smallest
    if n < 1:
        plan.update(blocks_on_device=0, streamed=None, step_s=None, peak_bytes=None)
        return plan
    streamed = L - n + 1 if n < L else 0
    exposed = transfer if prefetch == 0 else max(0.0, transfer - compute)
    plan.update(blocks_on_device=n, streamed=streamed, step_s=resident_s + streamed * exposed,
                peak_bytes=fixed + (min(n + prefetch, L) if streamed else L) * block + act)
    return plan


def format_offload(p: dict) -> str:
    """The `cost --vram-budget` lines."""
    g = 1e9
    lines = [f"# block offload on {p['gpu']}, budget {p['budget_bytes'] / g:.2f} GB, prefetch {p['prefetch']}:",
             f"per block: {p['block_bytes'] / g:.3f} GB of weights, transfer {p['transfer_s'] * 1e3:.2f} ms vs "
             f"compute {p['compute_s'] * 1e3:.2f} ms: prefetch {'hides' if p['hides'] else 'does NOT hide'} the "
             "transfer",
             f"outside the blocks {p['fixed_bytes'] / g:.2f} GB, activations ~{p['activation_bytes'] / g:.2f} GB"]
    if p["step_s"] is None:
        lines.append("the budget holds less than 1 + prefetch blocks: nothing runs")
    else:
        lines.append(f"{p['blocks_on_device']} of {p['layers']} blocks on the device, {p['streamed']} streamed per "
                     f"forward: step {p['step_s']:.3f} s (all resident {p['resident_step_s']:.3f} s), peak VRAM "
                     f"~{p['peak_bytes'] / g:.2f} GB")
    lines.append(f"smallest budget that hides the traffic: {p['smallest_hiding_budget'] / g:.2f} GB"
                 + ("" if p["hides"] else " (every block resident: a block's transfer outlasts its compute)"))
    return "\n".join(lines)
