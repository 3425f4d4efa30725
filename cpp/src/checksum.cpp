#include "persona4rec/checksum.hpp"

#include <cstring>

namespace persona4rec {

namespace {

constexpr uint64_t kPrime = 0x9E3779B97F4A7C15ULL;  // odd

inline uint64_t mix(uint64_t x) {
  // splitmix64 finaliser: a bijection on 64-bit words.
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBULL;
  x ^= x >> 31;
  return x;
}

}  // namespace

uint64_t checksum64(const void* data, std::size_t n_bytes, uint64_t seed) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint64_t h[8];
  for (int l = 0; l < 8; ++l) h[l] = mix(seed + uint64_t(l) + 1);
  const std::size_t n_words = n_bytes / 8;
  std::size_t i = 0;
  for (; i + 8 <= n_words; i += 8) {
    uint64_t w[8];
    std::memcpy(w, p + i * 8, 64);
    for (int l = 0; l < 8; ++l) h[l] = (h[l] ^ w[l]) * kPrime;
  }
  for (int l = 0; i < n_words; ++i, ++l) {
    uint64_t w;
    std::memcpy(&w, p + i * 8, 8);
    h[l] = (h[l] ^ w) * kPrime;
  }
  uint64_t tail = 0;
  std::memcpy(&tail, p + n_words * 8, n_bytes - n_words * 8);
  // Length and tail go through the combination too, so truncation changes the sum.
  uint64_t out = mix(n_bytes ^ kPrime) ^ mix(tail + 0x1234567ULL);
  // Chain lanes with bijective steps so a change in any one lane changes the result.
  for (int l = 0; l < 8; ++l) out = mix(out ^ h[l]) + uint64_t(l);
  return out;
}

}  // namespace persona4rec
