#include "persona4rec/quantize.hpp"

#include <cmath>

namespace persona4rec {

int64_t quantize_rows(const float* x, std::size_t n_rows, std::size_t d, int8_t* codes,
                      float* scales) {
  for (std::size_t r = 0; r < n_rows; ++r) {
    const float* row = x + r * d;
    float max_abs = 0.0f;
    bool finite = true;
    for (std::size_t j = 0; j < d; ++j) {
      const float a = std::fabs(row[j]);
      finite &= std::isfinite(a);
      max_abs = a > max_abs ? a : max_abs;
    }
    if (!finite) return int64_t(r);
    int8_t* out = codes + r * d;
    if (max_abs == 0.0f) {
      scales[r] = 0.0f;
      for (std::size_t j = 0; j < d; ++j) out[j] = 0;
      continue;
    }
    const float scale = max_abs / 127.0f;
    const float inv = 127.0f / max_abs;
    scales[r] = scale;
    for (std::size_t j = 0; j < d; ++j) {
      float v = std::nearbyint(row[j] * inv);
      v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
      out[j] = int8_t(v);
    }
  }
  return -1;
}

int64_t code_sum(const int8_t* codes, std::size_t d) {
  int64_t s = 0;
  for (std::size_t j = 0; j < d; ++j) s += codes[j];
  return s;
}

}  // namespace persona4rec
