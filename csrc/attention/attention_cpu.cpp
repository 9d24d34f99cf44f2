// C++ CPU kernel of wan::attention: softmax(q k^T s) v [+ softmax(q k_img^T s) v_img], [B, S, H, D] layout.
//
// One task per (batch, head): that head's K/V (and image K/V) are converted to fp32 once; queries go in
// blocks of 64 rows: S = (q * s) K^T for the block (one sgemm), a row-wise softmax in place (max, exp,
// sum; fp32), O = P V (one sgemm) scaled by 1/sum; the two branches are summed in fp32 and rounded to the
// output dtype once. Versus the reference (fp32 copies of the whole q/k/v, a [B, H, S, Sk] score tensor,
// softmax, bmm, transposes) this keeps the score block in cache and makes no full-size fp32 copies.
// Memory per thread: 64 x Sk floats for the score block (Sk = 75,600 -> 19 MB; CPU is not the target for
// such lengths). The GEMMs are ATen sgemm calls on tiles, single-threaded inside the parallel region.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <limits>

namespace wan {
namespace {

constexpr int64_t kBlockM = 1024;

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

// Adds softmax(qs kf^T) vf to acc for one block of queries (qs already scaled). scores: contiguous
// [bm, Sk] scratch. T: the compute type (float; double for fp64 inputs).
template <typename T>
void softmax_branch(const at::Tensor& qs, const at::Tensor& kf, const at::Tensor& vf, at::Tensor scores,
                    at::Tensor& acc) {
  at::mm_out(scores, qs, kf.t());                           // [bm, Sk]
  const int64_t bm = scores.size(0), sk = scores.size(1);
  T* s = scores.data_ptr<T>();
  at::parallel_for(0, bm, 16, [&](int64_t i0, int64_t i1) {  // no BLAS inside: plain loops only
    for (int64_t i = i0; i < i1; ++i) {
      T* row = s + i * sk;
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t j = 0; j < sk; ++j) mx = std::max(mx, row[j]);
      T sum = 0;
      for (int64_t j = 0; j < sk; ++j) {
        row[j] = std::exp(row[j] - mx);
        sum += row[j];
      }
      const T inv = T(1) / sum;
      for (int64_t j = 0; j < sk; ++j) row[j] *= inv;         // normalise P first, as softmax-then-matmul does
    }
  });
  acc.addmm_(scores, vf);                                    // [bm, Dv]
}

torch::Tensor attention_cpu(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                            const std::optional<torch::Tensor>& k_img, const std::optional<torch::Tensor>& v_img,
                            std::optional<double> scale) {
  check_attention_args(q, k, v, k_img, v_img);
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3), Dv = v.size(3);
  const float s = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D)));
  auto out = torch::empty({B, Sq, H, Dv}, q.options());
  const bool img = k_img.has_value();
  const auto ct = q.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;  // compute type
  {
    for (int64_t t = 0; t < B * H; ++t) {
      const int64_t b = t / H, h = t % H;
      auto head = [&](const torch::Tensor& x) { return x.select(0, b).select(1, h).to(ct).contiguous(); };
      const auto kf = head(k), vf = head(v);
      const auto kif = img ? head(*k_img) : at::Tensor(), vif = img ? head(*v_img) : at::Tensor();
      auto scores = torch::empty({kBlockM, kf.size(0)}, kf.options());
      auto scores_img = img ? torch::empty({kBlockM, kif.size(0)}, kf.options()) : at::Tensor();
      const auto qh = q.select(0, b).select(1, h);            // [Sq, D], strided
      for (int64_t m0 = 0; m0 < Sq; m0 += kBlockM) {
        const int64_t bm = std::min(kBlockM, Sq - m0);
        const auto qs = qh.narrow(0, m0, bm).to(ct).mul(s);
        auto acc = torch::zeros({bm, Dv}, kf.options());
        auto run = [&](auto tag) {
          using T = decltype(tag);
          softmax_branch<T>(qs, kf, vf, scores.narrow(0, 0, bm), acc);
          if (img) softmax_branch<T>(qs, kif, vif, scores_img.narrow(0, 0, bm), acc);
        };
        if (ct == torch::kFloat64) run(double{}); else run(float{});
        out.select(0, b).select(1, h).narrow(0, m0, bm).copy_(acc);  // one rounding to the output dtype
      }
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(wan, CPU, m) { m.impl("attention", &attention_cpu); }

}  // namespace wan
