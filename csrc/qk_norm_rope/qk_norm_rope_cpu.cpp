// CPU launcher of wan::qk_norm_rope: checks, dtype dispatch, parallel over tokens.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common/dispatch.h"
#include "qk_norm_rope/qk_norm_rope.h"
#include "qk_norm_rope/qk_norm_rope_checks.h"

namespace wan {
namespace {

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> qk_norm_rope_cpu(
    const torch::Tensor& qkv, const torch::Tensor& norm_q_weight, const torch::Tensor& norm_k_weight,
    const torch::Tensor& rope_cos, const torch::Tensor& rope_sin, int64_t num_heads, double eps) {
  check_qk_norm_rope_args(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads);
  const int64_t B = qkv.size(0), S = qkv.size(1), C = qkv.size(2) / 3, D = C / num_heads;
  const auto x = qkv.stride(2) == 1 ? qkv : qkv.contiguous();
  const auto wq = norm_q_weight.to(torch::kFloat32).contiguous();
  const auto wk = norm_k_weight.to(torch::kFloat32).contiguous();
  const auto cs = rope_cos.contiguous();
  const auto sn = rope_sin.contiguous();
  auto opts = qkv.options();
  auto q = torch::empty({B, S, num_heads, D}, opts);
  auto k = torch::empty({B, S, num_heads, D}, opts);
  auto v = torch::empty({B, S, num_heads, D}, opts);
  const int64_t sb = x.stride(0), ss = x.stride(1);
  const float feps = static_cast<float>(eps);
  WAN_DISPATCH_FLOAT_HALF_BF16(qkv.scalar_type(), "qk_norm_rope_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = k.data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    const float* wqp = wq.data_ptr<float>();
    const float* wkp = wk.data_ptr<float>();
    const float* cp = cs.data_ptr<float>();
    const float* sp = sn.data_ptr<float>();
    at::parallel_for(0, B * S, 8, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / S, s = t % S;
        const scalar_t* row = xp + b * sb + s * ss;
        const float* c_s = cp + s * (D / 2);
        const float* s_s = sp + s * (D / 2);
        qk_norm_rope::norm_rope_row(row, wqp, c_s, s_s, C, D, feps, qp + t * C);
        qk_norm_rope::norm_rope_row(row + C, wkp, c_s, s_s, C, D, feps, kp + t * C);
        std::copy(row + 2 * C, row + 3 * C, vp + t * C);
      }
    });
  });
  return {q, k, v};
}

}  // namespace

TORCH_LIBRARY_IMPL(wan, CPU, m) { m.impl("qk_norm_rope", &qk_norm_rope_cpu); }

}  // namespace wan
