// One way to split work across threads: contiguous ranges of [0, n), the calling thread
// taking the first; an exception in any worker is captured and the first one rethrown in
// the caller once all have joined (a thread never dies with an exception in flight).
#pragma once
#include <algorithm>
#include <cstddef>
#include <exception>
#include <thread>
#include <vector>

namespace persona4rec {

// Calls body(begin, end) on up to n_threads disjoint ranges covering [0, n).
template <typename Body>
void parallel_for(std::size_t n, std::size_t n_threads, Body&& body) {
  if (n == 0) return;
  const std::size_t t = std::max<std::size_t>(1, std::min(n_threads, n));
  if (t == 1) {
    body(std::size_t(0), n);
    return;
  }
  const std::size_t per = (n + t - 1) / t;
  std::vector<std::exception_ptr> errors(t);
  std::vector<std::thread> workers;
  workers.reserve(t - 1);
  for (std::size_t w = 1; w < t; ++w) {
    const std::size_t a = w * per, b = std::min(n, a + per);
    if (a >= b) break;
    workers.emplace_back([&body, &errors, w, a, b] {
      try {
        body(a, b);
      } catch (...) {
        errors[w] = std::current_exception();
      }
    });
  }
  try {
    body(std::size_t(0), std::min(n, per));
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& worker : workers) worker.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace persona4rec
