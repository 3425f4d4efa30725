// AVX-512 VNNI path. vpdpbusd multiplies unsigned by signed bytes and accumulates
// into int32 without saturation. We read each database byte as unsigned
// (v XOR 0x80 == v + 128) and subtract 128 * sum(q) once per row result: the one
// correction is a per-query constant computed when the query is prepared.
// Tails use masked loads (masked-out bytes are zero in both operands).
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni only; chosen at run time.
#include <immintrin.h>

#include "persona4rec/kernels.hpp"

namespace persona4rec {

void dot_rows_avx512vnni(const QueryCodes& qc, const int8_t* rows, std::size_t n_rows,
                         std::size_t d, int32_t* out) {
  const int8_t* q = qc.codes;
  const std::size_t body = d & ~std::size_t(63);
  const std::size_t rest = d - body;
  const __mmask64 tail_mask = rest ? (~0ULL >> (64 - rest)) : 0;
  const __m512i bias = _mm512_set1_epi8(char(0x80));
  const __m512i q_tail = _mm512_maskz_loadu_epi8(tail_mask, q + body);
  const int32_t correction = int32_t(128 * qc.code_sum);

  // The tail must contribute (v + 128) * q for real bytes and 0 for masked ones:
  // q is zero there, so the bias on masked bytes is harmless.
  std::size_t r = 0;
  for (; r + 4 <= n_rows; r += 4) {
    const int8_t* v0 = rows + (r + 0) * d;
    const int8_t* v1 = rows + (r + 1) * d;
    const int8_t* v2 = rows + (r + 2) * d;
    const int8_t* v3 = rows + (r + 3) * d;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (std::size_t j = 0; j < body; j += 64) {
      const __m512i qv = _mm512_loadu_si512(q + j);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_xor_si512(_mm512_loadu_si512(v0 + j), bias), qv);
      a1 = _mm512_dpbusd_epi32(a1, _mm512_xor_si512(_mm512_loadu_si512(v1 + j), bias), qv);
      a2 = _mm512_dpbusd_epi32(a2, _mm512_xor_si512(_mm512_loadu_si512(v2 + j), bias), qv);
      a3 = _mm512_dpbusd_epi32(a3, _mm512_xor_si512(_mm512_loadu_si512(v3 + j), bias), qv);
    }
    if (rest) {
      a0 = _mm512_dpbusd_epi32(a0, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, v0 + body), bias), q_tail);
      a1 = _mm512_dpbusd_epi32(a1, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, v1 + body), bias), q_tail);
      a2 = _mm512_dpbusd_epi32(a2, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, v2 + body), bias), q_tail);
      a3 = _mm512_dpbusd_epi32(a3, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, v3 + body), bias), q_tail);
    }
    out[r + 0] = _mm512_reduce_add_epi32(a0) - correction;
    out[r + 1] = _mm512_reduce_add_epi32(a1) - correction;
    out[r + 2] = _mm512_reduce_add_epi32(a2) - correction;
    out[r + 3] = _mm512_reduce_add_epi32(a3) - correction;
  }
  for (; r < n_rows; ++r) {
    const int8_t* v = rows + r * d;
    __m512i a = _mm512_setzero_si512();
    for (std::size_t j = 0; j < body; j += 64)
      a = _mm512_dpbusd_epi32(a, _mm512_xor_si512(_mm512_loadu_si512(v + j), bias),
                              _mm512_loadu_si512(q + j));
    if (rest)
      a = _mm512_dpbusd_epi32(a, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, v + body), bias), q_tail);
    out[r] = _mm512_reduce_add_epi32(a) - correction;
  }
}

}  // namespace persona4rec
