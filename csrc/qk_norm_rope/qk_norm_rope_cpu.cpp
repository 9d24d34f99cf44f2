// CPU launchers of wan::qk_norm_rope and wan::qk_norm_rope_backward: checks, dtype dispatch, parallel over tokens.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "common/dispatch.h"
#include "common/ordered_sum.h"
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

// Row blocks of the backward: each owns the fp32 weight-gradient partial sums of its rows, summed in block order
// afterwards (deterministic, independent of the thread count).
constexpr int64_t kBackwardBlocks = 256;

// rstd is recomputed per row from qkv (qk_norm_rope.h); v's gradient is copied into grad_qkv's last C channels.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> qk_norm_rope_backward_cpu(
    const torch::Tensor& grad_q, const torch::Tensor& grad_k, const torch::Tensor& grad_v, const torch::Tensor& qkv,
    const torch::Tensor& norm_q_weight, const torch::Tensor& norm_k_weight, const torch::Tensor& rope_cos,
    const torch::Tensor& rope_sin, int64_t num_heads, double eps) {
  check_qk_norm_rope_args(qkv, norm_q_weight, norm_k_weight, rope_cos, rope_sin, num_heads);
  const int64_t B = qkv.size(0), S = qkv.size(1), C = qkv.size(2) / 3, D = C / num_heads, N = B * S;
  for (const auto* g : {&grad_q, &grad_k, &grad_v}) {
    const char* name = g == &grad_q ? "grad_q" : g == &grad_k ? "grad_k" : "grad_v";
    TORCH_CHECK(g->sizes() == torch::IntArrayRef({B, S, num_heads, D}), "qk_norm_rope_backward: ", name,
                " must be [B, S, H, D] = [", B, ", ", S, ", ", num_heads, ", ", D, "] for qkv of shape ", qkv.sizes(),
                ", got shape ", g->sizes());
    TORCH_CHECK(g->scalar_type() == qkv.scalar_type(), "qk_norm_rope_backward: ", name, " must have qkv's dtype ",
                qkv.scalar_type(), ", got ", g->scalar_type());
    TORCH_CHECK(g->device() == qkv.device(), "qk_norm_rope_backward: ", name, " is on ", g->device(),
                " but qkv is on ", qkv.device());
  }
  const auto x = qkv.stride(2) == 1 ? qkv : qkv.contiguous();
  const auto gq = grad_q.contiguous(), gk = grad_k.contiguous(), gv = grad_v.contiguous();
  const auto wq = norm_q_weight.to(torch::kFloat32).contiguous();
  const auto wk = norm_k_weight.to(torch::kFloat32).contiguous();
  const auto cs = rope_cos.contiguous();
  const auto sn = rope_sin.contiguous();
  auto dqkv = torch::empty({B, S, 3 * C}, qkv.options());
  const int64_t rows = std::max<int64_t>(1, (N + kBackwardBlocks - 1) / kBackwardBlocks);
  const int64_t blocks = (N + rows - 1) / rows;
  auto partial = torch::zeros({2, blocks, C}, qkv.options().dtype(torch::kFloat32));  // [q | k, block, C]
  const int64_t sb = x.stride(0), ss = x.stride(1);
  const float feps = static_cast<float>(eps);
  WAN_DISPATCH_FLOAT_HALF_BF16(qkv.scalar_type(), "qk_norm_rope_backward_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gqp = gq.data_ptr<scalar_t>();
    const scalar_t* gkp = gk.data_ptr<scalar_t>();
    const scalar_t* gvp = gv.data_ptr<scalar_t>();
    scalar_t* dp = dqkv.data_ptr<scalar_t>();
    float* pp = partial.data_ptr<float>();
    const float* wqp = wq.data_ptr<float>();
    const float* wkp = wk.data_ptr<float>();
    const float* cp = cs.data_ptr<float>();
    const float* sp = sn.data_ptr<float>();
    at::parallel_for(0, blocks, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> gy(C);
      for (int64_t p = p0; p < p1; ++p) {
        for (int64_t t = p * rows; t < std::min(N, (p + 1) * rows); ++t) {
          const int64_t b = t / S, s = t % S;
          const scalar_t* row = xp + b * sb + s * ss;
          const float* c_s = cp + s * (D / 2);
          const float* s_s = sp + s * (D / 2);
          scalar_t* drow = dp + t * 3 * C;
          qk_norm_rope::norm_rope_row_backward(row, gqp + t * C, wqp, c_s, s_s, C, D, feps, drow, pp + p * C,
                                               gy.data());
          qk_norm_rope::norm_rope_row_backward(row + C, gkp + t * C, wkp, c_s, s_s, C, D, feps, drow + C,
                                               pp + (blocks + p) * C, gy.data());
          std::copy(gvp + t * C, gvp + (t + 1) * C, drow + 2 * C);
        }
      }
    });
  });
  const auto dwq = ordered_sum(partial.narrow(0, 0, 1), /*over_rows=*/true, /*over_batch=*/false).view({C});
  const auto dwk = ordered_sum(partial.narrow(0, 1, 1), /*over_rows=*/true, /*over_batch=*/false).view({C});
  return {dqkv, dwq.to(norm_q_weight.scalar_type()), dwk.to(norm_k_weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(wan, CPU, m) {
  m.impl("qk_norm_rope", &qk_norm_rope_cpu);
  m.impl("qk_norm_rope_backward", &qk_norm_rope_backward_cpu);
}

}  // namespace wan
