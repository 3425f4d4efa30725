// MaxSimIndex: the grouped int8 persona matrix, validated once at construction, queried
// many times. It holds references to the caller's arrays (no copy), so a read-only
// memory map serves directly.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "checks.hpp"
#include "persona4rec/checksum.hpp"
#include "persona4rec/cpu.hpp"
#include "persona4rec/maxsim.hpp"
#include "persona4rec/quantize.hpp"

namespace py = pybind11;
using namespace persona4rec;
using py_checks::require;

namespace {

class MaxSimIndex {
 public:
  MaxSimIndex(const py::object& codes, const py::object& scales, const py::object& offsets)
      : codes_(require<int8_t>(codes, "codes", 2)),
        scales_(require<float>(scales, "scales", 1)),
        offsets_(require<int64_t>(offsets, "offsets", 1)) {
    if (scales_.shape(0) != codes_.shape(0))
      throw py::value_error("scales has " + std::to_string(scales_.shape(0)) +
                            " entries but codes has " + std::to_string(codes_.shape(0)) +
                            " rows: one scale per persona vector is required");
    if (offsets_.shape(0) < 1)
      throw py::value_error("offsets must have n_items + 1 entries (at least [0])");
    if (codes_.shape(1) < 1) throw py::value_error("codes must have at least one column");
    m_.codes = static_cast<const int8_t*>(codes_.data());
    m_.scales = static_cast<const float*>(scales_.data());
    m_.offsets = static_cast<const int64_t*>(offsets_.data());
    m_.n_items = std::size_t(offsets_.shape(0) - 1);
    m_.n_personas = std::size_t(codes_.shape(0));
    m_.d = std::size_t(codes_.shape(1));
    std::string err = validate_offsets(m_);
    if (!err.empty()) throw py::value_error(err);
    for (std::size_t p = 0; p < m_.n_personas; ++p)
      if (!std::isfinite(m_.scales[p]) || m_.scales[p] < 0)
        throw py::value_error("scales[" + std::to_string(p) +
                              "] is negative or not finite: rebuild the codes with quantize()");
    int64_t bad_code;
    {
      py::gil_scoped_release release;
      bad_code = find_int8_min(m_.codes, m_.n_personas * m_.d);
    }
    if (bad_code >= 0)
      throw py::value_error("codes row " + std::to_string(bad_code / int64_t(m_.d)) +
                            " holds -128: codes must lie in [-127, 127] (the exact SIMD paths "
                            "rely on it); build codes with quantize()");
  }

  py::tuple score_candidates_py(const py::object& query, const py::object& candidates) {
    PreparedQueries q = prepare(query, 1);
    py::array cand = require<int64_t>(candidates, "candidates", 1);
    const auto* c = static_cast<const int64_t*>(cand.data());
    const std::size_t n = std::size_t(cand.shape(0));
    check_items(c, n, "candidates");
    py::array_t<float> scores(cand.shape(0));
    py::array_t<int64_t> persona(cand.shape(0));
    float* s = scores.mutable_data();
    int64_t* p = persona.mutable_data();
    {
      py::gil_scoped_release release;
      score_candidates(m_, active_dot_rows(), q.codes.data(), q.scales[0], q.batch.code_sums[0], c,
                       n, s, p);
    }
    return py::make_tuple(scores, persona);
  }

  py::tuple topk_py(const py::object& queries, long long k, const py::object& allow,
                    const py::object& deny, const py::object& exclude_mask, long long n_threads) {
    if (k < 0) throw py::value_error("k must be >= 0, got " + std::to_string(k));
    if (n_threads < 1) throw py::value_error("n_threads must be >= 1");
    PreparedQueries q = prepare(queries, 2);
    const std::size_t nq = q.batch.n;
    if (!allow.is_none() && !deny.is_none())
      throw py::value_error("pass either allow or deny lists, not both");
    ListMode mode = ListMode::none;
    ItemLists lists;
    py::array list_offsets, list_items;  // keep alive while computing
    const py::object& given = allow.is_none() ? deny : allow;
    if (!given.is_none()) {
      mode = allow.is_none() ? ListMode::deny : ListMode::allow;
      const char* what = mode == ListMode::allow ? "allow" : "deny";
      auto pair = given.cast<py::tuple>();
      if (pair.size() != 2)
        throw py::value_error(std::string(what) + " must be a (offsets, items) pair in CSR form");
      list_offsets = require<int64_t>(pair[0], "list offsets", 1);
      list_items = require<int64_t>(pair[1], "list items", 1);
      if (std::size_t(list_offsets.shape(0)) != nq + 1)
        throw py::value_error(std::string(what) +
                              " offsets must have n_queries + 1 = " + std::to_string(nq + 1) +
                              " entries, got " + std::to_string(list_offsets.shape(0)));
      lists.offsets = static_cast<const int64_t*>(list_offsets.data());
      lists.items = static_cast<const int64_t*>(list_items.data());
      const std::string err = validate_lists(lists.offsets, nq, int64_t(list_items.shape(0)));
      if (!err.empty()) throw py::value_error(std::string(what) + " " + err);
      check_items(lists.items, std::size_t(list_items.shape(0)), what);
    }
    const uint8_t* mask = nullptr;
    py::array mask_arr;
    if (!exclude_mask.is_none()) {
      if (py::isinstance<py::array_t<bool>>(exclude_mask))
        mask_arr = py::reinterpret_borrow<py::array>(exclude_mask);
      else
        mask_arr = require<uint8_t>(exclude_mask, "exclude_mask", 1);
      if (mask_arr.ndim() != 1 || std::size_t(mask_arr.shape(0)) != m_.n_items ||
          !(mask_arr.flags() & py::array::c_style))
        throw py::value_error(
            "exclude_mask must be a contiguous 1-D bool/uint8 array of n_items = " +
            std::to_string(m_.n_items) + " entries");
      mask = static_cast<const uint8_t*>(mask_arr.data());
    }
    const auto K = py::ssize_t(k);
    py::array_t<int64_t> items({py::ssize_t(nq), K});
    py::array_t<float> scores({py::ssize_t(nq), K});
    py::array_t<int64_t> persona({py::ssize_t(nq), K});
    int64_t* oi = items.mutable_data();
    float* os = scores.mutable_data();
    int64_t* op = persona.mutable_data();
    {
      py::gil_scoped_release release;
      topk_catalog(m_, active_dot_rows(), active_dot_tile(), q.batch, std::size_t(k), mode, lists,
                   mask, std::size_t(n_threads), oi, os, op);
    }
    return py::make_tuple(items, scores, persona);
  }

  // Rerank for a batch: query i scores its own candidate list lists[i] (CSR).
  py::tuple score_candidates_batch_py(const py::object& queries, const py::object& candidates,
                                      long long n_threads) {
    if (n_threads < 1) throw py::value_error("n_threads must be >= 1");
    PreparedQueries q = prepare(queries, 2);
    const std::size_t nq = q.batch.n;
    auto pair = candidates.cast<py::tuple>();
    if (pair.size() != 2)
      throw py::value_error("candidates must be a (offsets, items) pair in CSR form");
    py::array off_arr = require<int64_t>(pair[0], "candidate offsets", 1);
    py::array item_arr = require<int64_t>(pair[1], "candidate items", 1);
    if (std::size_t(off_arr.shape(0)) != nq + 1)
      throw py::value_error(
          "candidate offsets must have n_queries + 1 = " + std::to_string(nq + 1) +
          " entries, got " + std::to_string(off_arr.shape(0)));
    const auto* off = static_cast<const int64_t*>(off_arr.data());
    const auto* items = static_cast<const int64_t*>(item_arr.data());
    const std::string err = validate_lists(off, nq, int64_t(item_arr.shape(0)));
    if (!err.empty()) throw py::value_error("candidate " + err);
    check_items(items, std::size_t(item_arr.shape(0)), "candidates");
    py::array_t<float> scores(item_arr.shape(0));
    py::array_t<int64_t> persona(item_arr.shape(0));
    float* s = scores.mutable_data();
    int64_t* p = persona.mutable_data();
    {
      py::gil_scoped_release release;
      score_candidates_batch(m_, active_dot_rows(), q, off, items, std::size_t(n_threads), s, p);
    }
    return py::make_tuple(scores, persona);
  }

  // The rerank hot path for ids that need a dict lookup (string ids): map ids to item
  // indices through `id_to_index`, score, and sort best first (ties in input order), in
  // one call. Ids that are missing, at or beyond `n_visible`, or flagged in `removed` are
  // skipped and counted. Returns (ids, scores, persona_rows, n_unknown), ids being the
  // caller's own objects.
  py::tuple rerank_by_id_py(const py::object& query, const py::object& candidates,
                            const py::dict& id_to_index, long long n_visible,
                            const py::object& removed) {
    PreparedQueries q = prepare(query, 1);
    const uint8_t* removed_mask = nullptr;
    py::array removed_arr;
    if (!removed.is_none()) {
      removed_arr = require<uint8_t>(removed, "removed", 1);
      if (std::size_t(removed_arr.shape(0)) != m_.n_items)
        throw py::value_error("removed must have one entry per item");
      removed_mask = static_cast<const uint8_t*>(removed_arr.data());
    }
    py::object seq = py::reinterpret_steal<py::object>(
        PySequence_Fast(candidates.ptr(), "candidate ids must be a sequence"));
    if (!seq) throw py::error_already_set();
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.ptr());
    PyObject** items = PySequence_Fast_ITEMS(seq.ptr());
    std::vector<int64_t> idx;
    std::vector<Py_ssize_t> pos;
    idx.reserve(std::size_t(n));
    pos.reserve(std::size_t(n));
    const int64_t limit = std::min<int64_t>(n_visible, int64_t(m_.n_items));
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* found = PyDict_GetItemWithError(id_to_index.ptr(), items[i]);
      if (found == nullptr) {
        if (PyErr_Occurred()) throw py::error_already_set();  // e.g. an unhashable id
        continue;
      }
      const long long v = PyLong_AsLongLong(found);
      if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
      if (v < 0 || v >= limit || (removed_mask != nullptr && removed_mask[v])) continue;
      idx.push_back(int64_t(v));
      pos.push_back(i);
    }
    const std::size_t m = idx.size();
    std::vector<float> scores(m);
    std::vector<int64_t> rows(m);
    std::vector<std::size_t> order(m);
    {
      py::gil_scoped_release release;
      score_candidates(m_, active_dot_rows(), q.codes.data(), q.scales[0], q.batch.code_sums[0],
                       idx.data(), m, scores.data(), rows.data());
      for (std::size_t j = 0; j < m; ++j) order[j] = j;
      std::stable_sort(order.begin(), order.end(),
                       [&](std::size_t a, std::size_t b) { return scores[a] > scores[b]; });
    }
    py::list ids(m);
    py::array_t<float> out_scores(static_cast<py::ssize_t>(m));
    py::array_t<int64_t> out_rows(static_cast<py::ssize_t>(m));
    float* os = out_scores.mutable_data();
    int64_t* orows = out_rows.mutable_data();
    for (std::size_t j = 0; j < m; ++j) {
      const std::size_t o = order[j];
      PyObject* obj = items[pos[o]];
      Py_INCREF(obj);
      PyList_SET_ITEM(ids.ptr(), Py_ssize_t(j), obj);
      os[j] = scores[o];
      orows[j] = rows[o];
    }
    return py::make_tuple(ids, out_scores, out_rows, std::size_t(n) - m);
  }

  std::size_t n_items() const { return m_.n_items; }
  std::size_t n_personas() const { return m_.n_personas; }
  std::size_t dim() const { return m_.d; }
  std::size_t max_group() const { return m_.max_group; }

 private:
  void check_items(const int64_t* items, std::size_t n, const char* what) const {
    for (std::size_t i = 0; i < n; ++i)
      if (items[i] < 0 || std::size_t(items[i]) >= m_.n_items)
        throw py::value_error(std::string(what) + "[" + std::to_string(i) +
                              "] = " + std::to_string(items[i]) + " is not an item index in [0, " +
                              std::to_string(m_.n_items) + ")");
  }

  PreparedQueries prepare(const py::object& obj, int ndim) const {
    py::array a = require<float>(obj, ndim == 1 ? "query" : "queries", ndim);
    const std::size_t n = ndim == 1 ? 1 : std::size_t(a.shape(0));
    const std::size_t d = std::size_t(a.shape(ndim - 1));
    if (d != m_.d)
      throw py::value_error("query dimension " + std::to_string(d) +
                            " does not match the index dimension " + std::to_string(m_.d) +
                            ": encode users with the same model as the personas");
    PreparedQueries q;
    const float* src = static_cast<const float*>(a.data());
    QueryProblem problem;
    std::size_t bad = 0;
    {
      py::gil_scoped_release release;
      problem = prepare_queries(src, n, d, q, bad);
    }
    if (problem == QueryProblem::not_finite)
      throw py::value_error("query " + std::to_string(bad) +
                            " contains NaN or infinity: check the user profile");
    if (problem == QueryProblem::too_large)
      throw py::value_error(
          "query " + std::to_string(bad) + " holds values up to " +
          std::to_string(q.scales[bad] * 127.0f) +
          ", above 1e15: scores would overflow float32; L2-normalise the user vectors");
    return q;
  }

  py::array codes_, scales_, offsets_;
  PersonaMatrix m_;
};

}  // namespace

void register_maxsim(py::module_& m) {
  py::class_<MaxSimIndex>(m, "MaxSimIndex",
                          "Grouped int8 persona vectors (CSR by item) with exact max-sim "
                          "scoring. Holds references to the given arrays; never copies them.")
      .def(py::init<const py::object&, const py::object&, const py::object&>(), py::arg("codes"),
           py::arg("scales"), py::arg("offsets"))
      .def("score_candidates", &MaxSimIndex::score_candidates_py, py::arg("query"),
           py::arg("candidates"),
           "Best persona score and persona row for each candidate item index (input order).")
      .def("score_candidates_batch", &MaxSimIndex::score_candidates_batch_py, py::arg("queries"),
           py::arg("candidates"), py::arg("n_threads") = 1,
           "Rerank a batch: query i scores the items "
           "candidates[1][candidates[0][i]:candidates[0][i+1]]; "
           "returns flat (scores, persona_rows) aligned with the candidate items.")
      .def("rerank_by_id", &MaxSimIndex::rerank_by_id_py, py::arg("query"), py::arg("candidates"),
           py::arg("id_to_index"), py::arg("n_visible"), py::arg("removed") = py::none(),
           "Map candidate ids through a dict, score and sort them best first (ties in input "
           "order): (ids, scores, persona_rows, n_unknown); unknown ids are skipped.")
      .def("topk", &MaxSimIndex::topk_py, py::arg("queries"), py::arg("k"),
           py::arg("allow") = py::none(), py::arg("deny") = py::none(),
           py::arg("exclude_mask") = py::none(), py::arg("n_threads") = 1,
           "Exact top-k items per query over the catalog: (items, scores, persona_rows), each "
           "(n_queries, k), best first; missing slots are -1 / -inf.")
      .def_property_readonly("n_items", &MaxSimIndex::n_items)
      .def_property_readonly("n_personas", &MaxSimIndex::n_personas)
      .def_property_readonly("dim", &MaxSimIndex::dim)
      .def_property_readonly("max_group", &MaxSimIndex::max_group);
}
