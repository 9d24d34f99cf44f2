// C++ CPU kernels of the DiT block's elementwise glue, each one pass over the activations, fp32 math and
// one rounding (diffusers computes the same in fp32 with several full-size fp32 temporaries and casts):
//   wan::layer_norm_modulate(x, scale, shift, eps) = (LayerNorm_fp32(x, no affine) * (1 + scale) + shift).to(x)
//   wan::gated_residual(x, y, gate)                = (x.float() + y.float() * gate).to(x)
// x, y: [B, S, C] (last dim contiguous); scale, shift, gate: fp32 broadcastable [B, 1|S, C] (any strides:
// the model passes unbound views of its [B, 1|S, 6, C] modulation tensor). Parallel over tokens; AVX512 rows
// where the CPU has AVX512 and the modulation operands are contiguous along C (the model's case), scalar rows
// otherwise.
// LayerNorm of huge rows: the sum of squared deviations overflows fp32 from |x| ~ 1e17 at Wan's widths (and the
// sum of x near 1e35), which made the output `shift` (rstd = 0) or NaN. A row whose sum of squares is not finite
// while max|x| is gets its moments again from x scaled by a power of two (layer_norm_modulate_row_huge); every
// other row runs the plain two-pass code unchanged, and a row holding inf/NaN stays NaN, as in torch.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/cpu_features.h"
#include "common/dispatch.h"
#include "common/ordered_sum.h"

namespace wan {
namespace {

// One row whose sum of squared deviations `sq` (from `mean`, as the fast rows computed them) is not finite:
// a finite row gets its moments again from x * 2^(1 - e), e = the exponent of max|x| (exact; the scaled row's
// max is in [2, 4)), eps scaled alike; a row holding inf/NaN keeps the plain formula (NaN, as torch). Scalar:
// the slow path of huge rows only. Modulation operands at strides ssc / shc along C.
template <typename T>
[[gnu::noinline, gnu::cold]] void layer_norm_modulate_row_huge(const T* x, const float* scale, int64_t ssc,
                                                               const float* shift, int64_t shc, int64_t C,
                                                               float mean, float sq, float eps, T* out) {
  float amax = 0.0f;
  for (int64_t c = 0; c < C; ++c) amax = std::max(amax, std::fabs(static_cast<float>(x[c])));
  float xscale = 1.0f, rstd = 1.0f / std::sqrt(sq / C + eps);
  if (std::isfinite(amax)) {
    xscale = std::ldexp(1.0f, 1 - std::ilogb(amax));
    double sum = 0;  // <= 4 C in magnitude: fp64 sums of the fp32 values are exact enough
    for (int64_t c = 0; c < C; ++c) sum += static_cast<float>(x[c]) * xscale;
    mean = static_cast<float>(sum / C);
    double ss = 0;
    for (int64_t c = 0; c < C; ++c) {
      const float d = static_cast<float>(x[c]) * xscale - mean;
      ss += static_cast<double>(d) * d;
    }
    rstd = 1.0f / std::sqrt(static_cast<float>(ss / C) + eps * xscale * xscale);
  }
  for (int64_t c = 0; c < C; ++c) {
    const float n = (static_cast<float>(x[c]) * xscale - mean) * rstd;
    out[c] = static_cast<T>(n * (1.0f + scale[c * ssc]) + shift[c * shc]);
  }
}

#if WAN_X86_AVX512
// AVX512 rows (CPUs with cpu_has_avx512(); modulation operands contiguous along C, as the model passes them):
// the same fp32 operations as the scalar rows below, 16 lanes at a time (no FMA contraction: setup.py builds
// with -ffp-contract=off), rounded to T by the rule of torch's casts (nearest even).
template <typename T>
WAN_TARGET_AVX512 inline __m512 load16(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  } else {  // bf16: the upper half of an fp32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
}

template <typename T>
WAN_TARGET_AVX512 inline void store16(T* p, __m512 v, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, m, v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {  // bf16 nearest-even as c10::BFloat16: (bits + 0x7FFF + lsb) >> 16; NaN -> 0x7FC0
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
  }
}

template <typename T>
WAN_TARGET_AVX512 void layer_norm_modulate_row_avx512(const T* x, const float* scale, const float* shift, int64_t C,
                                                      float eps, T* out) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) acc = _mm512_add_ps(acc, load16(x + c, tail_lanes(C - c)));
  const float m = _mm512_reduce_add_ps(acc) / C;
  const __m512 vm = _mm512_set1_ps(m);
  __m512 vacc = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = tail_lanes(C - c);
    const __m512 d = _mm512_maskz_sub_ps(k, load16(x + c, k), vm);
    vacc = _mm512_add_ps(vacc, _mm512_mul_ps(d, d));
  }
  const float sq = _mm512_reduce_add_ps(vacc);
  if (!std::isfinite(sq)) return layer_norm_modulate_row_huge(x, scale, 1, shift, 1, C, m, sq, eps, out);
  const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(sq / C + eps));
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = tail_lanes(C - c);
    const __m512 n = _mm512_mul_ps(_mm512_sub_ps(load16(x + c, k), vm), rstd);
    const __m512 y = _mm512_add_ps(_mm512_mul_ps(n, _mm512_add_ps(one, _mm512_maskz_loadu_ps(k, scale + c))),
                                   _mm512_maskz_loadu_ps(k, shift + c));
    store16(out + c, y, k);
  }
}

template <typename T>
WAN_TARGET_AVX512 void gated_residual_row_avx512(const T* x, const T* y, const float* gate, int64_t C, T* out) {
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = tail_lanes(C - c);
    store16(out + c, _mm512_add_ps(load16(x + c, k), _mm512_mul_ps(load16(y + c, k), _mm512_maskz_loadu_ps(k, gate + c))),
            k);
  }
}
#endif

// fp32 [B, 1|S, C] operand broadcast to [B, S, C]: element (b, s, c) at base + b*sb + s*ss + c*sc.
struct Bcast {
  const float* base;
  int64_t sb, ss, sc;
};

Bcast broadcast_arg(const torch::Tensor& t, const torch::Tensor& x, const char* op, const char* name) {
  const int64_t B = x.size(0), S = x.size(1), C = x.size(2);
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.dim() == 3 && (t.size(0) == B || t.size(0) == 1) &&
                  (t.size(1) == S || t.size(1) == 1) && t.size(2) == C,
              op, ": ", name, " must be float32 [", B, " or 1, ", S, " or 1, ", C, "] for x of shape ", x.sizes(),
              ", got shape ", t.sizes(), " dtype ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  return {t.data_ptr<float>(), t.size(0) == 1 ? 0 : t.stride(0), t.size(1) == 1 ? 0 : t.stride(1), t.stride(2)};
}

void check_x(const torch::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 3, op, ": ", name, " must be [B, S, C], got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kFloat16 || dt == torch::kBFloat16, op, ": ", name,
              " must be float32/float16/bfloat16, got ", dt);
}

torch::Tensor layer_norm_modulate_cpu(const torch::Tensor& x_in, const torch::Tensor& scale, const torch::Tensor& shift,
                                      double eps) {
  check_x(x_in, "layer_norm_modulate", "x");
  const auto x = x_in.contiguous();
  const int64_t B = x.size(0), S = x.size(1), C = x.size(2);
  const Bcast sc = broadcast_arg(scale, x, "layer_norm_modulate", "scale");
  const Bcast sh = broadcast_arg(shift, x, "layer_norm_modulate", "shift");
  auto out = torch::empty_like(x);
  const float feps = static_cast<float>(eps);
  WAN_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "layer_norm_modulate_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
#if WAN_X86_AVX512
    if (cpu_has_avx512() && sc.sc == 1 && sh.sc == 1) {
      at::parallel_for(0, B * S, 16, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b = t / S, s = t % S;
          layer_norm_modulate_row_avx512(xp + t * C, sc.base + b * sc.sb + s * sc.ss, sh.base + b * sh.sb + s * sh.ss,
                                         C, feps, op + t * C);
        }
      });
      return;
    }
#endif
    at::parallel_for(0, B * S, 16, [&](int64_t t0, int64_t t1) {
      std::vector<float> row(C);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / S, s = t % S;
        const scalar_t* xr = xp + t * C;
        // two-pass mean / variance in fp32 with 8 independent partial sums (vectorises; ATen's LN is fp32 too)
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t c = 0; c < C; ++c) acc[c & 7] += row[c] = static_cast<float>(xr[c]);
        const float m = (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) / C;
        float vacc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t c = 0; c < C; ++c) vacc[c & 7] += (row[c] - m) * (row[c] - m);
        const float sq = ((vacc[0] + vacc[4]) + (vacc[1] + vacc[5])) + ((vacc[2] + vacc[6]) + (vacc[3] + vacc[7]));
        const float* scp = sc.base + b * sc.sb + s * sc.ss;
        const float* shp = sh.base + b * sh.sb + s * sh.ss;
        scalar_t* orow = op + t * C;
        if (!std::isfinite(sq)) {
          layer_norm_modulate_row_huge(xr, scp, sc.sc, shp, sh.sc, C, m, sq, feps, orow);
          continue;
        }
        const float rstd = 1.0f / std::sqrt(sq / C + feps);
        for (int64_t c = 0; c < C; ++c) {
          const float n = (row[c] - m) * rstd;
          orow[c] = static_cast<scalar_t>(n * (1.0f + scp[c * sc.sc]) + shp[c * sh.sc]);
        }
      }
    });
  });
  return out;
}

torch::Tensor gated_residual_cpu(const torch::Tensor& x_in, const torch::Tensor& y_in, const torch::Tensor& gate) {
  check_x(x_in, "gated_residual", "x");
  check_x(y_in, "gated_residual", "y");
  TORCH_CHECK(y_in.sizes() == x_in.sizes(), "gated_residual: y must have x's shape ", x_in.sizes(), ", got ",
              y_in.sizes());
  const auto x = x_in.contiguous();
  const auto y = y_in.contiguous();
  const int64_t B = x.size(0), S = x.size(1), C = x.size(2);
  const Bcast g = broadcast_arg(gate, x, "gated_residual", "gate");
  auto out = torch::empty_like(x);
  WAN_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "gated_residual_cpu", [&] {
    using x_t = scalar_t;
    const x_t* xp = x.data_ptr<x_t>();
    x_t* op = out.data_ptr<x_t>();
#if WAN_X86_AVX512
    if (y.scalar_type() == x.scalar_type() && cpu_has_avx512() && g.sc == 1) {
      const x_t* yp = y.data_ptr<x_t>();
      at::parallel_for(0, B * S, 16, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          gated_residual_row_avx512(xp + t * C, yp + t * C, g.base + (t / S) * g.sb + (t % S) * g.ss, C, op + t * C);
        }
      });
      return;
    }
#endif
    WAN_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "gated_residual_cpu_y", [&] {
      const scalar_t* yp = y.data_ptr<scalar_t>();
      at::parallel_for(0, B * S, 16, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const float* gp = g.base + (t / S) * g.sb + (t % S) * g.ss;
          for (int64_t c = 0; c < C; ++c) {
            op[t * C + c] = static_cast<x_t>(static_cast<float>(xp[t * C + c]) +
                                             static_cast<float>(yp[t * C + c]) * gp[c * g.sc]);
          }
        }
      });
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward kernels, one pass over the activations each (rstd and the mean recomputed from x, as the forward):
//   layer_norm_modulate_backward: gn = g * (1 + scale), n = LayerNorm(x)
//     dx = rstd * (gn - mean(gn) - n * mean(gn * n)), dscale = g * n, dshift = g
//   gated_residual_backward: dy = g * gate, dgate = g * y
// A modulation gradient is written per token when its operand is per token, else summed over the tokens: the
// rows of each batch entry are cut into fixed blocks of `rows` tokens (independent of the thread count), each
// block sums its fp32 partials, and ordered_sum adds the blocks in order (deterministic). Rows and partials are
// fp32 with 8 independent accumulators for the row sums (vectorises; -ffp-contract=off keeps two roundings);
// AVX512 rows where the CPU has AVX512 and the modulation operand is contiguous along C (the model's case).
constexpr int64_t kBackwardBlocks = 256;

struct Blocks {
  int64_t rows, per_batch;
};

Blocks backward_blocks(int64_t B, int64_t S) {
  const int64_t rows = std::max<int64_t>(1, (B * S + kBackwardBlocks - 1) / kBackwardBlocks);
  return {rows, (S + rows - 1) / rows};
}

inline float sum8(const float* acc) {
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// One row of layer_norm_modulate's backward; xr, gr: the row of x and of the output gradient in fp32 (C values).
// kContig: the modulation operand is contiguous along C (the model's layout; lets the loops vectorise).
template <bool kContig, typename T>
inline void layer_norm_modulate_backward_row(const float* xr, const float* gr, const float* scp, int64_t ssc,
                                             int64_t C, float eps, T* dxr, float* dsc, bool sc_tok, float* dsh,
                                             bool sh_tok) {
  const int64_t st = kContig ? 1 : ssc;
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t c = 0; c < C; ++c) acc[c & 7] += xr[c];
  float m = sum8(acc) / C;
  float vacc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t c = 0; c < C; ++c) vacc[c & 7] += (xr[c] - m) * (xr[c] - m);
  float sq = sum8(vacc), xscale = 1.0f, rstd;
  if (!std::isfinite(sq)) {  // the forward's huge-row rule: moments of x * 2^(1 - e), e = exponent of max|x|
    float amax = 0.0f;
    for (int64_t c = 0; c < C; ++c) amax = std::max(amax, std::fabs(xr[c]));
    if (std::isfinite(amax)) {
      xscale = std::ldexp(1.0f, 1 - std::ilogb(amax));
      double sum = 0;
      for (int64_t c = 0; c < C; ++c) sum += xr[c] * xscale;
      m = static_cast<float>(sum / C);
      double ss = 0;
      for (int64_t c = 0; c < C; ++c) {
        const float d = xr[c] * xscale - m;
        ss += static_cast<double>(d) * d;
      }
      sq = static_cast<float>(ss);
    }
    rstd = 1.0f / std::sqrt(sq / C + eps * xscale * xscale);
  } else {
    rstd = 1.0f / std::sqrt(sq / C + eps);
  }
  float ag[8] = {0, 0, 0, 0, 0, 0, 0, 0}, agn[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t c = 0; c < C; ++c) {
    const float n = (xr[c] * xscale - m) * rstd;
    const float gn = gr[c] * (1.0f + scp[c * st]);
    ag[c & 7] += gn;
    agn[c & 7] += gn * n;
  }
  const float mg = sum8(ag) / C, mgn = sum8(agn) / C, r = rstd * xscale;
  for (int64_t c = 0; c < C; ++c) {
    const float n = (xr[c] * xscale - m) * rstd;
    const float gn = gr[c] * (1.0f + scp[c * st]);
    dxr[c] = static_cast<T>(r * ((gn - mg) - n * mgn));
    dsc[c] = sc_tok ? gr[c] * n : dsc[c] + gr[c] * n;
    dsh[c] = sh_tok ? gr[c] : dsh[c] + gr[c];
  }
}

#if WAN_X86_AVX512
// AVX512 rows of the backward (modulation contiguous along C): the same fp32 formulas as the scalar rows, 16 lanes
// at a time. Returns false, writing nothing, for a row whose sum of squares is not finite (the caller runs the
// scalar row, which has the huge-row rule).
template <typename T>
WAN_TARGET_AVX512 bool layer_norm_modulate_backward_row_avx512(const T* x, const T* g, const float* scale, int64_t C,
                                                               float eps, T* dx, float* dsc, bool sc_tok, float* dsh,
                                                               bool sh_tok) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) acc = _mm512_add_ps(acc, load16(x + c, tail_lanes(C - c)));
  const __m512 vm = _mm512_set1_ps(_mm512_reduce_add_ps(acc) / C);
  __m512 vacc = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = tail_lanes(C - c);
    const __m512 d = _mm512_maskz_sub_ps(k, load16(x + c, k), vm);
    vacc = _mm512_add_ps(vacc, _mm512_mul_ps(d, d));
  }
  const float sq = _mm512_reduce_add_ps(vacc);
  if (!std::isfinite(sq)) return false;
  const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(sq / C + eps));
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 ag = _mm512_setzero_ps(), agn = _mm512_setzero_ps();
  for (int64_t c = 0; c < C; c += 16) {  // tail lanes: g = 0, so gn = 0
    const __mmask16 k = tail_lanes(C - c);
    const __m512 n = _mm512_mul_ps(_mm512_maskz_sub_ps(k, load16(x + c, k), vm), rstd);
    const __m512 gn = _mm512_mul_ps(load16(g + c, k), _mm512_add_ps(one, _mm512_maskz_loadu_ps(k, scale + c)));
    ag = _mm512_add_ps(ag, gn);
    agn = _mm512_add_ps(agn, _mm512_mul_ps(gn, n));
  }
  const __m512 mg = _mm512_set1_ps(_mm512_reduce_add_ps(ag) / C), mgn = _mm512_set1_ps(_mm512_reduce_add_ps(agn) / C);
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = tail_lanes(C - c);
    const __m512 n = _mm512_mul_ps(_mm512_maskz_sub_ps(k, load16(x + c, k), vm), rstd);
    const __m512 gv = load16(g + c, k);
    const __m512 gn = _mm512_mul_ps(gv, _mm512_add_ps(one, _mm512_maskz_loadu_ps(k, scale + c)));
    store16(dx + c, _mm512_mul_ps(rstd, _mm512_sub_ps(_mm512_sub_ps(gn, mg), _mm512_mul_ps(n, mgn))), k);
    const __m512 gxn = _mm512_mul_ps(gv, n);
    _mm512_mask_storeu_ps(dsc + c, k, sc_tok ? gxn : _mm512_add_ps(_mm512_maskz_loadu_ps(k, dsc + c), gxn));
    _mm512_mask_storeu_ps(dsh + c, k, sh_tok ? gv : _mm512_add_ps(_mm512_maskz_loadu_ps(k, dsh + c), gv));
  }
  return true;
}

template <typename T>
WAN_TARGET_AVX512 void gated_residual_backward_row_avx512(const T* g, const T* y, const float* gate, int64_t C, T* dy,
                                                          float* dgate) {
  for (int64_t c = 0; c < C; c += 16) {
    const __mmask16 k = tail_lanes(C - c);
    const __m512 gv = load16(g + c, k);
    store16(dy + c, _mm512_mul_ps(gv, _mm512_maskz_loadu_ps(k, gate + c)), k);
    _mm512_mask_storeu_ps(dgate + c, k,
                          _mm512_add_ps(_mm512_maskz_loadu_ps(k, dgate + c), _mm512_mul_ps(gv, load16(y + c, k))));
  }
}
#endif

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> layer_norm_modulate_backward_cpu(
    const torch::Tensor& grad_out_in, const torch::Tensor& x_in, const torch::Tensor& scale, const torch::Tensor& shift,
    double eps) {
  const char* op = "layer_norm_modulate_backward";
  check_x(x_in, op, "x");
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes() && grad_out_in.scalar_type() == x_in.scalar_type(), op,
              ": grad_out must have x's shape ", x_in.sizes(), " and dtype ", x_in.scalar_type(), ", got shape ",
              grad_out_in.sizes(), " dtype ", grad_out_in.scalar_type());
  TORCH_CHECK(grad_out_in.device() == x_in.device(), op, ": grad_out is on ", grad_out_in.device(), " but x is on ",
              x_in.device());
  const auto x = x_in.contiguous();
  const auto g = grad_out_in.contiguous();
  const int64_t B = x.size(0), S = x.size(1), C = x.size(2);
  const Bcast sc = broadcast_arg(scale, x, op, "scale");
  broadcast_arg(shift, x, op, "shift");
  const bool sc_tok = scale.size(1) != 1, sh_tok = shift.size(1) != 1;
  const Blocks blk = backward_blocks(B, S);
  const auto f32 = x.options().dtype(torch::kFloat32);
  auto dx = torch::empty_like(x);
  auto dsc = torch::zeros({B, sc_tok ? S : blk.per_batch, C}, f32);
  auto dsh = torch::zeros({B, sh_tok ? S : blk.per_batch, C}, f32);
  const float feps = static_cast<float>(eps);
  WAN_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "layer_norm_modulate_backward_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    float* dscp = dsc.data_ptr<float>();
    float* dshp = dsh.data_ptr<float>();
#if WAN_X86_AVX512
    const bool avx512 = cpu_has_avx512() && sc.sc == 1;
#else
    const bool avx512 = false;
#endif
    at::parallel_for(0, B * blk.per_batch, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> xr(C), gr(C);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t b = p / blk.per_batch, j = p % blk.per_batch;
        for (int64_t s = j * blk.rows; s < std::min(S, (j + 1) * blk.rows); ++s) {
          const int64_t t = b * S + s;
#if WAN_X86_AVX512
          if (avx512 && layer_norm_modulate_backward_row_avx512(
                            xp + t * C, gp + t * C, sc.base + b * sc.sb + s * sc.ss, C, feps, dxp + t * C,
                            dscp + (sc_tok ? t : p) * C, sc_tok, dshp + (sh_tok ? t : p) * C, sh_tok)) {
            continue;
          }
#endif
          for (int64_t c = 0; c < C; ++c) {
            xr[c] = static_cast<float>(xp[t * C + c]);
            gr[c] = static_cast<float>(gp[t * C + c]);
          }
          const float* scp = sc.base + b * sc.sb + s * sc.ss;
          float* dscr = dscp + (sc_tok ? t : p) * C;
          float* dshr = dshp + (sh_tok ? t : p) * C;
          if (sc.sc == 1) {
            layer_norm_modulate_backward_row<true>(xr.data(), gr.data(), scp, 1, C, feps, dxp + t * C, dscr, sc_tok,
                                                   dshr, sh_tok);
          } else {
            layer_norm_modulate_backward_row<false>(xr.data(), gr.data(), scp, sc.sc, C, feps, dxp + t * C, dscr,
                                                    sc_tok, dshr, sh_tok);
          }
        }
      }
    });
  });
  return {dx, ordered_sum(dsc, !sc_tok, scale.size(0) == 1 && B != 1),
          ordered_sum(dsh, !sh_tok, shift.size(0) == 1 && B != 1)};
}

std::tuple<torch::Tensor, torch::Tensor> gated_residual_backward_cpu(const torch::Tensor& grad_out_in,
                                                                     const torch::Tensor& y_in,
                                                                     const torch::Tensor& gate) {
  const char* op = "gated_residual_backward";
  check_x(grad_out_in, op, "grad_out");
  check_x(y_in, op, "y");
  TORCH_CHECK(grad_out_in.sizes() == y_in.sizes(), op, ": grad_out must have y's shape ", y_in.sizes(), ", got ",
              grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.device() == y_in.device(), op, ": grad_out is on ", grad_out_in.device(), " but y is on ",
              y_in.device());
  const auto g = grad_out_in.contiguous();
  const auto y = y_in.contiguous();
  const int64_t B = y.size(0), S = y.size(1), C = y.size(2);
  const Bcast gt = broadcast_arg(gate, y, op, "gate");
  const bool tok = gate.size(1) != 1;
  const Blocks blk = backward_blocks(B, S);
  auto dy = torch::empty_like(y);
  auto dgate = torch::zeros({B, tok ? S : blk.per_batch, C}, y.options().dtype(torch::kFloat32));
  WAN_DISPATCH_FLOAT_HALF_BF16(g.scalar_type(), "gated_residual_backward_cpu", [&] {
    using g_t = scalar_t;
    const g_t* gp = g.data_ptr<g_t>();
#if WAN_X86_AVX512
    if (y.scalar_type() == g.scalar_type() && cpu_has_avx512() && gt.sc == 1) {
      const g_t* yp = y.data_ptr<g_t>();
      g_t* dyp = dy.data_ptr<g_t>();
      float* dgp = dgate.data_ptr<float>();
      at::parallel_for(0, B * blk.per_batch, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t b = p / blk.per_batch, j = p % blk.per_batch;
          for (int64_t s = j * blk.rows; s < std::min(S, (j + 1) * blk.rows); ++s) {
            const int64_t t = b * S + s;
            gated_residual_backward_row_avx512(gp + t * C, yp + t * C, gt.base + b * gt.sb + s * gt.ss, C,
                                               dyp + t * C, dgp + (tok ? t : p) * C);
          }
        }
      });
      return;
    }
#endif
    WAN_DISPATCH_FLOAT_HALF_BF16(y.scalar_type(), "gated_residual_backward_cpu_y", [&] {
      const scalar_t* yp = y.data_ptr<scalar_t>();
      scalar_t* dyp = dy.data_ptr<scalar_t>();
      float* dgp = dgate.data_ptr<float>();
      at::parallel_for(0, B * blk.per_batch, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t b = p / blk.per_batch, j = p % blk.per_batch;
          for (int64_t s = j * blk.rows; s < std::min(S, (j + 1) * blk.rows); ++s) {
            const int64_t t = b * S + s;
            const float* gtp = gt.base + b * gt.sb + s * gt.ss;
            const g_t* gr = gp + t * C;
            const scalar_t* yr = yp + t * C;
            scalar_t* dyr = dyp + t * C;
            float* dgr = dgp + (tok ? t : p) * C;
            if (gt.sc == 1) {
              for (int64_t c = 0; c < C; ++c) {
                const float gv = static_cast<float>(gr[c]);
                dyr[c] = static_cast<scalar_t>(gv * gtp[c]);
                dgr[c] += gv * static_cast<float>(yr[c]);  // zero-initialised: per-token rows are written once
              }
            } else {
              for (int64_t c = 0; c < C; ++c) {
                const float gv = static_cast<float>(gr[c]);
                dyr[c] = static_cast<scalar_t>(gv * gtp[c * gt.sc]);
                dgr[c] += gv * static_cast<float>(yr[c]);
              }
            }
          }
        }
      });
    });
  });
  return {dy, ordered_sum(dgate, !tok, gate.size(0) == 1 && B != 1)};
}

}  // namespace

TORCH_LIBRARY_IMPL(wan, CPU, m) {
  m.impl("layer_norm_modulate", &layer_norm_modulate_cpu);
  m.impl("gated_residual", &gated_residual_cpu);
  m.impl("layer_norm_modulate_backward", &layer_norm_modulate_backward_cpu);
  m.impl("gated_residual_backward", &gated_residual_backward_cpu);
}

}  // namespace wan
