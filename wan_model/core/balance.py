"""The 8-bit self-attention's channel balance (stage 1b of wan::attention_int8's quantizer), folded into the
RMSNorm weights of the fused q.

The model's int8 self-attention gets q quantized in the kernel that makes it (`qk_norm_rope_int8`): its INT8
codes are written before any key is seen, so the op's own balance (q b, k / b per channel, b from both operands'
statistics: `wan_kernels.ref.attention_int8.channel_balance`) cannot happen there. It can happen one step
earlier: q and k are RMSNorm(x) * weight, then rotated in pairs (2i, 2i + 1), so with a b equal on the two
channels of each pair

    RoPE(RMSNorm(x_q) * (w_q b)) = RoPE(RMSNorm(x_q) * w_q) * b,   and k likewise with w_k / b,

and every score q . k is the same sum (exact arithmetic): any such b leaves the attention what it is, only the
INT8 grids change. The b comes from the statistics of the bf16 q and k that a dense step computes anyway
(`measure`, recorded by the measuring projection while the sampler's dense steps run) and is used from the next
8-bit step on (`WanTransformer.dense_attention`). The products w_q b, w_k / b are taken in fp32 at every call
(2 C multiplies per layer): the kernel reads fp32 weights as it reads bf16 ones, and b = 1 (nothing measured yet)
gives back exactly the weights, hence exactly the q8 of the unbalanced fused path.

Under sequence parallelism every rank must fold the same b (a token's q b meets other ranks' k / b): the
statistics are merged over the group first (`merge`: maxima by max, mean squares by their mean)."""

from __future__ import annotations

import math

import torch

from wan_kernels.ref.attention_int8 import centred_amax, channel_balance, smoothed_sqmean

__all__ = ["measure", "merge", "balance_of", "folded_norms"]

Q_AMAX, Q_SQMEAN, K_AMAX, K_SQMEAN = range(4)


def measure(q: torch.Tensor, k: torch.Tensor, chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """Per-channel statistics [4, C] fp32 of q and k [B, S, H, D] over batch and tokens (the balance is shared
    by the batch: CFG's two halves see the same weights): max |q|, mean q^2, and of k smoothed as the quantizer
    smooths it (its per-(batch, head, channel) mean over the tokens subtracted) max |k - mean|, mean (k - mean)^2,
    from k's sums, extrema and sums of squares as the quantizer's statistics pass gets them (`centred_amax`,
    `smoothed_sqmean`: a key bias much larger than k's spread costs the latter digits, not sense; b only steers
    the rounding). One read of q and k, in runs of tokens whose fp32 copies take about `chunk_bytes` (64 MB: a
    dense step at 720p must not need a second q)."""
    B, S, H, D = q.shape
    step = max(1, chunk_bytes // (4 * B * H * D))
    f32 = dict(dtype=torch.float32, device=q.device)
    q_amax, q_sq = torch.zeros(H, D, **f32), torch.zeros(H, D, **f32)
    k_sum, k_sq = torch.zeros(B, H, D, **f32), torch.zeros(B, H, D, **f32)
    k_hi, k_lo = torch.full((B, H, D), -math.inf, **f32), torch.full((B, H, D), math.inf, **f32)
    for s0 in range(0, S, step):
        qc, kc = q[:, s0:s0 + step].float(), k[:, s0:s0 + step].float()
        q_amax = torch.maximum(q_amax, qc.abs().amax(dim=(0, 1)))
        q_sq += qc.square().sum(dim=(0, 1))
        k_sum += kc.sum(dim=1)
        k_sq += kc.square().sum(dim=1)
        k_hi, k_lo = torch.maximum(k_hi, kc.amax(dim=1)), torch.minimum(k_lo, kc.amin(dim=1))
    mean = k_sum / S
    k_amax = centred_amax(k_hi, k_lo, mean).amax(dim=0)
    k_sqmean = smoothed_sqmean(k_sq / S, mean).mean(dim=0)
    return torch.stack((q_amax, q_sq / (B * S), k_amax, k_sqmean)).flatten(1)


def merge(stats: torch.Tensor, group=None) -> torch.Tensor:
    """`measure`'s statistics [..., 4, C] merged over a process group (every rank gets the same values): maxima
    by all_reduce MAX, mean squares by their mean over the ranks (equal token counts per rank)."""
    import torch.distributed as dist

    amax, sq = stats[..., [Q_AMAX, K_AMAX], :].contiguous(), stats[..., [Q_SQMEAN, K_SQMEAN], :].contiguous()
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(sq, group=group)
    sq /= dist.get_world_size(group)
    out = torch.empty_like(stats)
    out[..., [Q_AMAX, K_AMAX], :], out[..., [Q_SQMEAN, K_SQMEAN], :] = amax, sq
    return out


def balance_of(stats: torch.Tensor) -> torch.Tensor:
    """b [..., C] fp32 from statistics [..., 4, C]: the op's `channel_balance` of each RoPE pair's statistics (the
    larger maximum, the mean of the two mean squares), repeated on both channels of the pair. All-zero
    statistics (nothing measured) give b = 1."""
    pairs = stats.float().unflatten(-1, (-1, 2))
    amax, sq = pairs.amax(-1), pairs.mean(-1)
    b, _ = channel_balance(amax[..., Q_AMAX, :], sq[..., Q_SQMEAN, :], amax[..., K_AMAX, :], sq[..., K_SQMEAN, :])
    return b.repeat_interleave(2, dim=-1)


def folded_norms(norm_q: torch.Tensor, norm_k: torch.Tensor, balance: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_q b, w_k / b) fp32 [C]: the RMSNorm weights that make the fused kernel's q and k come out balanced."""
    b = balance.float()
    return norm_q.float() * b, norm_k.float() / b
