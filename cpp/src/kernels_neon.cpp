// ARM NEON path with the dot-product extension (sdot), compiled only on aarch64 with
// -march=armv8.2-a+dotprod and chosen at run time. Not exercised on this project's
// x86 CI; the forced-path tests cover it on an ARM machine.
#include <arm_neon.h>

#include "persona4rec/kernels.hpp"

namespace persona4rec {

void dot_rows_neon(const QueryCodes& qc, const int8_t* rows, std::size_t n_rows, std::size_t d,
                   int32_t* out) {
  const int8_t* q = qc.codes;
  const std::size_t body = d & ~std::size_t(15);
  for (std::size_t r = 0; r < n_rows; ++r) {
    const int8_t* v = rows + r * d;
    int32x4_t acc = vdupq_n_s32(0);
    for (std::size_t j = 0; j < body; j += 16)
      acc = vdotq_s32(acc, vld1q_s8(q + j), vld1q_s8(v + j));
    int32_t s = vaddvq_s32(acc);
    for (std::size_t j = body; j < d; ++j) s += int32_t(q[j]) * int32_t(v[j]);
    out[r] = s;
  }
}

void dot_tile_neon(const QueryCodes* qs, std::size_t n_queries, const int8_t* rows,
                   std::size_t n_rows, std::size_t d, int32_t* out, std::size_t out_stride) {
  for (std::size_t i = 0; i < n_queries; ++i)
    dot_rows_neon(qs[i], rows, n_rows, d, out + i * out_stride);
}

}  // namespace persona4rec
