// The CPU kernels' instruction set, chosen once per process, and the AVX2 building blocks they share: Philox on
// 8 lanes (attention dropout, gen_head's Gumbel noise) and the 4 x 8 transpose that puts its words in column
// order. Functions marked ELECTRA_EXT_AVX2_FUNCTION may only run where use_avx2() is true.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/philox.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define ELECTRA_EXT_CPU_AVX2 1
#include <immintrin.h>
#define ELECTRA_EXT_AVX2_FUNCTION __attribute__((target("avx2,fma")))
#else
#define ELECTRA_EXT_CPU_AVX2 0
#endif

namespace electra_ext::cpu_isa {

// Whether the CPU has AVX2 and FMA; ELECTRA_EXT_CPU_ISA=baseline says no (for tests), =auto or unset asks the CPU,
// any other value is an error (a misspelt "baseline" ran the AVX2 build in tests of the baseline one). Fixed for
// the process, so results never depend on which build ran before.
inline bool use_avx2() {
#if ELECTRA_EXT_CPU_AVX2
  static const bool available = [] {
    const char* isa = std::getenv("ELECTRA_EXT_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
    if (isa != nullptr && *isa != '\0' && std::strcmp(isa, "auto") != 0) {
      throw std::invalid_argument(std::string("ELECTRA_EXT_CPU_ISA must be baseline or auto, got '") + isa + "'");
    }
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return available;
#else
  return false;
#endif
}

#if ELECTRA_EXT_CPU_AVX2

// Philox4x32-10 on 8 counters at once, one per 32-bit lane: lane by lane the words of philox::philox4x32_10.
// _mm256_mul_epu32 multiplies the even 32-bit lanes into 64-bit products, so one 8-lane multiply-high-low takes
// two of them: ~200 vector instructions per 8 calls against ~60 scalar ones per call.
ELECTRA_EXT_AVX2_FUNCTION inline void multiply_high_low8(__m256i multiplier, __m256i x, __m256i& high,
                                                         __m256i& low) {
  const __m256i even = _mm256_mul_epu32(x, multiplier);                        // lanes 0, 2, 4, 6: [low, high]
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), multiplier);  // lanes 1, 3, 5, 7
  low = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  high = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// counter[0..3] in, the 4 output words out (in place), key (k0, k1) the same for every lane.
ELECTRA_EXT_AVX2_FUNCTION inline void philox4x32_10_lanes8(__m256i (&c)[4], uint32_t k0, uint32_t k1) {
  const __m256i multiplier0 = _mm256_set1_epi32(static_cast<int>(philox::kMultiplier0));
  const __m256i multiplier1 = _mm256_set1_epi32(static_cast<int>(philox::kMultiplier1));
  for (int round = 0; round < philox::kRounds; ++round) {
    __m256i high0, low0, high1, low1;
    multiply_high_low8(multiplier0, c[0], high0, low0);
    multiply_high_low8(multiplier1, c[2], high1, low1);
    c[0] = _mm256_xor_si256(_mm256_xor_si256(high1, c[1]), _mm256_set1_epi32(static_cast<int>(k0)));
    c[2] = _mm256_xor_si256(_mm256_xor_si256(high0, c[3]), _mm256_set1_epi32(static_cast<int>(k1)));
    c[1] = low1;
    c[3] = low0;
    k0 += philox::kWeyl0;
    k1 += philox::kWeyl1;
  }
}

// The counters of 8 consecutive Philox calls along a row (gen_head: column groups of 4 columns, attention dropout:
// chunks of 16; common/philox.h): c0 = first_group + lane, c1..c3 the same for every lane.
ELECTRA_EXT_AVX2_FUNCTION inline void column_group_counters(__m256i (&c)[4], uint32_t first_group, uint32_t c1,
                                                            uint32_t c2, uint32_t c3) {
  c[0] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first_group)),
                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  c[1] = _mm256_set1_epi32(static_cast<int>(c1));
  c[2] = _mm256_set1_epi32(static_cast<int>(c2));
  c[3] = _mm256_set1_epi32(static_cast<int>(c3));
}

// values[w] lane g belongs to column 4 g + w (word w of column group g): stores the first `count` of the 32
// columns in order to out[0, count).
ELECTRA_EXT_AVX2_FUNCTION inline void store_column_groups(const __m256 (&values)[4], float* out, int64_t count) {
  const __m256 t0 = _mm256_unpacklo_ps(values[0], values[1]), t1 = _mm256_unpackhi_ps(values[0], values[1]);
  const __m256 t2 = _mm256_unpacklo_ps(values[2], values[3]), t3 = _mm256_unpackhi_ps(values[2], values[3]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  // u0 = groups 0 and 4, u1 = 1 and 5, u2 = 2 and 6, u3 = 3 and 7 (one group per 128-bit half).
  const __m256 ordered[4] = {_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u2, u3, 0x20),
                             _mm256_permute2f128_ps(u0, u1, 0x31), _mm256_permute2f128_ps(u2, u3, 0x31)};
  if (count >= 32) {
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + 8 * v, ordered[v]);
  } else {
    float tail[32];
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(tail + 8 * v, ordered[v]);
    std::copy(tail, tail + count, out);
  }
}

#endif

}  // namespace electra_ext::cpu_isa
