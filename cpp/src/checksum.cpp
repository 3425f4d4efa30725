#include "persona4rec/checksum.hpp"

#include <cstring>

namespace persona4rec {

namespace {

constexpr uint64_t kP1 = 0x9E3779B185EBCA87ULL;  // xxHash64's primes (odd)
constexpr uint64_t kP2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t kP3 = 0x165667B19E3779F9ULL;
constexpr uint64_t kPrimeV1 = 0x9E3779B97F4A7C15ULL;

inline uint64_t rotl(uint64_t x, int r) {
  return (x << r) | (x >> (64 - r));
}

inline uint64_t mix(uint64_t x) {
  // splitmix64 finaliser: a bijection on 64-bit words.
  x ^= x >> 30;
  x *= 0xBF58476D1CE4E5B9ULL;
  x ^= x >> 27;
  x *= 0x94D049BB133111EBULL;
  x ^= x >> 31;
  return x;
}

inline uint64_t load64(const unsigned char* p) {
  uint64_t w;
  std::memcpy(&w, p, 8);
  return w;
}

// xxHash64's round. A cheaper round with one multiplication (no multiplication of the
// lane) runs twice as fast but lets two flips cancel: additions and rotations carry an
// additive difference through unchanged, so bit j of one word and bit j-2 of the word
// two rounds later cancel for some data (measured before this choice).
inline uint64_t round64(uint64_t acc, uint64_t w) {
  return rotl(acc + w * kP2, 31) * kP1;
}

}  // namespace

uint64_t checksum64(const void* data, std::size_t n_bytes, uint64_t seed) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint64_t h[8];
  for (int l = 0; l < 8; ++l) h[l] = mix(seed + kP3 * uint64_t(l + 1));
  const std::size_t n_words = n_bytes / 8;
  std::size_t i = 0;
  for (; i + 8 <= n_words; i += 8) {
    const unsigned char* b = p + i * 8;
    h[0] = round64(h[0], load64(b));
    h[1] = round64(h[1], load64(b + 8));
    h[2] = round64(h[2], load64(b + 16));
    h[3] = round64(h[3], load64(b + 24));
    h[4] = round64(h[4], load64(b + 32));
    h[5] = round64(h[5], load64(b + 40));
    h[6] = round64(h[6], load64(b + 48));
    h[7] = round64(h[7], load64(b + 56));
  }
  for (int l = 0; i < n_words; ++i, ++l) h[l] = round64(h[l], load64(p + i * 8));
  uint64_t tail = 0;
  std::memcpy(&tail, p + n_words * 8, n_bytes - n_words * 8);
  // Length and tail enter the chain too, so truncation and extension change the sum.
  uint64_t out = mix(uint64_t(n_bytes) ^ kP3) ^ mix(tail + kP2);
  for (int l = 0; l < 8; ++l) out = mix(out ^ h[l]) + uint64_t(l);
  return out;
}

uint64_t checksum64_v1(const void* data, std::size_t n_bytes, uint64_t seed) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint64_t h[8];
  for (int l = 0; l < 8; ++l) h[l] = mix(seed + uint64_t(l) + 1);
  const std::size_t n_words = n_bytes / 8;
  std::size_t i = 0;
  for (; i + 8 <= n_words; i += 8) {
    uint64_t w[8];
    std::memcpy(w, p + i * 8, 64);
    for (int l = 0; l < 8; ++l) h[l] = (h[l] ^ w[l]) * kPrimeV1;
  }
  for (int l = 0; i < n_words; ++i, ++l) h[l] = (h[l] ^ load64(p + i * 8)) * kPrimeV1;
  uint64_t tail = 0;
  std::memcpy(&tail, p + n_words * 8, n_bytes - n_words * 8);
  uint64_t out = mix(n_bytes ^ kPrimeV1) ^ mix(tail + 0x1234567ULL);
  for (int l = 0; l < 8; ++l) out = mix(out ^ h[l]) + uint64_t(l);
  return out;
}

int64_t find_int8_min(const int8_t* codes, std::size_t n) {
  // Block-wise OR of (byte == 0x80) so the compiler vectorises the common all-clear case.
  constexpr std::size_t kBlock = 4096;
  for (std::size_t a = 0; a < n; a += kBlock) {
    const std::size_t b = a + kBlock < n ? a + kBlock : n;
    unsigned char any = 0;
    for (std::size_t i = a; i < b; ++i) any |= static_cast<unsigned char>(codes[i] == -128);
    if (any)
      for (std::size_t i = a; i < b; ++i)
        if (codes[i] == -128) return int64_t(i);
  }
  return -1;
}

}  // namespace persona4rec
