// Non-finite detection (CPU): count NaN/Inf elements of bf16/fp16/fp32 storage by their exponent bits,
// one read pass, OpenMP; no float conversion, so it runs at memory bandwidth.
#include "alignmerge.h"

#include <omp.h>

namespace py = pybind11;

namespace alignmerge {
namespace {

int64_t count_nonfinite(uintptr_t ptr, int dtype, int64_t n) {
  int64_t count = 0;
  py::gil_scoped_release release;
  if (dtype == kFloat32) {
    const uint32_t* x = reinterpret_cast<const uint32_t*>(ptr);
#pragma omp parallel for reduction(+ : count) schedule(static)
    for (int64_t i = 0; i < n; ++i) count += (x[i] & 0x7f800000u) == 0x7f800000u;
  } else {
    const uint16_t* x = reinterpret_cast<const uint16_t*>(ptr);
    const uint16_t exp_mask = dtype == kBFloat16 ? 0x7f80u : 0x7c00u;
#pragma omp parallel for reduction(+ : count) schedule(static)
    for (int64_t i = 0; i < n; ++i) count += (x[i] & exp_mask) == exp_mask;
  }
  return count;
}

}  // namespace

void register_check_ops(py::module_& m) {
  m.def("count_nonfinite", &count_nonfinite, "number of NaN/Inf elements", py::arg("ptr"), py::arg("dtype"),
        py::arg("n"));
}

}  // namespace alignmerge
