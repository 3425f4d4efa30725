// AVX2 path. vpmaddubsw multiplies unsigned by signed bytes; with codes in
// [-127, 127] we feed it |q| and v * sign(q), whose pairwise sums stay within
// 2 * 127 * 127 < 32767, so the saturating 16-bit step is exact.
// Compiled with -mavx2 only; chosen at run time. Plain loops and intrinsics only.
#include <immintrin.h>

#include "persona4rec/kernels.hpp"
#include "prefetch_ahead.hpp"

#ifndef P4R_PREFETCH_GROUPS
#define P4R_PREFETCH_GROUPS 2
#endif

namespace persona4rec {

namespace {

// abs_q = |q| is shared by every row, so each row costs one sign, one maddubs, one madd:
// |q| * (v * sign(q)) == q * v, and the pairwise sums stay within 2 * 127 * 127.
inline __m256i madd_step(__m256i acc, __m256i abs_q, __m256i q, __m256i v, __m256i ones16) {
  const __m256i p16 = _mm256_maddubs_epi16(abs_q, _mm256_sign_epi8(v, q));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, ones16));
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

inline int32_t tail_dot(const int8_t* q, const int8_t* v, std::size_t from, std::size_t d) {
  int32_t acc = 0;
  for (std::size_t j = from; j < d; ++j) acc += int32_t(q[j]) * int32_t(v[j]);
  return acc;
}

}  // namespace

void dot_rows_avx2(const QueryCodes& qc, const int8_t* rows, std::size_t n_rows, std::size_t d,
                   int32_t* out) {
  const int8_t* q = qc.codes;
  const std::size_t body = d & ~std::size_t(31);
  const __m256i ones16 = _mm256_set1_epi16(1);
  std::size_t r = 0;
  // Rows ahead of the current group are prefetched: the fused catalog scan reads from
  // DRAM, and the hardware prefetcher alone leaves about a third of the bandwidth unused.
  const std::size_t group_bytes = 4 * d;
  const int8_t* end = rows + n_rows * d;
  // Four rows at a time share each query load and give four independent chains.
  for (; r + 4 <= n_rows; r += 4) {
    prefetch_group_ahead(rows + r * d, group_bytes, P4R_PREFETCH_GROUPS, end);
    const int8_t* v0 = rows + (r + 0) * d;
    const int8_t* v1 = rows + (r + 1) * d;
    const int8_t* v2 = rows + (r + 2) * d;
    const int8_t* v3 = rows + (r + 3) * d;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (std::size_t j = 0; j < body; j += 32) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j));
      const __m256i aq = _mm256_abs_epi8(qv);
      a0 = madd_step(a0, aq, qv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + j)),
                     ones16);
      a1 = madd_step(a1, aq, qv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + j)),
                     ones16);
      a2 = madd_step(a2, aq, qv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v2 + j)),
                     ones16);
      a3 = madd_step(a3, aq, qv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v3 + j)),
                     ones16);
    }
    out[r + 0] = hsum(a0) + tail_dot(q, v0, body, d);
    out[r + 1] = hsum(a1) + tail_dot(q, v1, body, d);
    out[r + 2] = hsum(a2) + tail_dot(q, v2, body, d);
    out[r + 3] = hsum(a3) + tail_dot(q, v3, body, d);
  }
  for (; r < n_rows; ++r) {
    const int8_t* v = rows + r * d;
    __m256i a = _mm256_setzero_si256();
    for (std::size_t j = 0; j < body; j += 32) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j));
      a = madd_step(a, _mm256_abs_epi8(qv), qv,
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j)), ones16);
    }
    out[r] = hsum(a) + tail_dot(q, v, body, d);
  }
}

namespace {

// Four int32 vectors -> their four horizontal sums (one 128-bit vector), together.
inline __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// Two queries x four rows per register tile: each 32-byte step loads four rows and two
// query slices once for eight products.
void tile2(const QueryCodes* qs, const int8_t* rows, std::size_t n_rows, std::size_t d,
           int32_t* out, std::size_t stride) {
  const int8_t* q0 = qs[0].codes;
  const int8_t* q1 = qs[1].codes;
  const std::size_t body = d & ~std::size_t(31);
  const __m256i ones16 = _mm256_set1_epi16(1);
  const std::size_t group_bytes = 4 * d;
  const int8_t* end = rows + n_rows * d;
  std::size_t r = 0;
  for (; r + 4 <= n_rows; r += 4) {
    prefetch_group_ahead(rows + r * d, group_bytes, P4R_PREFETCH_GROUPS, end);
    const int8_t* v0 = rows + (r + 0) * d;
    const int8_t* v1 = rows + (r + 1) * d;
    const int8_t* v2 = rows + (r + 2) * d;
    const int8_t* v3 = rows + (r + 3) * d;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0,
            b3 = a0;
    for (std::size_t j = 0; j < body; j += 32) {
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v0 + j));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v1 + j));
      const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v2 + j));
      const __m256i x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v3 + j));
      const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0 + j));
      const __m256i qb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q1 + j));
      const __m256i aa = _mm256_abs_epi8(qa), ab = _mm256_abs_epi8(qb);
      a0 = madd_step(a0, aa, qa, x0, ones16);
      a1 = madd_step(a1, aa, qa, x1, ones16);
      a2 = madd_step(a2, aa, qa, x2, ones16);
      a3 = madd_step(a3, aa, qa, x3, ones16);
      b0 = madd_step(b0, ab, qb, x0, ones16);
      b1 = madd_step(b1, ab, qb, x1, ones16);
      b2 = madd_step(b2, ab, qb, x2, ones16);
      b3 = madd_step(b3, ab, qb, x3, ones16);
    }
    alignas(16) int32_t sa[4], sb[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(sa), hsum4(a0, a1, a2, a3));
    _mm_store_si128(reinterpret_cast<__m128i*>(sb), hsum4(b0, b1, b2, b3));
    const int8_t* v[4] = {v0, v1, v2, v3};
    for (int k = 0; k < 4; ++k) {
      out[r + std::size_t(k)] = sa[k] + tail_dot(q0, v[k], body, d);
      out[stride + r + std::size_t(k)] = sb[k] + tail_dot(q1, v[k], body, d);
    }
  }
  if (r < n_rows)
    for (int i = 0; i < 2; ++i)
      dot_rows_avx2(qs[i], rows + r * d, n_rows - r, d, out + std::size_t(i) * stride + r);
}

}  // namespace

void dot_tile_avx2(const QueryCodes* qs, std::size_t n_queries, const int8_t* rows,
                   std::size_t n_rows, std::size_t d, int32_t* out, std::size_t out_stride) {
  std::size_t i = 0;
  for (; i + 2 <= n_queries; i += 2)
    tile2(qs + i, rows, n_rows, d, out + i * out_stride, out_stride);
  for (; i < n_queries; ++i) dot_rows_avx2(qs[i], rows, n_rows, d, out + i * out_stride);
}

}  // namespace persona4rec
