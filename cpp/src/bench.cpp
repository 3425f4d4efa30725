#include "persona4rec/bench.hpp"

#include <cstring>

namespace persona4rec {

uint64_t stream_read(const void* data, std::size_t n_bytes) {
  const uint64_t* p = static_cast<const uint64_t*>(data);
  const std::size_t n = n_bytes / 8;
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    a0 ^= p[i];
    a1 ^= p[i + 1];
    a2 ^= p[i + 2];
    a3 ^= p[i + 3];
    a4 ^= p[i + 4];
    a5 ^= p[i + 5];
    a6 ^= p[i + 6];
    a7 ^= p[i + 7];
  }
  for (; i < n; ++i) a0 ^= p[i];
  uint64_t tail = 0;
  std::memcpy(&tail, static_cast<const char*>(data) + n * 8, n_bytes - n * 8);
  return a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7 ^ tail;
}

}  // namespace persona4rec
