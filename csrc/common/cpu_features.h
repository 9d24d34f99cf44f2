// x86 CPU features the C++ CPU kernels dispatch on, read once per process. The extension is compiled for the
// x86-64 baseline; the AVX512 code paths are functions marked WAN_TARGET_AVX512(_BF16), called only when these
// return true (libgcc's __builtin_cpu_supports also checks that the OS saves the zmm state).
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#define WAN_X86_AVX512 1
#define WAN_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define WAN_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
// GCC 12's avx512 reductions start from _mm512_undefined_ps(), a self-initialised variable that
// -W(maybe-)uninitialized reports inside the header (a known false positive of that header)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#else
#define WAN_X86_AVX512 0
#endif

namespace wan {

#if WAN_X86_AVX512
// Lanes of a 16-wide fp32 vector that hold elements when `remaining` are left (all, some, or none)
inline __mmask16 tail_lanes(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xFFFF)
                         : remaining <= 0 ? static_cast<__mmask16>(0)
                                          : static_cast<__mmask16>((1u << remaining) - 1);
}
#endif

inline bool cpu_has_avx512() {  // F + BW + VL + DQ (Skylake-SP, Zen 4 and later)
#if WAN_X86_AVX512
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return has;
#else
  return false;
#endif
}

inline bool cpu_has_avx512_bf16() {  // + vdpbf16ps / vcvtne2ps2bf16 (Cooper Lake, Sapphire Rapids, Zen 4)
#if WAN_X86_AVX512
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

}  // namespace wan
