// Host tests of csrc/nvfp4/nvfp4_numerics.h against hand-computed values of the E2M1/E4M3 formats
// and the 128x4 scale layout (REFERENCE.md §5).
#include <cmath>
#include <set>
#include <vector>

#include "nvfp4/nvfp4_numerics.h"
#include "tests/check.h"

using namespace wan::nvfp4;

static void test_e2m1() {
  const float grid[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
  for (int c = 0; c < 8; ++c) {
    WAN_CHECK(e2m1_encode(grid[c]) == c, "grid value %g -> %d", grid[c], e2m1_encode(grid[c]));
    WAN_CHECK(e2m1_decode(static_cast<uint8_t>(c)) == grid[c], "decode %d", c);
    WAN_CHECK(e2m1_decode(static_cast<uint8_t>(c | 8)) == -grid[c], "decode -%d", c);
  }
  // Midpoints: ties go to the even code.
  struct Tie { float v; uint8_t code; } ties[] = {{0.25f, 0}, {0.75f, 2}, {1.25f, 2}, {1.75f, 4},
                                                  {2.5f, 4}, {3.5f, 6}, {5.0f, 6}};
  for (auto t : ties) {
    WAN_CHECK(e2m1_encode(t.v) == t.code, "tie %g -> %d, want %d", t.v, e2m1_encode(t.v), t.code);
    WAN_CHECK(e2m1_encode(-t.v) == (t.code | 8), "tie -%g", t.v);
  }
  // Just off a tie goes to the nearer neighbour, whichever is even.
  struct Off { float v; uint8_t below, above; } offs[] = {{0.25f, 0, 1}, {0.75f, 1, 2}, {1.25f, 2, 3},
                                                          {1.75f, 3, 4}, {2.5f, 4, 5}, {3.5f, 5, 6}, {5.0f, 6, 7}};
  for (auto o : offs) {
    WAN_CHECK(e2m1_encode(std::nextafter(o.v, 0.f)) == o.below, "just below %g", o.v);
    WAN_CHECK(e2m1_encode(std::nextafter(o.v, 10.f)) == o.above, "just above %g", o.v);
  }
  WAN_CHECK(e2m1_encode(std::nextafter(0.25f, 1.f)) == 1, "just above 0.25");
  WAN_CHECK(e2m1_encode(std::nextafter(5.0f, 10.f)) == 7, "just above 5");
  WAN_CHECK(e2m1_encode(std::nextafter(0.75f, 0.f)) == 1, "just below 0.75");
  WAN_CHECK(e2m1_encode(7.0f) == 7 && e2m1_encode(1e30f) == 7 && e2m1_encode(INFINITY) == 7, "saturation");
  WAN_CHECK(e2m1_encode(-INFINITY) == 15, "-inf saturates to -6");
  WAN_CHECK(e2m1_encode(NAN) == 0, "NaN -> 0");
  WAN_CHECK(e2m1_encode(-0.1f) == 8, "small negatives keep the sign bit");
}

static void test_e4m3() {
  // Every finite non-negative code round-trips; codes are monotonic in value.
  float prev = -1.f;
  for (int c = 0; c <= 0x7E; ++c) {
    const float v = e4m3_decode(static_cast<uint8_t>(c));
    WAN_CHECK(v > prev, "monotonic at %d", c);
    WAN_CHECK(e4m3_encode_nonneg(v) == c, "round trip code %d (value %g) -> %d", c, v, e4m3_encode_nonneg(v));
    if (c > 0) {
      // The midpoint to the previous code is a tie: it goes to the even code.
      const float mid = 0.5f * (prev + v);
      const int even = (c % 2 == 0) ? c : c - 1;
      WAN_CHECK(e4m3_encode_nonneg(mid) == even, "midpoint below code %d -> %d", c, e4m3_encode_nonneg(mid));
      WAN_CHECK(e4m3_encode_nonneg(std::nextafter(mid, 1e9f)) == c, "above midpoint below code %d", c);
      WAN_CHECK(e4m3_encode_nonneg(std::nextafter(mid, 0.f)) == c - 1, "below midpoint below code %d", c);
    }
    prev = v;
  }
  WAN_CHECK(e4m3_decode(0x7E) == 448.f, "max is 448");
  WAN_CHECK(e4m3_decode(0x01) == std::ldexp(1.f, -9), "smallest subnormal is 2^-9");
  WAN_CHECK(e4m3_decode(0x08) == std::ldexp(1.f, -6), "smallest normal is 2^-6");
  WAN_CHECK(e4m3_decode(0x38) == 1.f, "0x38 is 1.0");
  WAN_CHECK(std::isnan(e4m3_decode(0x7F)), "0x7F is NaN");
  WAN_CHECK(e4m3_encode_nonneg(1000.f) == 0x7E && e4m3_encode_nonneg(INFINITY) == 0x7E, "saturates at 448");
  WAN_CHECK(e4m3_encode_nonneg(std::ldexp(1.f, -11)) == 0, "2^-11 rounds to 0");
  WAN_CHECK(e4m3_encode_nonneg(std::ldexp(1.f, -10)) == 0, "2^-10 is a tie between 0 and 2^-9: even = 0");
  WAN_CHECK(e4m3_encode_nonneg(std::ldexp(3.f, -10)) == 2, "1.5 * 2^-9 ties to code 2");
}

static void test_swizzle() {
  // Known positions of the 128x4 atom (REFERENCE.md §5 formula).
  WAN_CHECK(swizzled_offset(0, 0, 4) == 0, "(0,0)");
  WAN_CHECK(swizzled_offset(0, 1, 4) == 1, "(0,1)");
  WAN_CHECK(swizzled_offset(1, 0, 4) == 16, "(1,0)");
  WAN_CHECK(swizzled_offset(32, 0, 4) == 4, "(32,0)");
  WAN_CHECK(swizzled_offset(127, 3, 4) == 31 * 16 + 3 * 4 + 3, "(127,3)");
  WAN_CHECK(swizzled_offset(0, 4, 8) == 512, "(0,4) second atom along K");
  WAN_CHECK(swizzled_offset(128, 0, 8) == 1024, "(128,0) after two K atoms");
  // A bijection onto [0, M' * Ks') for padded shapes.
  const int64_t shapes[][2] = {{1, 1}, {130, 5}, {257, 5}, {128, 32}, {300, 65}};
  for (auto& s : shapes) {
    const int64_t mp = round_up(s[0], 128), kp = round_up(s[1], 4);
    std::vector<int> seen(mp * kp, 0);
    bool ok = true;
    for (int64_t m = 0; m < mp; ++m)
      for (int64_t k = 0; k < kp; ++k) {
        const int64_t o = swizzled_offset(m, k, kp);
        if (o < 0 || o >= mp * kp || seen[o]++) ok = false;
      }
    WAN_CHECK(ok, "bijection for M=%ld Ks=%ld", static_cast<long>(s[0]), static_cast<long>(s[1]));
  }
}

static void test_quantize_block() {
  uint8_t packed[8];
  float zeros[16] = {};
  WAN_CHECK(quantize_block(zeros, 1.0f, packed) == 0, "all-zero block has scale byte 0");
  bool all0 = true;
  for (auto b : packed) all0 &= b == 0;
  WAN_CHECK(all0, "all-zero block has codes 0");
  // global scale 0 (all-zero tensor): scales and codes 0, never NaN.
  float ones[16];
  for (auto& v : ones) v = 1.0f;
  WAN_CHECK(quantize_block(ones, 0.0f, packed) == 0 && packed[0] == 0, "gs = 0 gives zeros");
  WAN_CHECK(quantize_block(ones, NAN, packed) == 0 && packed[0] == 0, "gs = NaN gives zeros");
  // Hand-computed: gs = 1/448 -> block amax 6 gives s = 6/6*448 = 448 -> 0x7E; values x / 1.0.
  float x[16] = {6.f, -6.f, 3.f, 0.5f, 0.25f, 0.75f, 5.f, -5.f, 0.f, 1.f, 2.f, 4.f, 1.5f, -0.f, 2.5f, 3.5f};
  const uint8_t sc = quantize_block(x, 1.0f / 448.0f, packed);
  WAN_CHECK(sc == 0x7E, "scale byte %d", sc);
  const uint8_t want[8] = {0x7 | (0xF << 4), 0x5 | (0x1 << 4), 0x0 | (0x2 << 4), 0x6 | (0xE << 4),
                           0x0 | (0x2 << 4), 0x4 | (0x6 << 4), 0x3 | (0x8 << 4), 0x4 | (0x6 << 4)};
  for (int i = 0; i < 8; ++i) WAN_CHECK(packed[i] == want[i], "byte %d = 0x%02x, want 0x%02x", i, packed[i], want[i]);
  // NaN is ignored by the amax and quantizes to 0; Inf saturates.
  float y[16] = {NAN, 3.f, INFINITY};
  const uint8_t sy = quantize_block(y, 1.0f, packed);
  WAN_CHECK(sy == 0x7E && (packed[0] & 0xF) == 0 && (packed[1] & 0xF) == 7, "inf/nan block");
}

int main() {
  test_e2m1();
  test_e4m3();
  test_swizzle();
  test_quantize_block();
  return report("test_nvfp4_numerics");
}
