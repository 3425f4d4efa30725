// The extension module: each part registers itself.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_kernels(py::module_& m);
void register_maxsim(py::module_& m);
void register_ids(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "persona4rec native core: int8 quantization and multi-persona max-sim kernels";
  register_kernels(m);
  register_maxsim(m);
  register_ids(m);
}
