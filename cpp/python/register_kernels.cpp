// Quantization, raw dot products (for tests), SIMD path introspection and control.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "checks.hpp"
#include "persona4rec/bench.hpp"
#include "persona4rec/checksum.hpp"
#include "persona4rec/cpu.hpp"
#include "persona4rec/maxsim.hpp"
#include "persona4rec/quantize.hpp"

namespace py = pybind11;
using namespace persona4rec;
using py_checks::require;

namespace {

py::dict simd_info() {
  py::dict out;
  out["active"] = simd_path_name(active_path());
  out["source"] = active_path_source();
  py::list available, compiled;
  for (SimdPath p : available_paths()) available.append(simd_path_name(p));
  for (SimdPath p : compiled_paths()) compiled.append(simd_path_name(p));
  out["available"] = available;
  out["compiled"] = compiled;
  return out;
}

py::tuple quantize(const py::object& x_obj) {
  py::array x = require<float>(x_obj, "x", 2);
  const auto n = std::size_t(x.shape(0)), d = std::size_t(x.shape(1));
  py::array_t<int8_t> codes({x.shape(0), x.shape(1)});
  py::array_t<float> scales(x.shape(0));
  const float* src = static_cast<const float*>(x.data());
  int8_t* c = codes.mutable_data();
  float* s = scales.mutable_data();
  int64_t bad;
  {
    py::gil_scoped_release release;
    bad = quantize_rows(src, n, d, c, s);
  }
  if (bad >= 0)
    throw py::value_error("x row " + std::to_string(bad) +
                          " contains NaN or infinity: clean or drop it before quantizing");
  return py::make_tuple(codes, scales);
}

py::array_t<int32_t> dot_int8(const py::object& q_obj, const py::object& rows_obj,
                              const std::string& simd) {
  py::array q = require<int8_t>(q_obj, "query", 1);
  py::array rows = require<int8_t>(rows_obj, "rows", 2);
  if (rows.shape(1) != q.shape(0))
    throw py::value_error("rows have dimension " + std::to_string(rows.shape(1)) +
                          " but the query has " + std::to_string(q.shape(0)));
  const SimdPath path = simd.empty() ? active_path() : simd_path_from_name(simd);
  if (!path_available(path))
    throw py::value_error(std::string("SIMD path '") + simd_path_name(path) +
                          "' is not available here; see simd_info()['available']");
  const DotRowsFn fn = dot_rows_for(path);
  const auto d = std::size_t(q.shape(0));
  const auto* qc = static_cast<const int8_t*>(q.data());
  const auto* rc = static_cast<const int8_t*>(rows.data());
  for (std::size_t j = 0; j < d; ++j)
    if (qc[j] == -128)
      throw py::value_error(
          "query codes must lie in [-127, 127] (-128 breaks the exact SIMD paths)");
  py::array_t<int32_t> out(rows.shape(0));
  int32_t* o = out.mutable_data();
  const std::size_t n = std::size_t(rows.shape(0));
  {
    py::gil_scoped_release release;
    const QueryCodes qq{qc, code_sum(qc, d)};
    fn(qq, rc, n, d, o);
  }
  return out;
}

uint64_t stream_read_py(const py::object& a_obj) {
  py::array a = py::reinterpret_borrow<py::array>(a_obj);
  if (!(a.flags() & py::array::c_style)) throw py::value_error("array must be C-contiguous");
  const void* p = a.data();
  const std::size_t n = std::size_t(a.nbytes());
  py::gil_scoped_release release;
  return stream_read(p, n);
}

template <uint64_t (*Checksum)(const void*, std::size_t, uint64_t)>
uint64_t checksum_py(const py::object& obj, uint64_t seed) {
  // PyBUF_C_CONTIGUOUS: refuse strided views instead of hashing the wrong bytes.
  Py_buffer view;
  if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) {
    PyErr_Clear();
    throw py::value_error(
        "checksum64 needs a C-contiguous buffer (bytes, memoryview or numpy array)");
  }
  const void* p = view.buf;
  const std::size_t n = std::size_t(view.len);
  uint64_t out;
  {
    py::gil_scoped_release release;
    out = Checksum(p, n, seed);
  }
  PyBuffer_Release(&view);
  return out;
}

py::array_t<uint64_t> checksum64_rows_py(const py::object& rows_obj, const py::object& seeds_obj) {
  py::array rows = py::reinterpret_borrow<py::array>(rows_obj);
  if (!py::isinstance<py::array>(rows_obj) || rows.ndim() != 2 ||
      !(rows.flags() & py::array::c_style))
    throw py::value_error("rows must be a C-contiguous 2-D numpy array");
  py::array seeds = require<uint64_t>(seeds_obj, "seeds", 1);
  if (seeds.shape(0) != rows.shape(0))
    throw py::value_error("seeds must have one entry per row (" + std::to_string(rows.shape(0)) +
                          ")");
  const auto n = std::size_t(rows.shape(0));
  const std::size_t row_bytes = std::size_t(rows.shape(1)) * std::size_t(rows.itemsize());
  const auto* base = static_cast<const unsigned char*>(rows.data());
  const auto* sd = static_cast<const uint64_t*>(seeds.data());
  py::array_t<uint64_t> out(rows.shape(0));
  uint64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (std::size_t i = 0; i < n; ++i) o[i] = checksum64(base + i * row_bytes, row_bytes, sd[i]);
  }
  return out;
}

int64_t find_int8_min_py(const py::object& codes_obj) {
  py::array codes = py::reinterpret_borrow<py::array>(codes_obj);
  if (!py::isinstance<py::array_t<int8_t>>(codes) || !(codes.flags() & py::array::c_style))
    throw py::value_error("codes must be a C-contiguous int8 numpy array");
  const auto* p = static_cast<const int8_t*>(codes.data());
  const std::size_t n = std::size_t(codes.size());
  py::gil_scoped_release release;
  return find_int8_min(p, n);
}

}  // namespace

void register_kernels(py::module_& m) {
  // Resolve PERSONA4REC_SIMD now, so a bad value fails the import instead of a later call.
  (void)active_path();
  m.def("simd_info", &simd_info,
        "Which kernel path is active, why (cpu, env, set_simd), and which paths are "
        "compiled and available on this CPU.");
  m.def(
      "set_simd", [](const std::string& name) { set_active_path(simd_path_from_name(name)); },
      py::arg("name"),
      "Force a kernel path for this process (tests, benchmarks). Not safe while other "
      "threads are querying.");
  m.def("quantize", &quantize, py::arg("x"),
        "Symmetric per-row int8 quantization of a float32 (n, d) array: returns (codes, "
        "scales) with codes in [-127, 127] and x ~= codes * scales[:, None].");
  m.def("dot_int8", &dot_int8, py::arg("query"), py::arg("rows"), py::arg("simd") = "",
        "Exact int32 dot products of an int8 query with each int8 row, on the given path "
        "(default: the active one).");
  m.def("checksum64", &checksum_py<&checksum64>, py::arg("buffer"), py::arg("seed") = 0,
        "64-bit corruption checksum of a contiguous buffer (bytes, memoryview, numpy array): "
        "any single changed 8-byte word, hence any bit flip, changes it, and no pattern of "
        "flips is known to cancel. Index format 2 and later.");
  m.def("checksum64_v1", &checksum_py<&checksum64_v1>, py::arg("buffer"), py::arg("seed") = 0,
        "The index format 1 checksum (reads old files only: two flips of the top bit of "
        "words 64 bytes apart cancel).");
  m.def("checksum64_rows", &checksum64_rows_py, py::arg("rows"), py::arg("seeds"),
        "checksum64 of every row of a C-contiguous 2-D array, row i seeded with seeds[i] "
        "(uint64): binds each row to its seed, e.g. a cache row to its key.");
  m.def("find_int8_min", &find_int8_min_py, py::arg("codes"),
        "Flat position of the first -128 in an int8 code array, or -1 (codes must lie in "
        "[-127, 127]).");
  m.def("stream_read", &stream_read_py, py::arg("array"),
        "Read every byte of a C-contiguous array once (a memory-bandwidth floor for "
        "benchmarks); returns a checksum so the read cannot be optimised away.");
}
