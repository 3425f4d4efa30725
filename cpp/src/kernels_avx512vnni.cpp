// AVX-512 VNNI path. vpdpbusd multiplies unsigned by signed bytes and accumulates
// into int32 without saturation. We read each database byte as unsigned
// (v XOR 0x80 == v + 128) and subtract 128 * sum(q) once per row result: the one
// correction is a per-query constant computed when the query is prepared.
// Tails use masked loads (masked-out bytes are zero in both operands).
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni only; chosen at run time.
#include <immintrin.h>

#include "persona4rec/kernels.hpp"
#include "prefetch_ahead.hpp"

#ifndef P4R_VNNI_PREFETCH_GROUPS
#define P4R_VNNI_PREFETCH_GROUPS 2
#endif

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
  // Rows two groups ahead are prefetched: the catalog scan reads from DRAM.
  const std::size_t group_bytes = 4 * d;
  const int8_t* end = rows + n_rows * d;
  std::size_t r = 0;
  for (; r + 4 <= n_rows; r += 4) {
    prefetch_group_ahead(rows + r * d, group_bytes, P4R_VNNI_PREFETCH_GROUPS, end);
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
      a0 = _mm512_dpbusd_epi32(
          a0, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, v0 + body), bias), q_tail);
      a1 = _mm512_dpbusd_epi32(
          a1, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, v1 + body), bias), q_tail);
      a2 = _mm512_dpbusd_epi32(
          a2, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, v2 + body), bias), q_tail);
      a3 = _mm512_dpbusd_epi32(
          a3, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, v3 + body), bias), q_tail);
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
      a = _mm512_dpbusd_epi32(
          a, _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, v + body), bias), q_tail);
    out[r] = _mm512_reduce_add_epi32(a) - correction;
  }
}

namespace {

// Sixteen int32 vectors -> one vector of their sixteen horizontal sums, in order: a
// transpose-and-add tree (3 adds per pair level, then 128-bit block shuffles) instead of
// sixteen separate reductions.
inline __m512i sum4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  // Each 128-bit block now holds partial sums [a, b, c, d].
  return _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
}

inline __m512i sum16(const __m512i* x) {
  const __m512i t0 = sum4(x[0], x[1], x[2], x[3]);
  const __m512i t1 = sum4(x[4], x[5], x[6], x[7]);
  const __m512i t2 = sum4(x[8], x[9], x[10], x[11]);
  const __m512i t3 = sum4(x[12], x[13], x[14], x[15]);
  const __m512i v01 =
      _mm512_add_epi32(_mm512_shuffle_i32x4(t0, t1, 0x44), _mm512_shuffle_i32x4(t0, t1, 0xEE));
  const __m512i v23 =
      _mm512_add_epi32(_mm512_shuffle_i32x4(t2, t3, 0x44), _mm512_shuffle_i32x4(t2, t3, 0xEE));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(v01, v23, 0x88),
                          _mm512_shuffle_i32x4(v01, v23, 0xDD));
}

// Four queries x four rows per register tile: sixteen accumulators, each 64-byte step
// loads four rows and four query slices once and issues sixteen vpdpbusd.
void tile4(const QueryCodes* qs, const int8_t* rows, std::size_t n_rows, std::size_t d,
           int32_t* out, std::size_t stride) {
  const int8_t* q0 = qs[0].codes;
  const int8_t* q1 = qs[1].codes;
  const int8_t* q2 = qs[2].codes;
  const int8_t* q3 = qs[3].codes;
  const std::size_t body = d & ~std::size_t(63);
  const std::size_t rest = d - body;
  const __mmask64 tail_mask = rest ? (~0ULL >> (64 - rest)) : 0;
  const __m512i bias = _mm512_set1_epi8(char(0x80));
  alignas(64) int32_t corr[16];
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < 4; ++r) corr[i * 4 + r] = int32_t(128 * qs[i].code_sum);
  const __m512i correction = _mm512_load_si512(corr);
  const std::size_t group_bytes = 4 * d;
  const int8_t* end = rows + n_rows * d;
  std::size_t r = 0;
  for (; r + 4 <= n_rows; r += 4) {
    prefetch_group_ahead(rows + r * d, group_bytes, P4R_VNNI_PREFETCH_GROUPS, end);
    const int8_t* v0 = rows + (r + 0) * d;
    const int8_t* v1 = rows + (r + 1) * d;
    const int8_t* v2 = rows + (r + 2) * d;
    const int8_t* v3 = rows + (r + 3) * d;
    __m512i acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_si512();
    auto step = [&](__m512i x0, __m512i x1, __m512i x2, __m512i x3, __m512i a, __m512i b, __m512i c,
                    __m512i e) {
      acc[0] = _mm512_dpbusd_epi32(acc[0], x0, a);
      acc[1] = _mm512_dpbusd_epi32(acc[1], x1, a);
      acc[2] = _mm512_dpbusd_epi32(acc[2], x2, a);
      acc[3] = _mm512_dpbusd_epi32(acc[3], x3, a);
      acc[4] = _mm512_dpbusd_epi32(acc[4], x0, b);
      acc[5] = _mm512_dpbusd_epi32(acc[5], x1, b);
      acc[6] = _mm512_dpbusd_epi32(acc[6], x2, b);
      acc[7] = _mm512_dpbusd_epi32(acc[7], x3, b);
      acc[8] = _mm512_dpbusd_epi32(acc[8], x0, c);
      acc[9] = _mm512_dpbusd_epi32(acc[9], x1, c);
      acc[10] = _mm512_dpbusd_epi32(acc[10], x2, c);
      acc[11] = _mm512_dpbusd_epi32(acc[11], x3, c);
      acc[12] = _mm512_dpbusd_epi32(acc[12], x0, e);
      acc[13] = _mm512_dpbusd_epi32(acc[13], x1, e);
      acc[14] = _mm512_dpbusd_epi32(acc[14], x2, e);
      acc[15] = _mm512_dpbusd_epi32(acc[15], x3, e);
    };
    for (std::size_t j = 0; j < body; j += 64) {
      step(_mm512_xor_si512(_mm512_loadu_si512(v0 + j), bias),
           _mm512_xor_si512(_mm512_loadu_si512(v1 + j), bias),
           _mm512_xor_si512(_mm512_loadu_si512(v2 + j), bias),
           _mm512_xor_si512(_mm512_loadu_si512(v3 + j), bias), _mm512_loadu_si512(q0 + j),
           _mm512_loadu_si512(q1 + j), _mm512_loadu_si512(q2 + j), _mm512_loadu_si512(q3 + j));
    }
    if (rest) {
      // Masked-out bytes are zero in the queries, so the bias there adds nothing.
      step(_mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, v0 + body), bias),
           _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, v1 + body), bias),
           _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, v2 + body), bias),
           _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail_mask, v3 + body), bias),
           _mm512_maskz_loadu_epi8(tail_mask, q0 + body),
           _mm512_maskz_loadu_epi8(tail_mask, q1 + body),
           _mm512_maskz_loadu_epi8(tail_mask, q2 + body),
           _mm512_maskz_loadu_epi8(tail_mask, q3 + body));
    }
    alignas(64) int32_t sums[16];
    _mm512_store_si512(sums, _mm512_sub_epi32(sum16(acc), correction));
    for (int i = 0; i < 4; ++i)
      for (int k = 0; k < 4; ++k)
        out[std::size_t(i) * stride + r + std::size_t(k)] = sums[i * 4 + k];
  }
  if (r < n_rows)
    for (int i = 0; i < 4; ++i)
      dot_rows_avx512vnni(qs[i], rows + r * d, n_rows - r, d, out + std::size_t(i) * stride + r);
}

}  // namespace

void dot_tile_avx512vnni(const QueryCodes* qs, std::size_t n_queries, const int8_t* rows,
                         std::size_t n_rows, std::size_t d, int32_t* out, std::size_t out_stride) {
  std::size_t i = 0;
  for (; i + 4 <= n_queries; i += 4)
    tile4(qs + i, rows, n_rows, d, out + i * out_stride, out_stride);
  for (; i < n_queries; ++i) dot_rows_avx512vnni(qs[i], rows, n_rows, d, out + i * out_stride);
}

}  // namespace persona4rec
