// Helpers for benchmarks only (never on a query path).
#pragma once
#include <cstddef>
#include <cstdint>

namespace persona4rec {

// A plain streaming read of `n_bytes` (the memory-bandwidth floor the scans are compared
// with); returns a value derived from every word so the read cannot be optimised away.
uint64_t stream_read(const void* data, std::size_t n_bytes);

}  // namespace persona4rec
