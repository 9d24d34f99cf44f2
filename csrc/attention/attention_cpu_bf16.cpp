// bf16 flash attention on AVX512-BF16 CPUs: both matrix products run on vdpbf16ps (bf16 pairs multiplied
// exactly, accumulated in fp32), the softmax in fp32 with a vectorised exp2. ATen's CPU flash kernel has no
// bf16 matrix path on CPUs without AMX and runs at fp32 speed; here Q K^T and P V run at bf16 rate. On AMX
// CPUs ATen's bf16 kernel is faster for one key set; there this kernel serves the I2V calls (two sets summed
// with one rounding, which ATen's bf16 kernel cannot give). Which kernel runs: cpu_attention_bf16_kernel().
//
// Work split: one task = (batch, head, block of 48 query rows); tasks run in parallel (at::parallel_for).
// K and V of every head are repacked once per call into the operand layout of vdpbf16ps (pairs of
// consecutive reduction elements side by side), zero-padded to a multiple of 32 keys:
//   K: [Skv/32 tiles][D/2 pairs][32 keys][2]     Q K^T reduces over the head dim: pairs (d, d+1) of one key
//   V: [Skv/2 pairs][Dv][2]                      P V reduces over keys: keys (j, j+1) of one value column
// A task walks the keys in blocks of 256 with an online softmax (running max m, sum l, rescale alpha):
//   S = Q K^T   8-row x 32-key micro-tiles (16 zmm accumulators, D/2 vdpbf16ps steps)
//   P = exp2(S * scale * log2 e - m), summed in fp32 into l, rounded to bf16 (row-major bf16 P already has
//       the key pairs side by side)
//   O = O * alpha + P V   6-row x 64-column micro-tiles (24 zmm accumulators)
// then O / l. With an image K/V set the second softmax runs the same way into a second buffer and the two
// are added in fp32; the output is rounded to bf16 once.
#include "attention/attention_cpu_bf16.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_features.h"

namespace wan {

const std::string& cpu_attention_bf16_kernel() {
  static const std::string kernel = [] {
    const char* env = std::getenv("WAN_CPU_ATTENTION");
    const std::string choice = env == nullptr ? "auto" : env;
    TORCH_CHECK(choice == "auto" || choice == "aten" || choice == "avx512_bf16" || choice == "aten_amx",
                "WAN_CPU_ATTENTION must be 'auto', 'aten', 'avx512_bf16' or 'aten_amx', got '", choice, "'");
    // ATen's flash kernel runs bf16 on AMX tiles (oneDNN brgemm) exactly where ATen can pack for it
    const bool amx = at::native::cpublas::could_pack(at::kBFloat16);
    TORCH_CHECK(choice != "avx512_bf16" || cpu_has_avx512_bf16(),
                "WAN_CPU_ATTENTION=avx512_bf16, but this CPU has no AVX512-BF16 (or this build no such kernel)");
    TORCH_CHECK(choice != "aten_amx" || (amx && cpu_has_avx512_bf16()),
                "WAN_CPU_ATTENTION=aten_amx, but ATen cannot run bf16 on AMX here (or the CPU lacks AVX512-BF16)");
    if (choice != "auto") return choice;
    return std::string(amx && cpu_has_avx512_bf16() ? "aten_amx" : cpu_has_avx512_bf16() ? "avx512_bf16" : "aten");
  }();
  return kernel;
}

bool attention_bf16_avx512_supports(int64_t head_dim, int64_t value_dim) {
  return head_dim > 0 && head_dim % 2 == 0 && value_dim > 0 && value_dim % 64 == 0;
}

#if WAN_X86_AVX512
namespace {

using bf16_bits = uint16_t;

constexpr int64_t kBlockM = 48;   // query rows per task: a multiple of both micro-tiles' row counts
constexpr int64_t kBlockN = 256;  // keys per online-softmax step
constexpr int64_t kTileN = 32;    // keys per Q K^T micro-tile (two zmm of fp32 scores)
constexpr int64_t kQkRows = 8;    // Q K^T micro-tile rows
constexpr int64_t kPvRows = 6;    // P V micro-tile rows
constexpr int64_t kPvCols = 64;   // P V micro-tile value columns (four zmm)
static_assert(kBlockM % kQkRows == 0 && kBlockM % kPvRows == 0 && kBlockN % kTileN == 0);

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct View4 {  // element (b, s, h, d) of a [B, S, H, D] bf16 tensor, any strides
  const bf16_bits* p;
  int64_t sb, ss, sh, sd;
  explicit View4(const torch::Tensor& t)
      : p(static_cast<const bf16_bits*>(t.data_ptr())),
        sb(t.stride(0)), ss(t.stride(1)), sh(t.stride(2)), sd(t.stride(3)) {}
  const bf16_bits* row(int64_t b, int64_t s, int64_t h) const { return p + b * sb + s * ss + h * sh; }
};

// K of head (b, h) -> [Skv/32][D/2][32][2]; keys >= Skv are zeros (their scores are masked anyway)
void pack_k(const View4& k, int64_t b, int64_t h, int64_t skv, int64_t d, bf16_bits* dst) {
  const int64_t skv_pad = round_up(skv, kTileN);
  for (int64_t j = 0; j < skv_pad; ++j) {
    bf16_bits* o = dst + (j / kTileN) * (d / 2) * kTileN * 2 + (j % kTileN) * 2;
    const bf16_bits* r = j < skv ? k.row(b, j, h) : nullptr;
    for (int64_t p = 0; p < d / 2; ++p) {
      o[p * kTileN * 2] = r ? r[2 * p * k.sd] : 0;
      o[p * kTileN * 2 + 1] = r ? r[(2 * p + 1) * k.sd] : 0;
    }
  }
}

// V of head (b, h) -> [Skv/2][Dv][2]; keys >= Skv are zeros (their probabilities are zeros too)
void pack_v(const View4& v, int64_t b, int64_t h, int64_t skv, int64_t dv, bf16_bits* dst) {
  const int64_t pairs = round_up(skv, kTileN) / 2;
  for (int64_t q = 0; q < pairs; ++q) {
    const bf16_bits* r0 = 2 * q < skv ? v.row(b, 2 * q, h) : nullptr;
    const bf16_bits* r1 = 2 * q + 1 < skv ? v.row(b, 2 * q + 1, h) : nullptr;
    bf16_bits* o = dst + q * dv * 2;
    for (int64_t c = 0; c < dv; ++c) {
      o[2 * c] = r0 ? r0[c * v.sd] : 0;
      o[2 * c + 1] = r1 ? r1[c * v.sd] : 0;
    }
  }
}

WAN_TARGET_AVX512_BF16 inline __m512bh broadcast_pair(const bf16_bits* p) {
  int32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return (__m512bh)_mm512_set1_epi32(bits);
}

// s[r][0:32] = sum over pairs p of q[r][2p:2p+2] . kt[p][0:32][:]   (r < kQkRows; q rows are d apart)
WAN_TARGET_AVX512_BF16 void qk_tile(const bf16_bits* q, int64_t d, const bf16_bits* kt, float* s, int64_t lds) {
  __m512 acc[kQkRows][2];
  for (int r = 0; r < kQkRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < d / 2; ++p) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt + p * kTileN * 2);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kt + p * kTileN * 2 + kTileN);
#pragma GCC unroll 8
    for (int r = 0; r < kQkRows; ++r) {
      const __m512bh qp = broadcast_pair(q + r * d + 2 * p);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qp, k0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qp, k1);
    }
  }
  for (int r = 0; r < kQkRows; ++r) {
    _mm512_storeu_ps(s + r * lds, acc[r][0]);
    _mm512_storeu_ps(s + r * lds + 16, acc[r][1]);
  }
}

// o[r][0:64] += sum over key pairs q of p[r][2q:2q+2] . vt[q][0:64][:]   (r < kPvRows; vt rows ldv apart)
WAN_TARGET_AVX512_BF16 void pv_tile(const bf16_bits* p, int64_t ldp, int64_t pairs, const bf16_bits* vt,
                                    int64_t ldv, float* o, int64_t ldo) {
  __m512 acc[kPvRows][4];
  for (int r = 0; r < kPvRows; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_loadu_ps(o + r * ldo + 16 * c);
  for (int64_t q = 0; q < pairs; ++q) {
    const bf16_bits* vq = vt + q * ldv;
    const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vq);
    const __m512bh v1 = (__m512bh)_mm512_loadu_si512(vq + 32);
    const __m512bh v2 = (__m512bh)_mm512_loadu_si512(vq + 64);
    const __m512bh v3 = (__m512bh)_mm512_loadu_si512(vq + 96);
#pragma GCC unroll 6
    for (int r = 0; r < kPvRows; ++r) {
      const __m512bh pp = broadcast_pair(p + r * ldp + 2 * q);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], pp, v0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], pp, v1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], pp, v2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], pp, v3);
    }
  }
  for (int r = 0; r < kPvRows; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + r * ldo + 16 * c, acc[r][c]);
}

// 2^x for x <= 0: 2^round(x) (vscalefps) times a degree-6 Taylor polynomial of 2^f on f in [-1/2, 1/2]
// (truncation error (ln2/2)^7/7! = 1.2e-7 relative: an fp32 ulp; the probabilities are rounded to bf16
// before P V anyway). Below -127 the result is 2^-127-ish, far under any row sum's ulp (the row max is 1).
WAN_TARGET_AVX512_BF16 inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-127.0f), x);  // maxps returns its second operand on NaN: NaN stays NaN
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 y = _mm512_set1_ps(1.5403530393381609e-4f);           // ln2^6 / 6!
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3333558146428443e-3f));  // ln2^5 / 5!
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.6181291076284772e-3f));  // ln2^4 / 4!
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.5504108664821580e-2f));  // ln2^3 / 3!
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.4022650695910071e-1f));  // ln2^2 / 2!
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.9314718055994531e-1f));  // ln2
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

// One row of one key block: t = s * scale * log2(e) over n scores, the first `valid` of them real keys.
// Updates the running max m and sum l, writes p = exp2(t - m) rounded to bf16 (0 for padded keys), and
// returns the factor alpha = exp2(m_old - m_new) by which the row's accumulated output must be rescaled.
WAN_TARGET_AVX512_BF16 float softmax_row(float* s, int64_t n, int64_t valid, float scale_log2e, float& m, float& l,
                                         bf16_bits* p) {
  const __m512 vscale = _mm512_set1_ps(scale_log2e);
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < n; c += 16) {
    const __m512 t = _mm512_mul_ps(_mm512_loadu_ps(s + c), vscale);
    _mm512_storeu_ps(s + c, t);
    vmax = _mm512_mask_max_ps(vmax, tail_lanes(valid - c), vmax, t);
  }
  const float m_new = std::max(m, _mm512_reduce_max_ps(vmax));
  const float alpha = std::exp2(m - m_new);  // 0 on the first block (m = -inf)
  const __m512 vm = _mm512_set1_ps(m_new);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 32) {
    const __m512 p0 = _mm512_maskz_mov_ps(tail_lanes(valid - c), exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s + c), vm)));
    const __m512 p1 =
        _mm512_maskz_mov_ps(tail_lanes(valid - c - 16), exp2_ps(_mm512_sub_ps(_mm512_loadu_ps(s + c + 16), vm)));
    vsum = _mm512_add_ps(vsum, _mm512_add_ps(p0, p1));
    _mm512_storeu_si512(p + c, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));  // low half <- p0 (round to nearest even)
  }
  l = l * alpha + _mm512_reduce_add_ps(vsum);
  m = m_new;
  return alpha;
}

struct Scratch {  // per-thread buffers of one task
  std::vector<float> s, o, m, l;
  std::vector<bf16_bits> p;
  Scratch(int64_t dv) : s(kBlockM * kBlockN), o(kBlockM * dv), m(kBlockM), l(kBlockM), p(kBlockM * kBlockN) {}
};

// o[kBlockM][dv] = softmax(q k^T scale) v for one head's packed K/V (q: kBlockM rows of d, zero-padded)
WAN_TARGET_AVX512_BF16 void attend(const bf16_bits* q, int64_t d, int64_t dv, const bf16_bits* kp,
                                   const bf16_bits* vp, int64_t skv, float scale_log2e, Scratch& w, float* o) {
  std::fill_n(o, kBlockM * dv, 0.0f);
  std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<float>::infinity());
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  const int64_t skv_pad = round_up(skv, kTileN);
  for (int64_t j0 = 0; j0 < skv_pad; j0 += kBlockN) {  // every block holds >= 1 real key: j0 < skv
    const int64_t n = std::min(kBlockN, skv_pad - j0);
    for (int64_t jt = 0; jt < n / kTileN; ++jt) {
      const bf16_bits* kt = kp + (j0 / kTileN + jt) * (d / 2) * kTileN * 2;
      for (int64_t r0 = 0; r0 < kBlockM; r0 += kQkRows)
        qk_tile(q + r0 * d, d, kt, w.s.data() + r0 * kBlockN + jt * kTileN, kBlockN);
    }
    for (int64_t r = 0; r < kBlockM; ++r) {
      const float alpha = softmax_row(w.s.data() + r * kBlockN, n, skv - j0, scale_log2e, w.m[r], w.l[r],
                                      w.p.data() + r * kBlockN);
      if (alpha != 1.0f) {
        float* orow = o + r * dv;
        for (int64_t c = 0; c < dv; ++c) orow[c] *= alpha;
      }
    }
    for (int64_t c0 = 0; c0 < dv; c0 += kPvCols)
      for (int64_t r0 = 0; r0 < kBlockM; r0 += kPvRows)
        pv_tile(w.p.data() + r0 * kBlockN, kBlockN, n / 2, vp + (j0 / 2) * dv * 2 + c0 * 2, dv * 2,
                o + r0 * dv + c0, dv);
  }
  for (int64_t r = 0; r < kBlockM; ++r) {
    const float inv = 1.0f / w.l[r];
    float* orow = o + r * dv;
    for (int64_t c = 0; c < dv; ++c) orow[c] *= inv;
  }
}

// Rounds n (a multiple of 16) fp32 values to bf16, nearest even (the rounding of torch's .to(bfloat16))
WAN_TARGET_AVX512_BF16 void store_bf16(const float* src, int64_t n, bf16_bits* dst) {
  for (int64_t c = 0; c < n; c += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + c)));
}

constexpr int64_t kPackBudget = 64 << 20;  // bytes of packed K/V held at once (then heads go in chunks)

struct PackedKV {  // K and V of heads [bh0, bh1), packed; head bh at k.data() + (bh - bh0) * k_head, same for v
  int64_t skv = 0, k_head = 0, v_head = 0;
  std::vector<bf16_bits> k, v;
  int64_t head_bytes() const { return (k_head + v_head) * static_cast<int64_t>(sizeof(bf16_bits)); }
};

PackedKV packed_shape(const torch::Tensor& k, const torch::Tensor& v) {
  const int64_t skv_pad = round_up(k.size(1), kTileN);
  return {k.size(1), skv_pad * k.size(3), skv_pad * v.size(3), {}, {}};
}

void pack_kv(const torch::Tensor& k, const torch::Tensor& v, int64_t bh0, int64_t bh1, PackedKV& out) {
  const int64_t H = k.size(2), d = k.size(3), dv = v.size(3);
  out.k.resize((bh1 - bh0) * out.k_head);
  out.v.resize((bh1 - bh0) * out.v_head);
  const View4 kv(k), vv(v);
  at::parallel_for(bh0, bh1, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t bh = h0; bh < h1; ++bh) {
      pack_k(kv, bh / H, bh % H, out.skv, d, out.k.data() + (bh - bh0) * out.k_head);
      pack_v(vv, bh / H, bh % H, out.skv, dv, out.v.data() + (bh - bh0) * out.v_head);
    }
  });
}

}  // namespace

torch::Tensor attention_bf16_avx512(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                    const std::optional<torch::Tensor>& k_img,
                                    const std::optional<torch::Tensor>& v_img, double scale) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "attention: the AVX512-BF16 kernel needs a CPU with avx512_bf16");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "attention: the AVX512-BF16 kernel takes bfloat16, got ",
              q.scalar_type());
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), d = q.size(3), dv = v.size(3);
  TORCH_CHECK(attention_bf16_avx512_supports(d, dv), "attention: the AVX512-BF16 kernel needs an even head dim and a ",
              "value dim that is a multiple of 64, got ", d, " and ", dv);
  const bool two = k_img.has_value();
  PackedKV txt = packed_shape(k, v), img = two ? packed_shape(*k_img, *v_img) : PackedKV{};
  auto out = torch::empty({B, S, H, dv}, q.options());
  bf16_bits* outp = static_cast<bf16_bits*>(out.data_ptr());
  const float scale_log2e = static_cast<float>(scale * M_LOG2E);
  const View4 qv(q);
  const int64_t qblocks = (S + kBlockM - 1) / kBlockM;
  // All heads' K/V packed at once when that fits kPackBudget (Wan on CPU: a few MB); long key sets (a 720p
  // video's 75,600 keys: 39 MB per head) go a chunk of heads at a time, each chunk's query blocks in parallel.
  const int64_t chunk = std::clamp(kPackBudget / std::max<int64_t>(1, txt.head_bytes() + img.head_bytes()),
                                   int64_t{1}, std::max<int64_t>(1, B * H));
  for (int64_t bh0 = 0; bh0 < B * H; bh0 += chunk) {
    const int64_t bh1 = std::min(B * H, bh0 + chunk);
    pack_kv(k, v, bh0, bh1, txt);
    if (two) pack_kv(*k_img, *v_img, bh0, bh1, img);
    at::parallel_for(0, (bh1 - bh0) * qblocks, 1, [&](int64_t t0, int64_t t1) {
      Scratch w(dv);
      std::vector<bf16_bits> qbuf(kBlockM * d);
      std::vector<float> o_img(two ? kBlockM * dv : 0);
      for (int64_t t = t0; t < t1; ++t) {  // consecutive tasks share a head: its packed K/V stay in cache
        const int64_t hc = t / qblocks, bh = bh0 + hc, b = bh / H, h = bh % H, i0 = (t % qblocks) * kBlockM;
        const int64_t rows = std::min(kBlockM, S - i0);
        for (int64_t r = 0; r < kBlockM; ++r) {  // rows past S are zeros: a uniform softmax, never stored
          const bf16_bits* src = r < rows ? qv.row(b, i0 + r, h) : nullptr;
          for (int64_t c = 0; c < d; ++c) qbuf[r * d + c] = src ? src[c * qv.sd] : 0;
        }
        attend(qbuf.data(), d, dv, txt.k.data() + hc * txt.k_head, txt.v.data() + hc * txt.v_head, txt.skv,
               scale_log2e, w, w.o.data());
        if (two) {
          attend(qbuf.data(), d, dv, img.k.data() + hc * img.k_head, img.v.data() + hc * img.v_head, img.skv,
                 scale_log2e, w, o_img.data());
          for (int64_t x = 0; x < rows * dv; ++x) w.o[x] += o_img[x];  // the two softmaxes summed in fp32
        }
        for (int64_t r = 0; r < rows; ++r) {
          store_bf16(w.o.data() + r * dv, dv, outp + ((b * S + i0 + r) * H + h) * dv);
        }
      }
    });
  }
  return out;
}

#else  // not x86-64 GCC/Clang: the kernel does not exist, cpu_attention_bf16_kernel() says "aten" (or "aten_amx")

torch::Tensor attention_bf16_avx512(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
                                    const std::optional<torch::Tensor>&, const std::optional<torch::Tensor>&, double) {
  TORCH_CHECK(false, "attention: this build has no AVX512-BF16 kernel (not an x86-64 GCC/Clang build)");
}

#endif

}  // namespace wan
