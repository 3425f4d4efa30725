// Exact int8 dot-product kernels, one implementation per instruction set.
//
// Every kernel computes, for each of `n_rows` consecutive rows of `d` int8 codes,
// the exact int32 dot product with the query. Codes lie in [-127, 127], so every
// path (including the unsigned/signed tricks of AVX2 and VNNI) is exact and all
// paths return bit-identical results.
#pragma once
#include <cstddef>
#include <cstdint>

namespace persona4rec {

// A query prepared once per request: its codes and the per-query constant that the
// VNNI path needs (it reads the database as unsigned, v + 128, and subtracts
// 128 * sum(q) once per row result).
struct QueryCodes {
  const int8_t* codes;
  int64_t code_sum;
};

using DotRowsFn = void (*)(const QueryCodes& q, const int8_t* rows, std::size_t n_rows,
                           std::size_t d, int32_t* out);

// Several queries against the same rows (the batch scan): out[i * out_stride + r] is the
// dot of query i with row r. SIMD paths tile queries x rows in registers, so each loaded
// row serves several queries and each query load several rows, and they finish a whole
// tile's horizontal sums together; results are bit-identical to DotRowsFn per query.
using DotTileFn = void (*)(const QueryCodes* qs, std::size_t n_queries, const int8_t* rows,
                           std::size_t n_rows, std::size_t d, int32_t* out, std::size_t out_stride);

void dot_rows_scalar(const QueryCodes& q, const int8_t* rows, std::size_t n_rows, std::size_t d,
                     int32_t* out);
void dot_tile_scalar(const QueryCodes* qs, std::size_t n_queries, const int8_t* rows,
                     std::size_t n_rows, std::size_t d, int32_t* out, std::size_t out_stride);
#if defined(P4R_HAVE_X86)
void dot_rows_avx2(const QueryCodes& q, const int8_t* rows, std::size_t n_rows, std::size_t d,
                   int32_t* out);
void dot_rows_avx512vnni(const QueryCodes& q, const int8_t* rows, std::size_t n_rows, std::size_t d,
                         int32_t* out);
void dot_tile_avx2(const QueryCodes* qs, std::size_t n_queries, const int8_t* rows,
                   std::size_t n_rows, std::size_t d, int32_t* out, std::size_t out_stride);
void dot_tile_avx512vnni(const QueryCodes* qs, std::size_t n_queries, const int8_t* rows,
                         std::size_t n_rows, std::size_t d, int32_t* out, std::size_t out_stride);
#endif
#if defined(P4R_HAVE_NEON)
void dot_rows_neon(const QueryCodes& q, const int8_t* rows, std::size_t n_rows, std::size_t d,
                   int32_t* out);
void dot_tile_neon(const QueryCodes* qs, std::size_t n_queries, const int8_t* rows,
                   std::size_t n_rows, std::size_t d, int32_t* out, std::size_t out_stride);
#endif

}  // namespace persona4rec
