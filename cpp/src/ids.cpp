#include "persona4rec/ids.hpp"

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "persona4rec/checksum.hpp"

namespace persona4rec {

namespace {

// Sort (key, index) pairs; equal keys that are really equal (`same`) are duplicates.
// The answer is the smallest index that has an equal partner before it, which is the
// second-smallest index of its group: a result independent of the sort order.
template <typename Key, typename Same>
int64_t first_duplicate(std::vector<std::pair<Key, int64_t>>& keyed, Same same) {
  std::sort(keyed.begin(), keyed.end());
  int64_t best = -1;
  for (std::size_t a = 0; a < keyed.size();) {
    std::size_t b = a + 1;
    while (b < keyed.size() && keyed[b].first == keyed[a].first) ++b;
    // Within a run of equal keys (sorted by index), find the first index with a truly
    // equal earlier member (hash runs may mix different strings).
    for (std::size_t j = a + 1; j < b; ++j) {
      for (std::size_t i = a; i < j; ++i) {
        if (same(keyed[i].second, keyed[j].second)) {
          if (best < 0 || keyed[j].second < best) best = keyed[j].second;
          break;
        }
      }
    }
    a = b;
  }
  return best;
}

}  // namespace

int64_t find_duplicate_string(const uint8_t* data, const int64_t* offsets, std::size_t n,
                              const uint8_t* skip) {
  std::vector<std::pair<uint64_t, int64_t>> keyed;
  keyed.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    if (skip != nullptr && skip[i]) continue;
    keyed.emplace_back(checksum64(data + offsets[i], std::size_t(offsets[i + 1] - offsets[i])),
                       int64_t(i));
  }
  return first_duplicate(keyed, [&](int64_t x, int64_t y) {
    const int64_t lx = offsets[x + 1] - offsets[x], ly = offsets[y + 1] - offsets[y];
    return lx == ly && std::memcmp(data + offsets[x], data + offsets[y], std::size_t(lx)) == 0;
  });
}

int64_t find_duplicate_int(const int64_t* ids, std::size_t n, const uint8_t* skip) {
  std::vector<std::pair<int64_t, int64_t>> keyed;
  keyed.reserve(n);
  for (std::size_t i = 0; i < n; ++i)
    if (skip == nullptr || !skip[i]) keyed.emplace_back(ids[i], int64_t(i));
  return first_duplicate(keyed, [](int64_t, int64_t) { return true; });
}

}  // namespace persona4rec
