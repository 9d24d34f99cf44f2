// C++ CPU kernels of wan::attention: softmax(q k^T s) v [+ softmax(q k_img^T s) v_img], [B, S, H, D] layout,
// and of wan::attention_lse (one key set, plus the log-sum-exp of the scores that ATen's flash kernel computes).
//
// Each softmax branch runs ATen's CPU flash-attention kernel (blocked, vectorised, threaded: 50 ms vs 106 ms
// for the reference at 2 x 1280 tokens x 4 heads x 128) on fp32
// copies of the inputs (exact for bf16/fp16; fp64 stays fp64), in [B, H, S, D] views of our [B, S, H, D]
// tensors (no transposing copies). The branches are summed in fp32 and rounded to the output dtype ONCE,
// which is the contract of every wan::attention backend. (Calling the flash kernel in bf16 would round
// the I2V sum twice, as diffusers does.)
//
// bfloat16 inputs: by cpu_attention_bf16_kernel() (attention_cpu_bf16.h). On AMX CPUs a single key set runs
// ATen's flash kernel on the bf16 tensors themselves (AMX tiles; fp32 accumulation and softmax, P rounded to
// bf16 for P V, the output rounded once: the contract; 5.4x faster than the AVX512-BF16 kernel at 2 x 1280 x
// 4 x 128 on a Sapphire Rapids-class CPU); the I2V sum of two sets runs the AVX512-BF16 kernel, whose fp32
// sum is rounded once. Without AMX, AVX512-BF16 CPUs run that kernel for every call (ATen's flash kernel
// computes bf16 in fp32 there: 1.7-1.9x slower; bench/bench_attention.py --cpu); WAN_CPU_ATTENTION=aten
// keeps bf16 on ATen's fp32 path.
//
// NaN: ATen's flash kernel treats a query row whose running score max stays -inf as fully masked and returns
// zeros (log-sum-exp 0) for it. A row of only NaN / -inf scores gets there (a NaN in q or scale=nan with
// fewer keys than its vector width: the scalar tail of its max drops NaN), where softmax, the reference and
// every other backend give NaN. Rows whose LSE is exactly 0 (those, plus rare genuine ones) get their score
// max recomputed and become NaN where it is not > -inf; an O(B H Sq) check on the normal path. Shapes the
// flash kernel does not take (value dim != head dim) run the plain formula (ATen's math kernel zeroes such
// rows as well).
#include <ATen/SDPBackend.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "attention/attention_cpu_bf16.h"

namespace wan {
namespace {

void check_attention_args(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                          const std::optional<torch::Tensor>& k_img, const std::optional<torch::Tensor>& v_img) {
  const std::pair<const char*, const torch::Tensor*> named[] = {{"q", &q}, {"k", &k}, {"v", &v}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->dim() == 4, "attention: ", name, " must be [B, S, H, D], got shape ", t->sizes());
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kFloat16 || dt == torch::kBFloat16 || dt == torch::kFloat64,
              "attention: q must be a floating dtype, got ", dt);
  TORCH_CHECK(k_img.has_value() == v_img.has_value(), "attention: k_img and v_img must be given together");
  auto check_pair = [&](const torch::Tensor& kt, const torch::Tensor& vt, const char* name) {
    TORCH_CHECK(kt.dim() == 4 && kt.size(0) == q.size(0) && kt.size(2) == q.size(2) && kt.size(3) == q.size(3),
                "attention: ", name, " must be [", q.size(0), ", Sk, ", q.size(2), ", ", q.size(3),
                "] for q of shape ", q.sizes(), ", got shape ", kt.sizes());
    TORCH_CHECK(vt.dim() == 4 && vt.size(0) == kt.size(0) && vt.size(1) == kt.size(1) && vt.size(2) == kt.size(2) &&
                    vt.size(3) == v.size(3),
                "attention: the values of ", name, " must be [", kt.size(0), ", ", kt.size(1), ", ", kt.size(2),
                ", Dv], got shape ", vt.sizes());
    TORCH_CHECK(kt.size(1) > 0, "attention: ", name, " has no keys (shape ", kt.sizes(), ")");
    TORCH_CHECK(kt.scalar_type() == dt && vt.scalar_type() == dt, "attention: ", name, " dtypes differ from q's (",
                dt, ")");
    TORCH_CHECK(kt.device() == q.device() && vt.device() == q.device(), "attention: ", name, " is on ",
                kt.device(), " but q is on ", q.device());
  };
  check_pair(k, v, "k");
  if (k_img.has_value()) check_pair(*k_img, *v_img, "k_img");
}

// (softmax(q k^T scale) v, logsumexp(q k^T scale) [B, H, Sq]) for [B, H, S, D] views, by ATen's CPU kernels,
// with the NaN rows of softmax kept.
std::pair<torch::Tensor, torch::Tensor> softmax_attention(const torch::Tensor& q, const torch::Tensor& k,
                                                          const torch::Tensor& v, std::optional<double> scale) {
  const double s = scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(3))));
  constexpr auto flash = static_cast<int64_t>(at::SDPBackend::flash_attention);
  if (at::_fused_sdp_choice(q, k, v, {}, 0.0, false, scale) != flash) {
    // ATen's math kernel (value dim != head dim) zeroes rows of -inf scores too: the plain formula instead
    const auto scores = at::matmul(q, k.transpose(-1, -2)) * s;
    return {at::matmul(at::softmax(scores, -1), v), at::logsumexp(scores, -1)};
  }
  auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, false, {}, scale);
  const auto rows = lse.eq(0).nonzero();  // [n, 3]: (b, h, s) of the rows the kernel may have zeroed
  const int64_t n = rows.size(0);
  if (n == 0) return {out, lse};
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 22) / (k.size(2) * k.size(3)));  // gathered k bound
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const auto r = rows.slice(0, r0, std::min(n, r0 + chunk));
    const auto b = r.select(1, 0), h = r.select(1, 1), i = r.select(1, 2);
    const auto scores = at::matmul(k.index({b, h}), q.index({b, h, i}).unsqueeze(-1)).squeeze(-1) * s;  // [c, Sk]
    const auto masked = scores.amax(-1).gt(-std::numeric_limits<double>::infinity()).logical_not();  // NaN or -inf
    const auto bad = masked.nonzero().squeeze(-1);
    const auto bb = b.index({bad}), hb = h.index({bad}), ib = i.index({bad});
    out.index_put_({bb, hb, ib}, torch::full({}, std::numeric_limits<double>::quiet_NaN(), out.options()));
    lse.index_put_({bb, hb, ib}, at::logsumexp(scores.index({bad}), -1).to(lse.scalar_type()));
  }
  return {out, lse};
}

// Whether ATen's flash kernel takes these bf16 [B, S, H, D] tensors as they are: not where its math kernel
// would compute the scores in bf16, and not with an infinite q or k (a +inf score: its bf16 kernel returns
// finite rows where softmax gives NaN; an O(B S H D) check). The fp32 path takes the others.
bool aten_bf16_flash(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     std::optional<double> scale) {
  constexpr auto flash = static_cast<int64_t>(at::SDPBackend::flash_attention);
  return at::_fused_sdp_choice(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), {}, 0.0, false, scale) ==
             flash &&
         !q.isinf().any().item<bool>() && !k.isinf().any().item<bool>();
}

torch::Tensor attention_cpu(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                            const std::optional<torch::Tensor>& k_img, const std::optional<torch::Tensor>& v_img,
                            std::optional<double> scale) {
  check_attention_args(q, k, v, k_img, v_img);
  if (q.scalar_type() == torch::kBFloat16) {
    const auto& kernel = cpu_attention_bf16_kernel();
    if (kernel == "aten_amx" && !k_img.has_value() && aten_bf16_flash(q, k, v, scale)) {
      return softmax_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
          .first.transpose(1, 2).contiguous();
    }
    if (kernel != "aten" && attention_bf16_avx512_supports(q.size(3), v.size(3))) {
      return attention_bf16_avx512(q, k, v, k_img, v_img,
                                   scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(3)))));
    }
  }
  const auto ct = q.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;  // compute type
  auto heads_first = [&](const torch::Tensor& x) { return x.to(ct).transpose(1, 2); };      // [B, H, S, D] view
  const auto qh = heads_first(q);
  auto out = softmax_attention(qh, heads_first(k), heads_first(v), scale).first;
  if (k_img.has_value()) out.add_(softmax_attention(qh, heads_first(*k_img), heads_first(*v_img), scale).first);
  return out.transpose(1, 2).to(q.scalar_type()).contiguous();  // [B, S, H, Dv], one rounding
}

// wan::attention_lse: one key set, (out [B, Sq, H, Dv] in q's dtype, lse [B, H, Sq] in the compute type) from
// the same ATen flash kernel, whose log-sum-exp it returns (bf16 inputs too, on fp32 copies: the AVX512-BF16
// kernel keeps no LSE, and ATen's bf16 kernel's LSE is off by up to ~2.5e-5 where the fp32 one is within 1e-6).
std::tuple<torch::Tensor, torch::Tensor> attention_lse_cpu(const torch::Tensor& q, const torch::Tensor& k,
                                                           const torch::Tensor& v, std::optional<double> scale) {
  check_attention_args(q, k, v, std::nullopt, std::nullopt);
  const auto ct = q.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  auto heads_first = [&](const torch::Tensor& x) { return x.to(ct).transpose(1, 2); };
  auto [out, lse] = softmax_attention(heads_first(q), heads_first(k), heads_first(v), scale);
  return {out.transpose(1, 2).to(q.scalar_type()).contiguous(), lse.contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(wan, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_lse", &attention_lse_cpu);
}

}  // namespace wan
