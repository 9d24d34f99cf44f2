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
(`measure`, recorded by the measuring projection while the sampler's dense steps run, then `finish`) and is used
from the next 8-bit step on (`WanTransformer.dense_attention`). The products w_q b, w_k / b are taken in fp32 at
every call (2 C multiplies per layer): the kernel reads fp32 weights as it reads bf16 ones, and b = 1 (nothing
measured yet) gives back exactly the weights, hence exactly the q8 of the unbalanced fused path.

Under sequence parallelism every rank must fold the same b (a token's q b meets other ranks' k / b): each rank
measures sums and extrema over its own tokens (its padding rows excluded), which add up over the group (`merge`)
into the statistics of the whole sequence: the b of one process, up to the fp32 order of the sums."""

from __future__ import annotations

import math

import torch

from wan_kernels.ref.attention_int8 import centred_amax, channel_balance, smoothed_sqmean

__all__ = ["measure", "merge", "finish", "balance_of", "folded_norms", "real_rows"]

# `finish`'s statistics [4, C]
Q_AMAX, Q_SQMEAN, K_AMAX, K_SQMEAN = range(4)
# `measure`'s partial statistics [7, B, C]: each adds up over parts of the sequence, by max (the extrema; k's
# minimum as the maximum of -k) or by sum (`merge`)
P_Q_AMAX, P_K_MAX, P_K_NEGMAX, P_Q_SQ, P_K_SUM, P_K_SQ, P_TOKENS = range(7)
MAXED, SUMMED = [P_Q_AMAX, P_K_MAX, P_K_NEGMAX], [P_Q_SQ, P_K_SUM, P_K_SQ, P_TOKENS]


def real_rows(rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> torch.Tensor:
    """bool [S]: the rows of a projection's RoPE tables [S, D/2] that are tokens. Sequence parallelism pads the last
    ranks' shards with zero rows of the tables (wan_model/core/parallel.py, `split`), whose q and k are then 0: no
    token of any key set, so no statistic may count them; a token's row has cos^2 + sin^2 = 1, never both 0."""
    return (rope_cos[:, 0] != 0) | (rope_sin[:, 0] != 0)


def measure(q: torch.Tensor, k: torch.Tensor, tokens: torch.Tensor | None = None,
            chunk_bytes: int = 64 << 20) -> torch.Tensor:
    """Partial statistics [7, B, C] fp32 (rows `P_*`) of q and k [B, S, H, D] over the rows `tokens` (bool [S];
    None: all): per batch and channel max |q|, max k, max -k, and the sums of q^2, k, k^2 and the token count,
    which add up over parts of a sequence (`merge`: sequence parallelism's ranks) and which `finish` makes the
    statistics of the whole. One read of q and k, in runs of tokens whose fp32 copies take about `chunk_bytes`
    (64 MB: a dense step at 720p must not need a second q); no host sync (the rows are a mask)."""
    B, S, H, D = q.shape
    step = max(1, chunk_bytes // (4 * B * H * D))
    out = torch.zeros(7, B, H, D, dtype=torch.float32, device=q.device)
    out[[P_K_MAX, P_K_NEGMAX]] = -math.inf
    for s0 in range(0, S, step):
        qc, kc = q[:, s0:s0 + step].float(), k[:, s0:s0 + step].float()
        k_hi = k_lo = kc
        if tokens is not None:
            real = tokens[s0:s0 + step].view(1, -1, 1, 1)
            qc, kc = qc * real, kc * real  # non-token rows add 0 to the sums and to max |q|
            k_hi, k_lo = kc.masked_fill(~real, -math.inf), kc.masked_fill(~real, math.inf)
        out[P_K_MAX] = torch.maximum(out[P_K_MAX], k_hi.amax(dim=1))
        out[P_K_NEGMAX] = torch.maximum(out[P_K_NEGMAX], -k_lo.amin(dim=1))
        out[P_TOKENS] += kc.shape[1] if tokens is None else real.sum()
        out[P_Q_AMAX] = torch.maximum(out[P_Q_AMAX], qc.abs().amax(dim=1))
        out[P_Q_SQ] += qc.square().sum(dim=1)
        out[P_K_SUM] += kc.sum(dim=1)
        out[P_K_SQ] += kc.square().sum(dim=1)
    return out.flatten(2)


def merge(partial: torch.Tensor, group=None) -> torch.Tensor:
    """`measure`'s partial statistics [..., 7, B, C] added up over a process group's parts of the sequence (every
    rank gets the same values): the extrema by all_reduce MAX, the sums by all_reduce SUM."""
    import torch.distributed as dist

    maxed, summed = partial[..., MAXED, :, :].contiguous(), partial[..., SUMMED, :, :].contiguous()
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(summed, group=group)
    out = torch.empty_like(partial)
    out[..., MAXED, :, :], out[..., SUMMED, :, :] = maxed, summed
    return out


def finish(partial: torch.Tensor) -> torch.Tensor:
    """Statistics [..., 4, C] (rows Q_AMAX, Q_SQMEAN, K_AMAX, K_SQMEAN) from partial ones [..., 7, B, C] over the
    whole sequence: over batch and tokens (the balance is shared by the batch: CFG's two halves see the same
    weights) max |q| and mean q^2, and of k smoothed as the quantizer smooths it (its per-(batch, head, channel)
    mean over the tokens subtracted) max |k - mean| and mean (k - mean)^2, from k's sums and extrema as the
    quantizer's statistics pass gets them (`centred_amax`, `smoothed_sqmean`: a key bias much larger than k's
    spread costs the latter digits, not sense; b only steers the rounding)."""
    p = lambda row: partial[..., row, :, :]  # noqa: E731  [..., B, C]
    tokens = p(P_TOKENS)
    mean = p(P_K_SUM) / tokens
    return torch.stack((p(P_Q_AMAX).amax(-2), p(P_Q_SQ).sum(-2) / tokens.sum(-2),
                        centred_amax(p(P_K_MAX), -p(P_K_NEGMAX), mean).amax(-2),
                        smoothed_sqmean(p(P_K_SQ) / tokens, mean).mean(-2)), dim=-2)


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
