// C++ CPU kernel of wan::attention: softmax(q k^T s) v [+ softmax(q k_img^T s) v_img], [B, S, H, D] layout.
//
// Each softmax branch runs ATen's CPU flash-attention kernel (blocked, vectorised, threaded: 50 ms vs 106 ms
// for the reference at 2 x 1280 tokens x 4 heads x 128) on fp32
// copies of the inputs (exact for bf16/fp16; fp64 stays fp64), in [B, H, S, D] views of our [B, S, H, D]
// tensors (no transposing copies). The branches are summed in fp32 and rounded to the output dtype ONCE,
// which is the contract of every wan::attention backend. (Calling the flash kernel in bf16 would round
// the I2V sum twice, as diffusers does.)
//
// bfloat16 inputs on a CPU with AVX512-BF16 go to attention_cpu_bf16.cpp instead, which runs both matrix
// products at bf16 rate (ATen's flash kernel computes in fp32 there: 1.7-1.9x slower at the shapes above;
// bench/bench_attention.py --cpu); WAN_CPU_ATTENTION=aten opts out.
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>

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

torch::Tensor attention_cpu(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                            const std::optional<torch::Tensor>& k_img, const std::optional<torch::Tensor>& v_img,
                            std::optional<double> scale) {
  check_attention_args(q, k, v, k_img, v_img);
  if (q.scalar_type() == torch::kBFloat16 && cpu_attention_bf16_kernel() == "avx512_bf16" &&
      attention_bf16_avx512_supports(q.size(3), v.size(3))) {
    return attention_bf16_avx512(q, k, v, k_img, v_img, scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(3)))));
  }
  const auto ct = q.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;  // compute type
  auto heads_first = [&](const torch::Tensor& x) { return x.to(ct).transpose(1, 2); };      // [B, H, S, D] view
  const auto qh = heads_first(q);
  auto out = at::scaled_dot_product_attention(qh, heads_first(k), heads_first(v), {}, 0.0, false, scale);
  if (k_img.has_value()) {
    out.add_(at::scaled_dot_product_attention(qh, heads_first(*k_img), heads_first(*v_img), {}, 0.0, false, scale));
  }
  return out.transpose(1, 2).to(q.scalar_type()).contiguous();  // [B, S, H, Dv], one rounding
}

}  // namespace

TORCH_LIBRARY_IMPL(wan, CPU, m) { m.impl("attention", &attention_cpu); }

}  // namespace wan
