// Symmetric per-row int8 quantization: code = round(x / scale), scale = max|x| / 127,
// codes in [-127, 127] so that every SIMD path is exact. A zero row gets scale 0.
#pragma once
#include <cstddef>
#include <cstdint>

namespace persona4rec {

// Returns the index of the first row holding a NaN or infinity, or -1 if all finite.
// Rows before that row may already have been written.
int64_t quantize_rows(const float* x, std::size_t n_rows, std::size_t d, int8_t* codes,
                      float* scales);

// Sum of codes (the VNNI correction term).
int64_t code_sum(const int8_t* codes, std::size_t d);

}  // namespace persona4rec
