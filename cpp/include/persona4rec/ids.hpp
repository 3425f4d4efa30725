// Checks on item-id columns that a loader runs before it trusts a file.
#pragma once
#include <cstddef>
#include <cstdint>

namespace persona4rec {

// Strings are data[offsets[i] : offsets[i+1]] (offsets validated by the caller: n + 1
// non-decreasing entries within data). Entries with skip[i] != 0 (may be null) are left
// out. Returns the index of the first string (in index order) equal to an earlier kept
// one, or -1 when all kept strings are distinct.
int64_t find_duplicate_string(const uint8_t* data, const int64_t* offsets, std::size_t n,
                              const uint8_t* skip);

// The same for int64 ids.
int64_t find_duplicate_int(const int64_t* ids, std::size_t n, const uint8_t* skip);

}  // namespace persona4rec
