// Host test of the per-token qk_norm_rope kernel against a double-precision evaluation.
#include <cmath>
#include <vector>

#include "qk_norm_rope/qk_norm_rope.h"
#include "tests/check.h"

int main() {
  const int64_t H = 3, D = 8, C = H * D;
  std::vector<float> x(C), w(C), cs(D / 2), sn(D / 2), out(C);
  for (int64_t c = 0; c < C; ++c) {
    x[c] = std::sin(0.37 * c + 0.1) * (1 + c % 5);
    w[c] = 0.5f + 0.05f * c;
  }
  for (int64_t i = 0; i < D / 2; ++i) {
    cs[i] = std::cos(0.9 * i + 0.2);
    sn[i] = std::sin(0.9 * i + 0.2);
  }
  const float eps = 1e-6f;
  wan::qk_norm_rope::norm_rope_row(x.data(), w.data(), cs.data(), sn.data(), C, D, eps, out.data());
  double ss = 0;
  for (auto v : x) ss += double(v) * v;
  const double r = 1.0 / std::sqrt(ss / C + eps);
  double max_err = 0;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < D / 2; ++i) {
      const int64_t c = h * D + 2 * i;
      const double a = x[c] * r * w[c], b = x[c + 1] * r * w[c + 1];
      max_err = std::fmax(max_err, std::fabs(out[c] - (a * cs[i] - b * sn[i])));
      max_err = std::fmax(max_err, std::fabs(out[c + 1] - (a * sn[i] + b * cs[i])));
    }
  // fp32 evaluation of O(1) values: a few ulps.
  WAN_CHECK(max_err < 1e-5, "max error %g vs double", max_err);
  // The norm is across heads: scaling one head's channels changes every head's output.
  std::vector<float> x2 = x, out2(C);
  for (int64_t c = 0; c < D; ++c) x2[c] *= 3.0f;
  wan::qk_norm_rope::norm_rope_row(x2.data(), w.data(), cs.data(), sn.data(), C, D, eps, out2.data());
  WAN_CHECK(std::fabs(out2[C - 1] - out[C - 1]) > 1e-3, "norm spans all heads");
  return report("test_qk_norm_rope_host");
}
