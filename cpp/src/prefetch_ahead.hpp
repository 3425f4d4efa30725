// The row kernels' software prefetch, shared by the ISA files. `static inline` on
// purpose: each kernel file compiles its own copy with its own target flags, so no
// ISA-specific code can be merged into another file by the linker.
#pragma once
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

namespace persona4rec {

// Prefetch the group of `group_bytes` that starts `groups_ahead` groups after `current`,
// stopping at `end`: the catalog scan reads from DRAM, and the hardware prefetcher alone
// leaves part of the bandwidth unused.
static inline void prefetch_group_ahead(const int8_t* current, std::size_t group_bytes,
                                        std::size_t groups_ahead, const int8_t* end) {
  const int8_t* ahead = current + groups_ahead * group_bytes;
  for (std::size_t off = 0; off < group_bytes && ahead + off < end; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
}

}  // namespace persona4rec
