// A fast 64-bit checksum for index files: detects any change to a single 8-byte word
// (so every single bit flip) with certainty, at close to memory bandwidth.
//
// Eight lanes each run h = (h ^ word) * P (P odd, so every step is a bijection of h and
// a changed lane stays changed); lanes are combined with a bijective mixer. Not a
// cryptographic hash: it guards against corruption, not against an adversary.
#pragma once
#include <cstddef>
#include <cstdint>

namespace persona4rec {

uint64_t checksum64(const void* data, std::size_t n_bytes, uint64_t seed = 0);

}  // namespace persona4rec
