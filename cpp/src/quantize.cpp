#include "persona4rec/quantize.hpp"

#include <cmath>
#include <limits>

#if defined(__SSE2__)
#include <emmintrin.h>

namespace {
// SSE2 has no signed-byte max; clamp -128 up to -127 with a compare and a blend.
inline __m128i clamp_to_minus_127(__m128i v) {
  const __m128i floor = _mm_set1_epi8(-127);
  const __m128i below = _mm_cmplt_epi8(v, floor);
  return _mm_or_si128(_mm_and_si128(below, floor), _mm_andnot_si128(below, v));
}
}  // namespace
#endif

namespace persona4rec {

namespace {

// The portable loops: the whole row on targets without SSE2, the tails otherwise.
// Folds |x| of row[from:d] into `m` and clears `finite` on NaN or infinity.
inline void tail_max_abs(const float* row, std::size_t from, std::size_t d, float& m,
                         bool& finite) {
  for (std::size_t j = from; j < d; ++j) {
    const float a = std::fabs(row[j]);
    finite &= std::isfinite(a);
    m = a > m ? a : m;
  }
}

inline void tail_codes(const float* row, std::size_t from, std::size_t d, float inv, int8_t* out) {
  for (std::size_t j = from; j < d; ++j) {
    float v = std::nearbyint(row[j] * inv);
    v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
    out[j] = int8_t(v);
  }
}

// Row statistics and rounding. On x86-64, SSE2 is part of the baseline ISA, so these
// intrinsics need no dispatch.

// max |x| over the row; false if any entry is NaN or infinite.
inline bool row_max_abs(const float* row, std::size_t d, float& out) {
  float m = 0.0f;
  bool finite = true;
  std::size_t j = 0;
#if defined(__SSE2__)
  const __m128 sign = _mm_set1_ps(-0.0f);
  const __m128 inf = _mm_set1_ps(std::numeric_limits<float>::infinity());
  __m128 vmax = _mm_setzero_ps();
  __m128 bad = _mm_setzero_ps();
  for (; j + 4 <= d; j += 4) {
    const __m128 x = _mm_loadu_ps(row + j);
    const __m128 a = _mm_andnot_ps(sign, x);
    bad = _mm_or_ps(bad, _mm_or_ps(_mm_cmpunord_ps(x, x), _mm_cmpeq_ps(a, inf)));
    vmax = _mm_max_ps(vmax, a);
  }
  float lanes[4];
  _mm_storeu_ps(lanes, vmax);
  for (float lane : lanes) m = lane > m ? lane : m;
  finite = _mm_movemask_ps(bad) == 0;
#endif
  tail_max_abs(row, j, d, m, finite);
  out = m;
  return finite;
}

// codes = round_half_even(row * inv); |row * inv| <= 127 (up to rounding) by construction.
inline void row_codes(const float* row, std::size_t d, float inv, int8_t* out) {
  std::size_t j = 0;
#if defined(__SSE2__)
  const __m128 vinv = _mm_set1_ps(inv);
  for (; j + 16 <= d; j += 16) {
    // cvtps rounds half to even in the default rounding mode, like numpy.rint.
    const __m128i a = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(row + j), vinv));
    const __m128i b = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(row + j + 4), vinv));
    const __m128i c = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(row + j + 8), vinv));
    const __m128i e = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(row + j + 12), vinv));
    const __m128i packed = _mm_packs_epi16(_mm_packs_epi32(a, b), _mm_packs_epi32(c, e));
    // Saturation can only produce -128 from inputs below -127.5, which cannot occur; the
    // clamp keeps the [-127, 127] invariant explicit anyway.
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), clamp_to_minus_127(packed));
  }
#endif
  tail_codes(row, j, d, inv, out);
}

}  // namespace

int64_t quantize_rows(const float* x, std::size_t n_rows, std::size_t d, int8_t* codes,
                      float* scales) {
  for (std::size_t r = 0; r < n_rows; ++r) {
    const float* row = x + r * d;
    float max_abs;
    if (!row_max_abs(row, d, max_abs)) return int64_t(r);
    int8_t* out = codes + r * d;
    if (max_abs == 0.0f) {
      scales[r] = 0.0f;
      for (std::size_t j = 0; j < d; ++j) out[j] = 0;
      continue;
    }
    scales[r] = max_abs / 127.0f;
    row_codes(row, d, 127.0f / max_abs, out);
  }
  return -1;
}

int64_t code_sum(const int8_t* codes, std::size_t d) {
  int64_t s = 0;
  for (std::size_t j = 0; j < d; ++j) s += codes[j];
  return s;
}

}  // namespace persona4rec
