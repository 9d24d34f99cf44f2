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
Communication per self-attention layer and rank: Ulysses 4 x (U - 1) / U of the local q, k, v, out bytes;
ring (R - 1) x the local K/V block. Inference only (the collectives are not differentiated).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


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
        # every rank creates every sub-group, in the same order (torch.distributed.new_group's rule)
        if U > 1:
            for r in range(R):
                g = dist.new_group([ranks[r * U + u] for u in range(U)])
                if r == self.ring_rank:
                    self.ulysses_group = g
        if R > 1:
            for u in range(U):
                g = dist.new_group([ranks[r * U + u] for r in range(R)])
                if u == self.ulysses_rank:
                    self.ring_group = g
        # attention_lse has no CUDA kernel of _C: impl="cuda" runs its auto route (Triton on GPUs)
        self.lse_impl = "auto" if impl == "cuda" else impl
        self.S = self.n = None

    @property
    def size(self) -> int:
        return self.U * self.R

    # ------------------------------------------------------------------------------------------
    def split(self, x, temb_proj, rope_cos, rope_sin):
        """This rank's rows: x [B, S, C] -> [B, n, C]; temb_proj [B, 1|S, 6, C] -> [B, 1|n, 6, C];
        rope_cos/sin [S, D/2] -> [n, D/2] (the rows at the rank's global positions; zero rows as padding)."""
        S = self.S = x.shape[1]
        n = self.n = math.ceil(S / self.size)
        lo, pad = self.rank * n, n * self.size - S

        def rows(t, dim):
            return F.pad(t.movedim(dim, 0), (0, 0) * (t.dim() - 1) + (0, pad)).narrow(0, lo, n).movedim(0, dim)

        if temb_proj.shape[1] == S:
            temb_proj = rows(temb_proj, 1)
        return rows(x, 1).contiguous(), temb_proj, rows(rope_cos, 0).contiguous(), rows(rope_sin, 0).contiguous()

    def gather(self, x):
        """[B, n, C] of every rank -> [B, S, C] (padding rows dropped), on every rank."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, :self.S]

    # ------------------------------------------------------------------------------------------
    def attention(self, q, k, v, ops):
        """Self-attention of this rank's rows: q, k, v [B, n, H, D] -> [B, n, H, Dv] (all tokens attended)."""
        if self.U > 1:
            q, k, v = self._to_heads(torch.stack((q, k, v)))                   # [B, U n, H / U, D] each
        if self.R > 1:
            out = self._ring(q, k, v)
        else:
            valid = min(self.S, k.shape[1])                                    # drop padding keys
            out = ops.attention(q, k[:, :valid], v[:, :valid], None, None, None)
        return self._to_tokens(out) if self.U > 1 else out

    def _to_heads(self, qkv):
        """[3, B, n, H, D] (all heads of n tokens) -> 3 x [B, U n, H / U, D] (the Ulysses group's tokens)."""
        _, B, n, H, D = qkv.shape
        x = qkv.reshape(3, B, n, self.U, H // self.U, D).permute(3, 0, 1, 2, 4, 5).contiguous()  # [U, 3, B, n, h, D]
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x, group=self.ulysses_group)             # y[u]: rank u's tokens, my heads
        return y.permute(1, 2, 0, 3, 4, 5).reshape(3, B, self.U * n, H // self.U, D).unbind(0)

    def _to_tokens(self, out):
        """[B, U n, H / U, Dv] -> [B, n, H, Dv] (this rank's tokens, all heads)."""
        B, Un, h, Dv = out.shape
        n = Un // self.U
        x = out.reshape(B, self.U, n, h, Dv).transpose(0, 1).contiguous()   # [U, B, n, h, Dv]
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x, group=self.ulysses_group)             # y[u]: my tokens, rank u's heads
        return y.permute(1, 2, 0, 3, 4).reshape(B, n, self.U * h, Dv)

    def _ring(self, q, k, v):
        """q [B, Sb, h, D] against the K/V blocks of every ring rank (block j: global tokens [j Sb, (j+1) Sb))."""
        from wan_kernels.routing import bind

        attention_lse = bind("attention_lse", self.lse_impl, q.device)
        R, r, Sb = self.R, self.ring_rank, k.shape[1]
        kv = torch.stack((k, v)).contiguous()
        out = lse = None
        for step in range(R):
            if step < R - 1:  # pass the block on while this one is computed
                nxt = torch.empty_like(kv)
                reqs = dist.batch_isend_irecv([
                    dist.P2POp(dist.isend, kv, group=self.ring_group, group_peer=(r + 1) % R),
                    dist.P2POp(dist.irecv, nxt, group=self.ring_group, group_peer=(r - 1) % R)])
            j = (r - step) % R
            valid = min(max(self.S - j * Sb, 0), Sb)                           # keys of block j that are not padding
            if valid:
                o_b, lse_b = attention_lse(q, kv[0, :, :valid], kv[1, :, :valid], None)
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
                kv = nxt
        return out.to(q.dtype)


def enable(model, ulysses_degree: int = 1, ring_degree: int = 1, group=None) -> None:
    """`WanModel.enable_parallelism`: see the module docstring."""
    sp = SequenceParallel(model.config.num_attention_heads, model.impl, ulysses_degree, ring_degree, group)
    model._parallel = sp
    for block in model.blocks:
        block.attn1.attend = sp.attention


def disable(model) -> None:
    """`WanModel.disable_parallelism`: back to single-process attention (the sub-groups stay alive)."""
    model._parallel = None
    for block in model.blocks:
        block.attn1.attend = local_attention
