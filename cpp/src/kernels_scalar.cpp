// The reference path: plain int32 accumulation, compiled for the baseline ISA.
#include "persona4rec/kernels.hpp"

namespace persona4rec {

void dot_rows_scalar(const QueryCodes& q, const int8_t* rows, std::size_t n_rows, std::size_t d,
                     int32_t* out) {
  for (std::size_t r = 0; r < n_rows; ++r) {
    const int8_t* v = rows + r * d;
    int32_t acc = 0;
    for (std::size_t j = 0; j < d; ++j) acc += int32_t(q.codes[j]) * int32_t(v[j]);
    out[r] = acc;
  }
}

void dot_tile_scalar(const QueryCodes* qs, std::size_t n_queries, const int8_t* rows,
                     std::size_t n_rows, std::size_t d, int32_t* out, std::size_t out_stride) {
  for (std::size_t i = 0; i < n_queries; ++i)
    dot_rows_scalar(qs[i], rows, n_rows, d, out + i * out_stride);
}

}  // namespace persona4rec
