"""Sequence parallelism for WanModel on torch.distributed (NCCL on GPUs, gloo on CPUs): Ulysses and ring
attention, as original Wan (xDiT's USP) and diffusers' `ContextParallelConfig` do it (REFERENCE.md section 8).

`WanModel.enable_parallelism(ulysses_degree=U, ring_degree=R, group=None)`, on every rank after
`torch.distributed.init_process_group`, with U * R = the group's size. Every rank passes the same full inputs and
gets the same full output. Inside the forward:
  * split: the S video tokens (after the patch embedding) are padded with zero rows to P * n (P = U * R,
    n = ceil(S / P)); rank p of the group holds global tokens [p n, (p + 1) n), with the RoPE table rows and
    (TI2V) the per-token timestep embeddings of those positions. Cross-attention is local: the text/image
    context is replicated.
  * self-attention: q, k, v [B, n, H, D] (RMSNorm over all heads and RoPE applied on full rows, before any
    exchange). Rank p = r U + u is in Ulysses group r (ranks r U .. r U + U - 1) and ring group u. Ulysses:
    one `all_to_all_single` turns [B, n, H, D] x 3 into [B, U n, H / U, D] x 3 (the U n tokens of ring block r,
    H / U heads); ring: the K/V block of ring rank r (global tokens [r U n, (r + 1) U n)) travels round the
    ring group with `batch_isend_irecv` while the local block is computed, partial results merged exactly by
    their log-sum-exps (`wan::attention_lse`, merged in fp32). Padding keys are excluded by slicing each K/V
    block to its valid keys (a block of padding only is skipped); padding query rows are computed and dropped.
    The inverse all-to-all gives [B, n, H, Dv].
  * gather: after the last block, `all_gather` of [B, n, C] on the whole group, padding rows dropped; the head
    runs on every rank on the full sequence.
  * 8-bit self-attention (`set_attention("int8")`, inference only): q comes quantized from the projection's
    kernel (per token and head, as on one process). With Ulysses, each rank also quantizes its own k and v
    BEFORE the all-to-all, with the statistics of the Ulysses group's whole key set (`wan::kv_stats` of its
    tokens, two all-reduces of [B, H, 2 D] fp32 over the group, `kv_stats_finish`), so the codes equal those of
    quantizing the gathered set (as one process does, up to the fp32 order of the sums), and q, k and v cross the
    all-to-all as codes and scales in one byte buffer (`qkv8_row`: 400 bytes per token and head at D = 128 with
    fp8 P.V, 528 with fp16, instead of 768 at bf16); each rank then runs `wan::attention_int8_quantized_lse` on
    whole heads. Without Ulysses or ring: `wan::attention_int8_q8`. In a ring each K/V block is quantized once,
    by its owner (`wan::quantize_kv_int8` on its valid keys, or the Ulysses exchange's codes) and travels round
    the ring as codes (`kv8_layout`: 260 bytes per token and head at D = 128 with fp8 P.V, 388 with fp16,
    instead of 512 at bf16); every rank runs `wan::attention_int8_quantized_lse` on each block, whose LSE is
    corrected for the smoothing with the dequantized q, so the fp32 merge is that of the scores the blocks'
    outputs were computed from (q and the blocks are never quantized again).
The sub-groups get the timeout of the group they split (`group_timeout`; torch's new_group would give them
its 30 min default), so a stopped or dead rank fails the others' collectives after the caller's timeout.
Communication per self-attention layer and rank: Ulysses 4 x (U - 1) / U of the local q, k, v, out bytes
(8-bit: q's, k's and v's codes and scales, and the statistics' all-reduces); ring (R - 1) x the local K/V block
(8-bit: its codes and scales) (`wan_model.cost.parallel_comm`).

Training (backward through the collectives). Every rank passes the same full inputs and computes the same loss
from the full output; then every rank's gradients (of the inputs and of every parameter) are the single-process
ones:
  * the gather's backward slices the rank's rows out of the (replicated) output gradient;
  * a replicated tensor entering the token-split region (the patch-embedded x, temb_proj, the cross-attention
    K/V of the context) is the identity forward and all-reduces (sums) its gradient over the group backward:
    each rank's rows contribute their share;
  * the parameters of the blocks see only the rank's tokens: a gradient hook on each (registered by
    `enable_parallelism`, and at every forward with grad mode on for parameters added since, e.g. LoRA
    layers; removed by `disable_parallelism`) all-reduces the gradient each backward brings before it is
    accumulated into `.grad` (so gradient accumulation over several backwards stays exact);
  * Ulysses' all_to_all is its own adjoint (the backward sends the gradients back the same way);
  * ring: the backward sends the K/V blocks round the ring again, each with its dK/dV accumulator (fp32);
    each rank adds its queries' share, `wan::attention_backward` with the GLOBAL (merged) lse and
    delta = rowsum(dout * out_merged), and after the last block one more hop returns each accumulator to
    the block's owner (R hops of dK/dV, R - 1 of K/V).
The collectives of one backward run in the same order on every rank (the same graph); the hooks' all-reduces
are blocking, one per parameter (no bucketing).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from wan_kernels.hardware import empty_v8


class _SumGrad(torch.autograd.Function):
    """A replicated tensor entering the token-split region: identity forward, gradient summed over `group`."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _Gather(torch.autograd.Function):
    """[B, n, C] of every rank -> [B, S, C] on every rank; backward: this rank's rows of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x, sp):
        ctx.rows = (sp.n * sp.size - sp.S, sp.rank * sp.n, sp.n)  # padding, first row, rows of this rank
        parts = [torch.empty_like(x) for _ in range(sp.size)]
        dist.all_gather(parts, x.contiguous(), group=sp.group)
        return torch.cat(parts, dim=1)[:, :sp.S]

    @staticmethod
    def backward(ctx, g):
        pad, lo, n = ctx.rows
        return F.pad(g, (0, 0, 0, pad)).narrow(1, lo, n).contiguous(), None


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` of equal chunks along dim 0 over `group`; its own adjoint (the backward sends the
    gradient chunks back the same way)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        return _AllToAll.forward(ctx, g, ctx.group), None


def group_timeout(group=None):
    """The timeout of a process group's collectives (`init_process_group(timeout=...)` for the world), or None
    where the backend does not tell (torch's private `options._timeout`; None: new_group's default)."""
    pg = group or dist.group.WORLD
    try:
        return pg._get_backend(torch.device("cuda" if dist.get_backend(pg) == "nccl" else "cpu")).options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return None


def local_attention(q, k, v, ops):
    """The single-process self-attention of WanBlock: q, k, v [B, S, H, D] -> [B, S, H, Dv]."""
    return ops.attention(q, k, v, None, None, None)


class SequenceParallel:
    """The state of `enable_parallelism`: degrees, sub-groups, this rank's place, the bound attention_lse op."""

    def __init__(self, num_heads: int, impl: str, ulysses_degree: int = 1, ring_degree: int = 1, group=None):
        U, R = ulysses_degree, ring_degree
        if not (isinstance(U, int) and isinstance(R, int) and U >= 1 and R >= 1):
            raise ValueError(f"enable_parallelism: ulysses_degree and ring_degree must be integers >= 1, "
                             f"got ulysses_degree={U!r}, ring_degree={R!r}")
        if num_heads % U:
            raise ValueError(f"enable_parallelism: ulysses_degree={U} must divide num_attention_heads={num_heads} "
                             f"(Ulysses gives each rank num_attention_heads / ulysses_degree heads)")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("enable_parallelism: call torch.distributed.init_process_group first")
        world = dist.get_world_size(group)
        if U * R != world:
            raise ValueError(f"enable_parallelism: ulysses_degree * ring_degree = {U} * {R} = {U * R} must equal "
                             f"the process group's size {world}")
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
        self.U, self.R, self.group, self.rank = U, R, group, dist.get_rank(group)
        self.ulysses_rank, self.ring_rank = self.rank % U, self.rank // U
        self.ulysses_group = self.ring_group = None
        # every rank creates every sub-group, in the same order (torch.distributed.new_group's rule), with the
        # timeout of `group` (new_group's default is torch's 30 min, whatever the parent's)
        timeout = group_timeout(group)
        if U > 1:
            for r in range(R):
                g = dist.new_group([ranks[r * U + u] for u in range(U)], timeout=timeout)
                if r == self.ring_rank:
                    self.ulysses_group = g
        if R > 1:
            for u in range(U):
                g = dist.new_group([ranks[r * U + u] for r in range(R)], timeout=timeout)
                if u == self.ulysses_rank:
                    self.ring_group = g
        # attention_lse has no CUDA kernel of _C: impl="cuda" runs its auto route (Triton on GPUs);
        # attention_backward has no C++ kernel at all: impl="cpu" too
        self.lse_impl = "auto" if impl == "cuda" else impl
        self.bwd_impl = "auto" if impl in ("cuda", "cpu") else impl
        self.S = self.n = None
        self.blocks, self._hooks = None, {}  # the model's blocks; parameter -> its gradient hook

    def hook_parameters(self) -> None:
        """Sum the gradients of the blocks' parameters over the group (see the module docstring): a hook on
        each trainable parameter that has none yet."""
        for p in self.blocks.parameters():
            if p.requires_grad and p not in self._hooks:
                self._hooks[p] = p.register_hook(self._sum)

    def _sum(self, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=self.group)
        return g

    def unhook_parameters(self) -> None:
        for h in self._hooks.values():
            h.remove()
        self._hooks = {}

    @property
    def size(self) -> int:
        return self.U * self.R

    # ------------------------------------------------------------------------------------------
    def split(self, x, temb_proj, rope_cos, rope_sin, context):
        """This rank's rows: x [B, S, C] -> [B, n, C]; temb_proj [B, 1|S, 6, C] -> [B, 1|n, 6, C];
        rope_cos/sin [S, D/2] -> [n, D/2] (the rows at the rank's global positions; zero rows as padding).
        context (a WanContext) is replicated; with grad mode on, x, temb_proj and the context's K/V sum
        their gradients over the group backward, and new block parameters get their hooks."""
        S = self.S = x.shape[1]
        n = self.n = math.ceil(S / self.size)
        lo, pad = self.rank * n, n * self.size - S
        if torch.is_grad_enabled():
            self.hook_parameters()

            def enter(t):
                return _SumGrad.apply(t, self.group) if t is not None and t.requires_grad else t

            x, temb_proj = enter(x), enter(temb_proj)
            context = dataclasses.replace(context, k=[enter(t) for t in context.k], v=[enter(t) for t in context.v],
                                          k_img=context.k_img and [enter(t) for t in context.k_img],
                                          v_img=context.v_img and [enter(t) for t in context.v_img])

        def rows(t, dim):
            return F.pad(t.movedim(dim, 0), (0, 0) * (t.dim() - 1) + (0, pad)).narrow(0, lo, n).movedim(0, dim)

        if temb_proj.shape[1] == S:
            temb_proj = rows(temb_proj, 1)
        return (rows(x, 1).contiguous(), temb_proj, rows(rope_cos, 0).contiguous(), rows(rope_sin, 0).contiguous(),
                context)

    def gather(self, x):
        """[B, n, C] of every rank -> [B, S, C] (padding rows dropped), on every rank."""
        return _Gather.apply(x, self)

    # ------------------------------------------------------------------------------------------
    def attention(self, q, k, v, ops, pv: str | None = None):
        """Self-attention of this rank's rows: q, k, v [B, n, H, D] -> [B, n, H, Dv] (all tokens attended).
        `pv`: None, wan::attention (ring: attention_lse) on a float q; else the 8-bit attention with that P.V
        precision on q quantized by the projection's kernel, (q8 int8 [B, n, H, D], q_scale fp32 [B, H, n])
        (`_attention_int8`: Ulysses sends q, k and v as codes; a ring's blocks travel quantized). Inference only:
        an input requiring grad is refused."""
        quantized = isinstance(q, tuple)
        if quantized != (pv is not None):
            raise ValueError("SequenceParallel.attention: the 8-bit attention takes q quantized (q8, q_scale), "
                             f"wan::attention a float q; got {'(q8, q_scale)' if quantized else 'a float q'} "
                             f"with pv={pv!r}")
        if quantized and torch.is_grad_enabled() and any(t.requires_grad for t in (*q, k, v)):
            raise RuntimeError("wan::attention_int8 is inference only (no gradients), but the sequence-parallel "
                               "self-attention's inputs require grad: train with set_attention('bf16'), or run "
                               "under torch.no_grad()")
        if quantized:
            return self._attention_int8(q, k, v, ops, pv)
        if self.U > 1:                                                         # [B, U n, H / U, D] each
            q, k, v = self._to_heads(torch.stack((q, k, v)))
        if self.R > 1:
            out = self._ring(q, k, v)
        else:
            k, v = k[:, :min(self.S, k.shape[1])], v[:, :min(self.S, v.shape[1])]  # drop padding keys
            out = ops.attention(q, k, v, None, None, None)
        return self._to_tokens(out) if self.U > 1 else out

    def _attention_int8(self, q, k, v, ops, pv: str):
        """`attention` on q quantized by the projection, (q8, q_scale). Ulysses (U > 1): K and V are quantized on
        each rank BEFORE the all-to-all, with the statistics of the whole key set (the Ulysses group's tokens:
        wan::kv_stats of the rank's tokens, all-reduced over the group, `kv_stats_finish`), so their codes cross it
        with q's (`_to_heads_qkv8`) and equal those of quantizing the gathered set; then
        wan::attention_int8_quantized_lse on them (or the ring on that block). Without Ulysses: attention_int8_q8
        (K and V quantized here), or the ring."""
        from wan_kernels.ref.attention_int8 import resolve_pv

        pv = resolve_pv(pv, k.device)
        if self.U == 1:
            if self.R > 1:
                return self._ring_int8(q, pv, k.dtype, k, v)
            valid = min(self.S, k.shape[1])                                    # drop padding keys
            return ops.attention_int8_q8(*q, k[:, :valid], v[:, :valid], None, None, None, pv)
        q, kv = self._to_heads_qkv8(*q, k, v, pv)
        if self.R > 1:
            out = self._ring_int8(q, pv, k.dtype, kv=kv)
        else:
            from wan_kernels.routing import bind

            valid = min(self.S, kv[0].shape[1])
            attention = bind("attention_int8_quantized_lse", self.lse_impl, k.device)
            out = attention(*q, *_valid_keys(kv, valid), None, k.dtype)[0]
        return self._to_tokens(out)

    def _to_heads(self, qkv):
        """[3, B, n, H, D] (all heads of n tokens) -> 3 x [B, U n, H / U, D] (the Ulysses group's tokens)."""
        _, B, n, H, D = qkv.shape
        x = qkv.reshape(3, B, n, self.U, H // self.U, D).permute(3, 0, 1, 2, 4, 5)  # [U, 3, B, n, h, D]
        y = _AllToAll.apply(x, self.ulysses_group)                         # y[u]: rank u's tokens, my heads
        return y.permute(1, 2, 0, 3, 4, 5).reshape(3, B, self.U * n, H // self.U, D).unbind(0)

    def _group_kv_stats(self, k, v, pv: str):
        """(k_mean, v_mean, v_scale) [B, H, D / Dv] of the Ulysses group's key set (ring block): wan::kv_stats of
        this rank's valid tokens (no padding), summed (max, min) over the group, `kv_stats_finish`."""
        from wan_kernels.ref.attention_int8 import kv_stats_finish
        from wan_kernels.routing import bind

        B, n, H, D = k.shape
        Dv, u0 = v.shape[-1], self.ring_rank * self.U * n                  # the group's first global token
        mine = min(max(self.S - (u0 + self.ulysses_rank * n), 0), n)
        if mine:
            k_sum, v_sum, v_max, v_min = bind("kv_stats", self.lse_impl, k.device)(k[:, :mine], v[:, :mine])
        else:
            k_sum, v_sum = k.new_zeros((B, H, D), dtype=torch.float32), v.new_zeros((B, H, Dv), dtype=torch.float32)
            v_max, v_min = torch.full_like(v_sum, float("-inf")), torch.full_like(v_sum, float("inf"))
        sums, extrema = torch.cat((k_sum, v_sum), -1), torch.cat((v_max, -v_min), -1)
        dist.all_reduce(sums, group=self.ulysses_group)
        dist.all_reduce(extrema, op=dist.ReduceOp.MAX, group=self.ulysses_group)
        tokens = min(max(self.S - u0, 0), self.U * n)
        if tokens == 0:  # a ring block of padding only: never attended
            return k_sum.new_zeros((B, H, D)), v_sum.new_zeros((B, H, Dv)), v_sum.new_ones((B, H, Dv))
        return kv_stats_finish(sums[..., :D], sums[..., D:], extrema[..., :Dv], -extrema[..., Dv:], tokens, pv)

    def _to_heads_qkv8(self, q8, q_scale, k, v, pv: str):
        """The Ulysses exchange of the 8-bit self-attention: q8 int8 [B, n, H, D], q_scale fp32 [B, H, n] and this
        rank's k [B, n, H, D], v [B, n, H, Dv], quantized here with the group's statistics (`_group_kv_stats`) ->
        ((q8 [B, U n, h, D], q_scale [B, h, U n]), the quantized set of the group's tokens for my h = H / U heads:
        (k8, k_scale, k_mean, v8, v_scale, v_mean) as wan::quantize_kv_int8 gives it). One all-to-all of bytes:
        each (token, head) row packs k8 | v8 | q8 | (q_scale, k_scale), each piece at a multiple of 16 bytes in a
        row of a multiple of 16 bytes (`qkv8_row`), so the kernels read q and K through views of the received
        buffer with 16-byte aligned pointers and strides (and an fp16 V; an e4m3 V the launcher transposes into its
        token-contiguous layout, `hardware.empty_v8`, in one pass). 400 bytes per token and head at D = 128 with fp8 P.V
        (528 with fp16) instead of 768 for bf16 q, k, v (644 with q's codes and bf16 k, v). The per-head
        statistics are the same on every rank of the group (all-reduced): not sent."""
        from wan_kernels.routing import bind

        B, n, H, D = k.shape
        Dv, h, u = v.shape[-1], H // self.U, self.ulysses_rank
        k_mean, v_mean, v_scale = self._group_kv_stats(k, v, pv)
        k8, ks, _, v8, _, _ = bind("quantize_kv_int8", self.lse_impl, k.device)(k, v, pv, k_mean, v_mean, v_scale)
        x = pack_qkv8(q8, q_scale, k8, ks, v8)                               # [B, n, H, W]
        W = x.shape[-1]
        y = _AllToAll.apply(x.reshape(B, n, self.U, h, W).permute(2, 0, 1, 3, 4), self.ulysses_group)
        y = y.permute(1, 0, 2, 3, 4).reshape(B, self.U * n, h, W)          # [B, U n, h, W]: the group's tokens
        q8, q_scale, k8, ks, v8 = unpack_qkv8(y, D, Dv, pv)
        mine = slice(u * h, (u + 1) * h)
        return (q8, q_scale), (k8, ks, k_mean[:, mine], v8, v_scale[:, mine], v_mean[:, mine])

    def _to_tokens(self, out):
        """[B, U n, H / U, Dv] -> [B, n, H, Dv] (this rank's tokens, all heads)."""
        B, Un, h, Dv = out.shape
        n = Un // self.U
        x = out.reshape(B, self.U, n, h, Dv).transpose(0, 1)               # [U, B, n, h, Dv]
        y = _AllToAll.apply(x, self.ulysses_group)                         # y[u]: my tokens, rank u's heads
        return y.permute(1, 2, 0, 3, 4).reshape(B, n, self.U * h, Dv)

    def _ring(self, q, k, v):
        """q [B, Sb, h, D] against the K/V blocks of every ring rank (block j: global tokens [j Sb, (j+1) Sb))."""
        return _Ring.apply(q, k, v, self)

    def _ring_int8(self, q, pv: str, dtype: torch.dtype, k=None, v=None, kv=None):
        """`_ring` of a quantized q, (q8, q_scale), inference only. Each rank's K/V block is quantized once: here
        (wan::quantize_kv_int8 on its valid keys, smoothed by their own mean), or before Ulysses' all-to-all (`kv`:
        the quantized set of the block, `_to_heads_qkv8`). Its codes, scales and means travel round the ring in one
        byte buffer per block (`kv8_layout`: ~half the bytes of bf16 K and V with fp8 P.V); every rank runs
        wan::attention_int8_quantized_lse on each block as it comes (no quantizer pass on received blocks), whose
        LSE is corrected with q8 * q_scale (the q its scores were computed from), and merges the fp32 outputs
        (returned in `dtype`)."""
        from wan_kernels.routing import bind

        attention = bind("attention_int8_quantized_lse", self.lse_impl, q[0].device)
        B, Sb, h, D = q[0].shape
        Dv = (v if kv is None else kv[3]).shape[-1]
        layout = kv8_layout(B, Sb, h, D, Dv, pv)
        own = self._valid(self.S, self.ring_rank, Sb)
        block = torch.empty(layout_bytes(layout), dtype=torch.uint8, device=q[0].device)  # rows past `own`: unread
        if own:
            if kv is None:
                kv = bind("quantize_kv_int8", self.lse_impl, k.device)(k[:, :own], v[:, :own], pv)
            for t, view in zip(_valid_keys(kv, own), unpack(block, layout, own)):
                view.copy_(t)

        def attend(q_, buf, j):
            valid = self._valid(self.S, j, Sb)
            return attention(*q_, *unpack(buf, layout, valid), None, torch.float32) if valid else None

        out, _ = _ring_merge(q, block, self, attend)
        return out.to(dtype)

    @staticmethod
    def _valid(S: int, j: int, Sb: int) -> int:
        """Keys of ring block j (Sb tokens) of a sequence of S that are not padding."""
        return min(max(S - j * Sb, 0), Sb)

    def _hop(self, send: list, recv: list) -> list:
        """Start sending `send` to the next ring rank and receiving `recv` from the previous one; the requests."""
        R, r = self.R, self.ring_rank
        return dist.batch_isend_irecv(
            [dist.P2POp(dist.isend, t, group=self.ring_group, group_peer=(r + 1) % R) for t in send]
            + [dist.P2POp(dist.irecv, t, group=self.ring_group, group_peer=(r - 1) % R) for t in recv])


def _ring_merge(q, block, sp, attend):
    """The ring's forward: q [B, Sb, h, D] against every ring rank's K/V block. `block`: this rank's block as one
    tensor (every rank's of the same size), passed on as it is while the one in hand is computed;
    `attend(q, block, j)` -> (out, natural-log lse [B, h, Sb]) of ring rank j's block, or None for
    a block of padding only. Merged in fp32; returns (out fp32, lse)."""
    R, r = sp.R, sp.ring_rank
    out = lse = None
    for step in range(R):
        j = (r - step) % R
        if step < R - 1:  # pass the block on while this one is computed
            nxt = torch.empty_like(block)
            reqs = sp._hop([block], [nxt])
        part = attend(q, block, j)
        if part is not None:
            o_b, lse_b = part
            o_b = o_b.to(lse_b.dtype)
            if out is None:
                out, lse = o_b, lse_b
            else:
                w = torch.sigmoid(lse_b - lse).transpose(1, 2).unsqueeze(-1)  # [B, Sb, h, 1]
                out = out - w * (out - o_b)
                lse = lse - F.logsigmoid(lse - lse_b)
        if step < R - 1:
            for req in reqs:
                req.wait()
            block = nxt
    return out, lse


def _attend_kv(attention_lse, sp, Sb: int):
    """`_ring_merge`'s attend for a block stacked as kv [2, B, Sb, h, D]: its valid keys (no padding)."""
    def attend(q, kv, j):
        valid = sp._valid(sp.S, j, Sb)
        return attention_lse(q, kv[0, :, :valid], kv[1, :, :valid], None) if valid else None
    return attend


_ALIGN = 16  # bytes: each piece of a packed ring block starts where a fresh allocation would (the kernels' loads)


def kv8_layout(B: int, Sb: int, h: int, D: int, Dv: int, pv: str) -> tuple[tuple, ...]:
    """The byte layout of a ring block of Sb token rows quantized by wan::quantize_kv_int8 for `pv`: (byte offset,
    shape, strides, dtype, bytes to its last element) of k8 int8 [B, Sb, h, D], k_scale fp32 [B, h, Sb], k_mean fp32 [B, h, D], v8 [B, Sb, h,
    Dv] (e4m3: token-contiguous as `hardware.empty_v8` lays it out, the kernel's layout, so a received block is read
    in place; fp16: contiguous), v_scale, v_mean fp32 [B, h, Dv], each at a multiple of 16 bytes. A block of
    `valid` < Sb keys (padding) fills the first `valid` rows of k8, k_scale and v8 (`unpack`)."""
    v8 = empty_v8(B, Sb, h, Dv, torch.float8_e4m3fn if pv == "fp8" else torch.float16, "meta")
    pieces = (((B, Sb, h, D), torch.int8), ((B, h, Sb), torch.float32), ((B, h, D), torch.float32),
              v8, ((B, h, Dv), torch.float32), ((B, h, Dv), torch.float32))
    layout, offset = [], 0
    for piece in pieces:
        t = piece if isinstance(piece, torch.Tensor) else torch.empty(piece[0], dtype=piece[1], device="meta")
        size = (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()  # to its last byte
        layout.append((offset, tuple(t.shape), t.stride(), t.dtype, size))
        offset += -(-size // _ALIGN) * _ALIGN
    return tuple(layout)


def layout_bytes(layout) -> int:
    """The size of a buffer holding `layout` (`kv8_layout`), a multiple of 16 bytes."""
    offset, *_, size = layout[-1]
    return offset + -(-size // _ALIGN) * _ALIGN


def qkv8_row(D: int, Dv: int, pv: str) -> tuple[tuple[int, int, int, int], int]:
    """The row of Ulysses' 8-bit exchange (`SequenceParallel._to_heads_qkv8`), per token and head: byte offsets of
    k8 (D), v8 (Dv e4m3 for pv "fp8", fp16 otherwise), q8 (D) and the fp32 pair (q_scale, k_scale), each at a
    multiple of 16, and the row's width W (a multiple of 16). D = Dv = 128: 400 bytes (fp8), 528 (fp16)."""
    offsets, end = [], 0
    for size in (D, Dv * (1 if pv == "fp8" else 2), D, 8):
        end = -(-end // _ALIGN) * _ALIGN
        offsets.append(end)
        end += size
    return tuple(offsets), -(-end // _ALIGN) * _ALIGN


def pack_qkv8(q8, q_scale, k8, k_scale, v8) -> torch.Tensor:
    """The rows of Ulysses' 8-bit exchange: q8, k8 int8 [B, n, H, D], v8 e4m3 / fp16 [B, n, H, Dv], q_scale,
    k_scale fp32 [B, H, n] -> uint8 [B, n, H, W] laid out by `qkv8_row` (zero pads)."""
    B, n, H, D = k8.shape
    pv = "fp8" if v8.dtype == torch.float8_e4m3fn else "fp16"
    offsets, W = qkv8_row(D, v8.shape[-1], pv)
    x = torch.zeros((B, n, H, W), dtype=torch.uint8, device=k8.device)
    scales = torch.stack((q_scale, k_scale), -1).transpose(1, 2)             # [B, n, H, 2] fp32
    for t, o in zip((k8, v8, q8, scales), offsets):
        t = t.reshape(B, n, H, -1)
        x[..., o:o + t.shape[-1] * t.element_size()] = t.contiguous().view(torch.uint8)
    return x


def unpack_qkv8(y: torch.Tensor, D: int, Dv: int, pv: str) -> tuple[torch.Tensor, ...]:
    """Views of received rows [B, S, h, W] (`pack_qkv8`): (q8 [B, S, h, D], q_scale [B, h, S], k8, k_scale, v8),
    read by the kernels in place (16-byte aligned pieces; the scales, of token stride h W / 4, the launcher's `_rows`
    copies)."""
    (ok, ov, oq, os_), _ = qkv8_row(D, Dv, pv)
    v_dtype = torch.float8_e4m3fn if pv == "fp8" else torch.float16
    sc = y[..., os_:os_ + 8].view(torch.float32)                             # [B, S, h, 2]
    return (y[..., oq:oq + D].view(torch.int8), sc[..., 0].transpose(1, 2), y[..., ok:ok + D].view(torch.int8),
            sc[..., 1].transpose(1, 2), y[..., ov:ov + Dv * v_dtype.itemsize].view(v_dtype))


def _valid_keys(kv: tuple, valid: int) -> tuple:
    """A quantized key set (k8, k_scale, k_mean, v8, v_scale, v_mean) cut to its first `valid` keys (views)."""
    k8, ks, km, v8, vs, vm = kv
    return k8[:, :valid], ks[..., :valid], km, v8[:, :valid], vs, vm


def unpack(buf: torch.Tensor, layout, valid: int) -> tuple[torch.Tensor, ...]:
    """Views of a ring block's byte buffer (`kv8_layout`) as quantize_kv_int8's outputs for its first `valid` keys:
    k8 [B, valid, h, D], k_scale [B, h, valid] (rows of the buffer's Sb), k_mean, v8 [B, valid, h, Dv] (e4m3:
    token-contiguous rows of the buffer's padded Sb), v_scale, v_mean."""
    return _valid_keys(tuple(buf[o:o + size].view(dtype).as_strided(shape, stride)
                             for o, shape, stride, dtype, size in layout), valid)


class _Ring(torch.autograd.Function):
    """Ring attention over the ring group (SequenceParallel._ring). Forward: each K/V block visits every rank
    (R - 1 hops), partial results merged by their log-sum-exps in fp32. Backward: the blocks travel again,
    each with its fp32 dK/dV accumulator; block j's share is `wan::attention_backward` with the merged lse and
    delta = rowsum(dout * out); one last hop hands each accumulator to its block's owner."""

    @staticmethod
    def forward(ctx, q, k, v, sp):
        from wan_kernels.routing import bind

        attention_lse = bind("attention_lse", sp.lse_impl, q.device)
        kv = torch.stack((k, v)).contiguous()
        out, lse = _ring_merge(q, kv, sp, _attend_kv(attention_lse, sp, k.shape[1]))
        ctx.sp, ctx.S = sp, sp.S
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        from wan_kernels.routing import bind

        sp = ctx.sp
        q, k, v, out, lse = ctx.saved_tensors                            # out: merged, fp32; lse [B, h, Sb]
        attention_backward = bind("attention_backward", sp.bwd_impl, q.device)
        R, r, Sb = sp.R, sp.ring_rank, k.shape[1]
        dout = dout.to(q.dtype).contiguous()
        delta = (dout.to(out.dtype) * out).sum(-1).transpose(1, 2).contiguous()   # [B, h, Sb]
        kv = torch.stack((k, v)).contiguous()
        dkv = torch.zeros(kv.shape, dtype=lse.dtype, device=kv.device)  # block j's dK, dV so far
        dq = torch.zeros(q.shape, dtype=lse.dtype, device=q.device)
        for step in range(R):
            valid = sp._valid(ctx.S, (r - step) % R, Sb)
            if valid:
                dq_b, dk_b, dv_b = attention_backward(dout, q, kv[0, :, :valid], kv[1, :, :valid], lse, delta, None)
                dq += dq_b
                dkv[0, :, :valid] += dk_b
                dkv[1, :, :valid] += dv_b
            # pass block and accumulator on; after the last block only the accumulator, to the block's owner
            send, recv = ([kv, dkv], [torch.empty_like(kv), torch.empty_like(dkv)]) if step < R - 1 else \
                ([dkv], [torch.empty_like(dkv)])
            for req in sp._hop(send, recv):
                req.wait()
            kv, dkv = (recv[0], recv[1]) if step < R - 1 else (kv, recv[0])
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None


def enable(model, ulysses_degree: int = 1, ring_degree: int = 1, group=None) -> None:
    """`WanTransformer.enable_parallelism`: see the module docstring (plain degrees; diffusers' `config=` spelling
    is translated by `wan_model.WanModel.enable_parallelism`, wan_model/compat/diffusers.py `parallel_degrees`).
    Binds `sp.attention` (bf16) in every block; the model then rebinds the blocks its attention config runs in
    8 bits (`WanTransformer.dense_attention`)."""
    sp = SequenceParallel(model.config.num_attention_heads, model.impl, ulysses_degree, ring_degree, group)
    disable(model)
    sp.blocks = model.blocks
    sp.hook_parameters()
    model._parallel = sp
    for block in model.blocks:
        block.attn1.attend = sp.attention


def disable(model) -> None:
    """`WanTransformer.disable_parallelism`: back to single-process attention and gradients (the sub-groups stay
    alive)."""
    if getattr(model, "_parallel", None) is not None:
        model._parallel.unhook_parameters()
    model._parallel = None
    for block in model.blocks:
        block.attn1.attend = local_attention
