// 64-bit corruption checksums for index files.
//
// checksum64 (format 2 and later): eight independent lanes, each running xxHash64's
// round  acc = rotl(acc + word * P2, 31) * P1  over every eighth 8-byte word, then a
// bijective chain over the lanes, the length and the tail. Every round is a bijection of
// the lane for a fixed word and of the word for a fixed lane, so any change to a single
// 8-byte word (hence any bit flip) changes the result with certainty; the two
// multiplications and the rotation spread every difference non-linearly, so no pattern
// of a few flips is known to cancel (the format-1 checksum below has one: the top bit of
// two words 64 bytes apart). Not cryptographic: it guards against corruption, not
// against an adversary who can recompute it.
//
// checksum64_v1: the format-1 checksum, kept only to read format-1 files.
#pragma once
#include <cstddef>
#include <cstdint>

namespace persona4rec {

uint64_t checksum64(const void* data, std::size_t n_bytes, uint64_t seed = 0);

uint64_t checksum64_v1(const void* data, std::size_t n_bytes, uint64_t seed = 0);

// Index of the first byte equal to -128 (0x80) in an int8 code array, or -1 if none.
// Codes must lie in [-127, 127]: -128 breaks the exact SIMD paths.
int64_t find_int8_min(const int8_t* codes, std::size_t n);

}  // namespace persona4rec
