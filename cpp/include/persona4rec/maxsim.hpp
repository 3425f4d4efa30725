// Grouped (multi-persona) max-sim over int8 persona vectors in a CSR layout.
//
// Item i owns the persona rows offsets[i] .. offsets[i+1]-1 of `codes` (n_personas x d).
// score(item) = max_p  (float(dot(q, v_p)) * q_scale) * scale_p, with the winning
// persona row returned beside it. An item with no personas is never returned.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "persona4rec/kernels.hpp"

namespace persona4rec {

struct PersonaMatrix {
  const int8_t* codes = nullptr;     // n_personas x d, row-major
  const float* scales = nullptr;     // n_personas
  const int64_t* offsets = nullptr;  // n_items + 1
  std::size_t n_items = 0;
  std::size_t n_personas = 0;
  std::size_t d = 0;
  std::size_t max_group = 0;  // largest number of personas of one item
};

// Checks offsets: starts at 0, non-decreasing, ends at n_personas. Returns an empty
// string when valid, else a message naming the first problem. Fills max_group.
std::string validate_offsets(PersonaMatrix& m);

// A batch of prepared queries: codes (n_queries x d) and scales.
struct QueryBatch {
  const int8_t* codes = nullptr;
  const float* scales = nullptr;
  std::vector<int64_t> code_sums;
  std::size_t n = 0;
};

// Per-query item lists in CSR form (list_offsets has n_queries + 1 entries).
struct ItemLists {
  const int64_t* offsets = nullptr;
  const int64_t* items = nullptr;
  bool present() const { return offsets != nullptr; }
};

enum class ListMode { none, allow, deny };

// Score the given candidate items for one query (the rerank path): touches only the
// candidates' rows. Outputs have n_candidates entries; an item with no personas gets
// -infinity and persona -1. Candidate indices must be validated by the caller.
void score_candidates(const PersonaMatrix& m, DotRowsFn dot, const int8_t* q_codes, float q_scale,
                      int64_t q_code_sum, const int64_t* candidates, std::size_t n_candidates,
                      float* out_scores, int64_t* out_persona);

// Exact top-k over the catalog for every query, fused: block scan, per-item max and a
// bounded heap, so no full score array exists. Rows of the outputs (n_queries x k) are
// best first; when fewer than k items are eligible, the tail is item -1, persona -1,
// score -infinity. `exclude_mask` (n_items bytes, nonzero = never return) may be null.
// `tile` scores a batch's queries together against each block (several queries per
// register tile); `dot` serves single queries and allow-lists.
void topk_catalog(const PersonaMatrix& m, DotRowsFn dot, DotTileFn tile, const QueryBatch& queries,
                  std::size_t k, ListMode mode, const ItemLists& lists, const uint8_t* exclude_mask,
                  std::size_t n_threads, int64_t* out_items, float* out_scores,
                  int64_t* out_persona);

// Queries quantized for scoring, owning their storage; `batch` points into it.
struct PreparedQueries {
  std::vector<int8_t> codes;
  std::vector<float> scales;
  QueryBatch batch;
};

enum class QueryProblem { none, not_finite, too_large };

// Quantizes n float queries of dimension d (row-major) and computes each one's VNNI
// correction term. Refuses NaN or infinity, and magnitudes above kMaxQueryAbs (scores would
// overflow float32); `bad_row` names the first offending query.
constexpr float kMaxQueryAbs = 1e15f;
QueryProblem prepare_queries(const float* x, std::size_t n, std::size_t d, PreparedQueries& out,
                             std::size_t& bad_row);

// Checks lists in CSR form (per-query item lists, or strings over a byte array): n_lists + 1
// offsets starting at 0, non-decreasing,
// ending at n_entries. Returns an empty string when valid, else what is wrong.
std::string validate_lists(const int64_t* offsets, std::size_t n_lists, int64_t n_entries);

// Rerank for a batch: query i scores its own candidates items[offsets[i]:offsets[i+1]],
// queries split across n_threads. Outputs are aligned with `items`.
void score_candidates_batch(const PersonaMatrix& m, DotRowsFn dot, const PreparedQueries& q,
                            const int64_t* offsets, const int64_t* items, std::size_t n_threads,
                            float* out_scores, int64_t* out_persona);

}  // namespace persona4rec
