// Id-column checks for loaders (duplicate detection without building Python objects).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "checks.hpp"
#include "persona4rec/ids.hpp"
#include "persona4rec/maxsim.hpp"

namespace py = pybind11;
using namespace persona4rec;
using py_checks::require;

namespace {

const uint8_t* skip_mask(const py::object& skip_obj, std::size_t n, py::array& keep) {
  if (skip_obj.is_none()) return nullptr;
  keep = require<uint8_t>(skip_obj, "skip", 1);
  if (std::size_t(keep.shape(0)) != n)
    throw py::value_error("skip must have one entry per id (" + std::to_string(n) + ")");
  return static_cast<const uint8_t*>(keep.data());
}

int64_t find_duplicate_string_py(const py::object& data_obj, const py::object& offsets_obj,
                                 const py::object& skip_obj) {
  py::array data = require<uint8_t>(data_obj, "data", 1);
  py::array offsets = require<int64_t>(offsets_obj, "offsets", 1);
  if (offsets.shape(0) < 1) throw py::value_error("offsets must have n + 1 entries");
  const auto n = std::size_t(offsets.shape(0) - 1);
  const auto* off = static_cast<const int64_t*>(offsets.data());
  const std::string err = validate_lists(off, n, int64_t(data.shape(0)));
  if (!err.empty()) throw py::value_error("string " + err);
  py::array keep;
  const uint8_t* skip = skip_mask(skip_obj, n, keep);
  const auto* d = static_cast<const uint8_t*>(data.data());
  py::gil_scoped_release release;
  return find_duplicate_string(d, off, n, skip);
}

int64_t find_duplicate_int_py(const py::object& ids_obj, const py::object& skip_obj) {
  py::array ids = require<int64_t>(ids_obj, "ids", 1);
  const auto n = std::size_t(ids.shape(0));
  py::array keep;
  const uint8_t* skip = skip_mask(skip_obj, n, keep);
  const auto* p = static_cast<const int64_t*>(ids.data());
  py::gil_scoped_release release;
  return find_duplicate_int(p, n, skip);
}

}  // namespace

void register_ids(py::module_& m) {
  m.def("find_duplicate_string", &find_duplicate_string_py, py::arg("data"), py::arg("offsets"),
        py::arg("skip") = py::none(),
        "Index of the first string (UTF-8 bytes data[offsets[i]:offsets[i+1]]) equal to an "
        "earlier one, leaving out entries where skip (uint8) is nonzero; -1 if none.");
  m.def("find_duplicate_int", &find_duplicate_int_py, py::arg("ids"), py::arg("skip") = py::none(),
        "Index of the first int64 id equal to an earlier one (skip as above); -1 if none.");
}
