// Boundary checks shared by the binding files. Every message says what to do.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

namespace persona4rec::py_checks {

namespace py = pybind11;

template <typename T>
const char* dtype_name();
template <>
inline const char* dtype_name<int8_t>() {
  return "int8";
}
template <>
inline const char* dtype_name<uint8_t>() {
  return "uint8";
}
template <>
inline const char* dtype_name<float>() {
  return "float32";
}
template <>
inline const char* dtype_name<int64_t>() {
  return "int64";
}
template <>
inline const char* dtype_name<int32_t>() {
  return "int32";
}
template <>
inline const char* dtype_name<uint64_t>() {
  return "uint64";
}

// Requires an array of exactly dtype T (native byte order), C-contiguous, with `ndim`
// dimensions. Never copies: a silent copy of a large index would double its memory.
template <typename T>
py::array require(const py::object& obj, const char* name, int ndim) {
  if (!py::isinstance<py::array>(obj))
    throw py::value_error(std::string(name) + " must be a numpy array of " + dtype_name<T>() +
                          ", got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!py::isinstance<py::array_t<T>>(a))
    throw py::value_error(std::string(name) + " must have dtype " + dtype_name<T>() + ", got " +
                          std::string(py::str(a.dtype())) + ": convert it once with np.asarray(" +
                          name + ", dtype=np." + dtype_name<T>() + ")");
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) +
                          "-dimensional, got shape with " + std::to_string(a.ndim()) +
                          " dimensions");
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous: pass np.ascontiguousarray(" +
                          name + ")");
  return a;
}

}  // namespace persona4rec::py_checks
