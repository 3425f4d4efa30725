#include "persona4rec/maxsim.hpp"

#include <algorithm>
#include <cstring>
#include <exception>
#include <limits>
#include <thread>

#include "persona4rec/parallel.hpp"
#include "persona4rec/quantize.hpp"
#include "persona4rec/topk.hpp"

namespace persona4rec {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Rows scored per kernel call in the catalog scan: a block of about 32 KiB of codes
// stays in L1/L2 while every query of a batch reads it.
constexpr std::size_t kBlockBytes = 32 * 1024;

inline void prefetch_rows(const int8_t* p, std::size_t n_bytes) {
  // Cap the prefetch so one huge item does not flood the memory system.
  const std::size_t cap = n_bytes < 4096 ? n_bytes : 4096;
  for (std::size_t off = 0; off < cap; off += 64) __builtin_prefetch(p + off, 0, 1);
}

// Best persona of one item given its rows' int32 dots.
inline void best_of_group(const int32_t* dots, const float* scales, std::size_t n, float q_scale,
                          float& best, std::size_t& best_j) {
  best = kNegInf;
  best_j = 0;
  for (std::size_t j = 0; j < n; ++j) {
    const float s = (float(dots[j]) * q_scale) * scales[j];
    if (s > best) {
      best = s;
      best_j = j;
    }
  }
}

}  // namespace

std::vector<Scored> TopK::take_sorted() {
  std::vector<Scored> out;
  out.swap(heap_);
  std::sort(out.begin(), out.end(), ranks_before);
  return out;
}

std::string validate_offsets(PersonaMatrix& m) {
  if (m.offsets[0] != 0) return "offsets[0] must be 0 (got " + std::to_string(m.offsets[0]) + ")";
  std::size_t max_group = 0;
  for (std::size_t i = 0; i < m.n_items; ++i) {
    const int64_t a = m.offsets[i], b = m.offsets[i + 1];
    if (b < a)
      return "offsets must be non-decreasing: offsets[" + std::to_string(i + 1) +
             "]=" + std::to_string(b) + " < offsets[" + std::to_string(i) +
             "]=" + std::to_string(a);
    max_group = std::max<std::size_t>(max_group, std::size_t(b - a));
  }
  if (m.offsets[m.n_items] != int64_t(m.n_personas))
    return "offsets[-1] must equal the number of persona vectors (" + std::to_string(m.n_personas) +
           "), got " + std::to_string(m.offsets[m.n_items]);
  m.max_group = max_group;
  return "";
}

void score_candidates(const PersonaMatrix& m, DotRowsFn dot, const int8_t* q_codes, float q_scale,
                      int64_t q_code_sum, const int64_t* candidates, std::size_t n_candidates,
                      float* out_scores, int64_t* out_persona) {
  const QueryCodes q{q_codes, q_code_sum};
  std::vector<int32_t> dots(std::max<std::size_t>(m.max_group, 1));
  const std::size_t d = m.d;
  // Candidates are scattered over the catalog: fetch the next item's rows while scoring
  // this one. One item (about 30 cache lines at d=384, P=5) already fills the line-fill
  // buffers; looking 4 items ahead measured no better on this machine.
  constexpr std::size_t kAhead = 1;
  auto prefetch_item = [&](std::size_t c) {
    const int64_t it = candidates[c];
    prefetch_rows(m.codes + std::size_t(m.offsets[it]) * d,
                  std::size_t(m.offsets[it + 1] - m.offsets[it]) * d);
  };
  for (std::size_t c = 0; c < std::min(kAhead, n_candidates); ++c) prefetch_item(c);
  for (std::size_t c = 0; c < n_candidates; ++c) {
    if (c + kAhead < n_candidates) prefetch_item(c + kAhead);
    const int64_t item = candidates[c];
    const std::size_t p0 = std::size_t(m.offsets[item]);
    const std::size_t n = std::size_t(m.offsets[item + 1]) - p0;
    if (n == 0) {
      out_scores[c] = kNegInf;
      out_persona[c] = -1;
      continue;
    }
    dot(q, m.codes + p0 * d, n, d, dots.data());
    float best;
    std::size_t best_j;
    best_of_group(dots.data(), m.scales + p0, n, q_scale, best, best_j);
    out_scores[c] = best;
    out_persona[c] = int64_t(p0 + best_j);
  }
}

namespace {

void write_row(std::vector<Scored> best, std::size_t k, int64_t* items, float* scores,
               int64_t* persona) {
  for (std::size_t j = 0; j < k; ++j) {
    if (j < best.size()) {
      items[j] = best[j].item;
      scores[j] = best[j].score;
      persona[j] = best[j].persona;
    } else {
      items[j] = -1;
      scores[j] = kNegInf;
      persona[j] = -1;
    }
  }
}

// Top-k among an explicit allow-list: touches only those items.
void topk_allowed(const PersonaMatrix& m, DotRowsFn dot, const QueryBatch& qs, std::size_t qi,
                  std::size_t k, const ItemLists& lists, const uint8_t* exclude_mask,
                  int64_t* out_items, float* out_scores, int64_t* out_persona) {
  std::vector<int64_t> allowed(lists.items + lists.offsets[qi],
                               lists.items + lists.offsets[qi + 1]);
  std::sort(allowed.begin(), allowed.end());
  allowed.erase(std::unique(allowed.begin(), allowed.end()), allowed.end());
  if (exclude_mask != nullptr)
    allowed.erase(std::remove_if(allowed.begin(), allowed.end(),
                                 [&](int64_t i) { return exclude_mask[i] != 0; }),
                  allowed.end());
  std::vector<float> scores(allowed.size());
  std::vector<int64_t> persona(allowed.size());
  score_candidates(m, dot, qs.codes + qi * m.d, qs.scales[qi], qs.code_sums[qi], allowed.data(),
                   allowed.size(), scores.data(), persona.data());
  TopK heap(k);
  for (std::size_t c = 0; c < allowed.size(); ++c)
    if (persona[c] >= 0) heap.push(Scored{scores[c], allowed[c], persona[c]});
  write_row(heap.take_sorted(), k, out_items + qi * k, out_scores + qi * k, out_persona + qi * k);
}

// Block-major scan of the whole catalog for queries [q_begin, q_end): each block of
// persona rows is read from memory once and scored for every query of the range.
void topk_scan(const PersonaMatrix& m, DotRowsFn dot, DotTileFn tile, const QueryBatch& qs,
               std::size_t q_begin, std::size_t q_end, std::size_t k, ListMode mode,
               const ItemLists& lists, const uint8_t* exclude_mask, int64_t* out_items,
               float* out_scores, int64_t* out_persona) {
  const std::size_t d = m.d;
  const std::size_t nq = q_end - q_begin;
  std::vector<TopK> heaps(nq, TopK(k));
  std::vector<std::vector<int64_t>> deny(nq);
  std::vector<std::size_t> deny_pos(nq, 0);
  if (mode == ListMode::deny) {
    for (std::size_t j = 0; j < nq; ++j) {
      const std::size_t qi = q_begin + j;
      deny[j].assign(lists.items + lists.offsets[qi], lists.items + lists.offsets[qi + 1]);
      std::sort(deny[j].begin(), deny[j].end());
    }
  }
  std::vector<QueryCodes> q(nq);
  for (std::size_t j = 0; j < nq; ++j)
    q[j] = QueryCodes{qs.codes + (q_begin + j) * d, qs.code_sums[q_begin + j]};

  const std::size_t rows_per_block =
      std::max<std::size_t>(kBlockBytes / std::max<std::size_t>(d, 1), 1);
  const std::size_t stride = std::max(rows_per_block, m.max_group) + 1;
  std::vector<int32_t> dots(stride * nq);

  std::size_t i0 = 0;
  while (i0 < m.n_items) {
    // Grow the block by whole items; a single large item may exceed the target.
    const std::size_t p0 = std::size_t(m.offsets[i0]);
    std::size_t i1 = i0 + 1;
    while (i1 < m.n_items && std::size_t(m.offsets[i1 + 1]) - p0 <= rows_per_block) ++i1;
    const std::size_t p1 = std::size_t(m.offsets[i1]);
    const std::size_t n_rows = p1 - p0;
    if (n_rows > 0) {
      // One call scores the block for every query: tiles of queries share each row load.
      if (nq == 1)
        dot(q[0], m.codes + p0 * d, n_rows, d, dots.data());
      else
        tile(q.data(), nq, m.codes + p0 * d, n_rows, d, dots.data(), stride);
      for (std::size_t j = 0; j < nq; ++j) {
        const float q_scale = qs.scales[q_begin + j];
        const int32_t* qdots = dots.data() + j * stride;
        TopK& heap = heaps[j];
        std::vector<int64_t>& dl = deny[j];
        std::size_t& dp = deny_pos[j];
        for (std::size_t i = i0; i < i1; ++i) {
          const std::size_t a = std::size_t(m.offsets[i]) - p0;
          const std::size_t n = std::size_t(m.offsets[i + 1]) - p0 - a;
          if (n == 0) continue;
          if (exclude_mask != nullptr && exclude_mask[i]) continue;
          if (!dl.empty()) {
            while (dp < dl.size() && dl[dp] < int64_t(i)) ++dp;
            if (dp < dl.size() && dl[dp] == int64_t(i)) continue;
          }
          float best;
          std::size_t best_j;
          best_of_group(qdots + a, m.scales + p0 + a, n, q_scale, best, best_j);
          if (heap.admits(best, int64_t(i)))
            heap.push(Scored{best, int64_t(i), int64_t(p0 + a + best_j)});
        }
      }
    }
    i0 = i1;
  }
  for (std::size_t j = 0; j < nq; ++j) {
    const std::size_t qi = q_begin + j;
    write_row(heaps[j].take_sorted(), k, out_items + qi * k, out_scores + qi * k,
              out_persona + qi * k);
  }
}

}  // namespace

void topk_catalog(const PersonaMatrix& m, DotRowsFn dot, DotTileFn tile, const QueryBatch& queries,
                  std::size_t k, ListMode mode, const ItemLists& lists, const uint8_t* exclude_mask,
                  std::size_t n_threads, int64_t* out_items, float* out_scores,
                  int64_t* out_persona) {
  const std::size_t nq = queries.n;
  if (nq == 0 || k == 0) return;
  auto run_range = [&](std::size_t a, std::size_t b) {
    if (mode == ListMode::allow) {
      for (std::size_t qi = a; qi < b; ++qi)
        topk_allowed(m, dot, queries, qi, k, lists, exclude_mask, out_items, out_scores,
                     out_persona);
    } else {
      topk_scan(m, dot, tile, queries, a, b, k, mode, lists, exclude_mask, out_items, out_scores,
                out_persona);
    }
  };
  parallel_for(nq, n_threads, run_range);
}

QueryProblem prepare_queries(const float* x, std::size_t n, std::size_t d, PreparedQueries& out,
                             std::size_t& bad_row) {
  out.codes.resize(n * d);
  out.scales.resize(n);
  out.batch.code_sums.resize(n);
  const int64_t bad = quantize_rows(x, n, d, out.codes.data(), out.scales.data());
  if (bad >= 0) {
    bad_row = std::size_t(bad);
    return QueryProblem::not_finite;
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (out.scales[i] * 127.0f > kMaxQueryAbs) {
      bad_row = i;
      return QueryProblem::too_large;
    }
    out.batch.code_sums[i] = code_sum(out.codes.data() + i * d, d);
  }
  out.batch.codes = out.codes.data();
  out.batch.scales = out.scales.data();
  out.batch.n = n;
  return QueryProblem::none;
}

std::string validate_lists(const int64_t* offsets, std::size_t n_lists, int64_t n_entries) {
  if (offsets[0] != 0 || offsets[n_lists] != n_entries)
    return "offsets must start at 0 and end at the number of items (" + std::to_string(n_entries) +
           ")";
  for (std::size_t i = 0; i < n_lists; ++i)
    if (offsets[i + 1] < offsets[i]) return "offsets must be non-decreasing";
  return "";
}

void score_candidates_batch(const PersonaMatrix& m, DotRowsFn dot, const PreparedQueries& q,
                            const int64_t* offsets, const int64_t* items, std::size_t n_threads,
                            float* out_scores, int64_t* out_persona) {
  parallel_for(q.batch.n, n_threads, [&](std::size_t a, std::size_t b) {
    for (std::size_t i = a; i < b; ++i)
      score_candidates(m, dot, q.codes.data() + i * m.d, q.scales[i], q.batch.code_sums[i],
                       items + offsets[i], std::size_t(offsets[i + 1] - offsets[i]),
                       out_scores + offsets[i], out_persona + offsets[i]);
  });
}

}  // namespace persona4rec
