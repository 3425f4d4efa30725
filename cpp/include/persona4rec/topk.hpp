// A bounded heap that keeps the k best (score, item) pairs.
// Order: higher score first, then lower item index, so ties are deterministic.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace persona4rec {

struct Scored {
  float score;
  int64_t item;
  int64_t persona;
};

// True when a ranks strictly before b.
inline bool ranks_before(const Scored& a, const Scored& b) {
  return a.score > b.score || (a.score == b.score && a.item < b.item);
}

class TopK {
 public:
  explicit TopK(std::size_t k) : k_(k) { heap_.reserve(k); }

  // Cheap pre-check so callers can skip work for items that cannot enter.
  bool admits(float score, int64_t item) const {
    if (heap_.size() < k_) return k_ > 0;
    return ranks_before(Scored{score, item, -1}, heap_[0]);
  }

  void push(const Scored& s) {
    if (heap_.size() < k_) {
      heap_.push_back(s);
      sift_up(heap_.size() - 1);
    } else if (k_ > 0 && ranks_before(s, heap_[0])) {
      heap_[0] = s;
      sift_down(0);
    }
  }

  // Best first; leaves the heap empty.
  std::vector<Scored> take_sorted();
  std::size_t size() const { return heap_.size(); }

 private:
  // heap_[0] is the worst kept element.
  void sift_up(std::size_t i) {
    while (i > 0) {
      std::size_t parent = (i - 1) / 2;
      if (!ranks_before(heap_[parent], heap_[i])) break;
      std::swap(heap_[parent], heap_[i]);
      i = parent;
    }
  }
  void sift_down(std::size_t i) {
    const std::size_t n = heap_.size();
    for (;;) {
      std::size_t l = 2 * i + 1, r = l + 1, worst = i;
      if (l < n && ranks_before(heap_[worst], heap_[l])) worst = l;
      if (r < n && ranks_before(heap_[worst], heap_[r])) worst = r;
      if (worst == i) break;
      std::swap(heap_[worst], heap_[i]);
      i = worst;
    }
  }

  std::size_t k_;
  std::vector<Scored> heap_;
};

}  // namespace persona4rec
