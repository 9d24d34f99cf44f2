// Argument checks of wan::qk_norm_rope, shared by its launchers. Messages quote shapes and dtypes.
#pragma once

#include <torch/types.h>

namespace wan {

inline void check_qk_norm_rope_args(const torch::Tensor& qkv, const torch::Tensor& norm_q_weight,
                                    const torch::Tensor& norm_k_weight, const torch::Tensor& rope_cos,
                                    const torch::Tensor& rope_sin, int64_t num_heads) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % 3 == 0, "qk_norm_rope: qkv must be [B, S, 3*C], got shape ",
              qkv.sizes());
  const auto dt = qkv.scalar_type();
  TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kFloat16 || dt == torch::kBFloat16,
              "qk_norm_rope: qkv must be float32/float16/bfloat16, got ", dt);
  const int64_t S = qkv.size(1), C = qkv.size(2) / 3;
  TORCH_CHECK(num_heads > 0 && C % num_heads == 0, "qk_norm_rope: num_heads=", num_heads,
              " does not divide C=", C, " (qkv shape ", qkv.sizes(), ")");
  const int64_t D = C / num_heads;
  TORCH_CHECK(D % 2 == 0, "qk_norm_rope: head_dim must be even, got ", D);
  TORCH_CHECK(norm_q_weight.dim() == 1 && norm_q_weight.size(0) == C, "qk_norm_rope: norm_q_weight must be [", C,
              "], got shape ", norm_q_weight.sizes());
  TORCH_CHECK(norm_k_weight.dim() == 1 && norm_k_weight.size(0) == C, "qk_norm_rope: norm_k_weight must be [", C,
              "], got shape ", norm_k_weight.sizes());
  for (const auto* t : {&norm_q_weight, &norm_k_weight}) {
    const auto wt = t->scalar_type();
    TORCH_CHECK(wt == torch::kFloat32 || wt == torch::kFloat16 || wt == torch::kBFloat16, "qk_norm_rope: ",
                t == &norm_q_weight ? "norm_q_weight" : "norm_k_weight", " must be float32/float16/bfloat16, got ", wt);
  }
  for (const auto* t : {&rope_cos, &rope_sin}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == S && t->size(1) == D / 2 && t->scalar_type() == torch::kFloat32,
                "qk_norm_rope: rope_cos/rope_sin must be float32 [S, D/2] = [", S, ", ", D / 2, "], got shape ",
                t->sizes(), " dtype ", t->scalar_type());
  }
  for (const auto* t : {&norm_q_weight, &norm_k_weight, &rope_cos, &rope_sin}) {
    TORCH_CHECK(t->device() == qkv.device(), "qk_norm_rope: all inputs must be on ", qkv.device(),
                ", got a tensor on ", t->device());
  }
}

}  // namespace wan
