// Non-finite detection (CPU): count NaN/Inf elements of bf16/fp16/fp32 storage by their exponent bits,
// no float conversion, so it runs at memory bandwidth; and a pread that counts each block while it is
// still in cache, so checking inputs costs no extra pass over memory.
#include "alignmerge.h"

#include <algorithm>
#include <cerrno>
#include <tuple>
#include <unistd.h>

#include <omp.h>

namespace py = pybind11;

namespace alignmerge {
namespace {

constexpr int64_t kParallelCountMin = 1 << 22;  // smaller ranges count on the calling thread

int64_t count_range(const void* ptr, int dtype, int64_t n) {
  int64_t count = 0;
  if (dtype == kFloat32) {
    const uint32_t* x = static_cast<const uint32_t*>(ptr);
#pragma omp parallel for reduction(+ : count) schedule(static) if (n >= kParallelCountMin)
    for (int64_t i = 0; i < n; ++i) count += (x[i] & 0x7f800000u) == 0x7f800000u;
  } else {
    const uint16_t* x = static_cast<const uint16_t*>(ptr);
    const uint16_t exp_mask = dtype == kBFloat16 ? 0x7f80u : 0x7c00u;
#pragma omp parallel for reduction(+ : count) schedule(static) if (n >= kParallelCountMin)
    for (int64_t i = 0; i < n; ++i) count += (x[i] & exp_mask) == exp_mask;
  }
  return count;
}

int64_t count_nonfinite(uintptr_t ptr, int dtype, int64_t n) {
  py::gil_scoped_release release;
  return count_range(reinterpret_cast<const void*>(ptr), dtype, n);
}

// pread nbytes at offset into dst in blocks of block_bytes; with dtype >= 0 also count the NaN/Inf
// elements of each block right after reading it. Returns (bytes read, non-finite count, errno): fewer
// bytes than asked means end of file (errno 0) or a read error (errno set).
std::tuple<int64_t, int64_t, int> pread_count_nonfinite(int fd, int64_t offset, int64_t nbytes, uintptr_t dst,
                                                        int dtype, int64_t block_bytes) {
  py::gil_scoped_release release;
  char* out = reinterpret_cast<char*>(dst);
  const int64_t elem = dtype == kFloat32 ? 4 : 2;
  int64_t done = 0, counted = 0, count = 0;
  while (done < nbytes) {
    const int64_t want = std::min(block_bytes, nbytes - done);
    const ssize_t got = ::pread(fd, out + done, static_cast<size_t>(want), static_cast<off_t>(offset + done));
    if (got < 0) {
      if (errno == EINTR) continue;
      return {done, count, errno};
    }
    if (got == 0) break;
    done += got;
    if (dtype >= 0) {
      const int64_t upto = done - done % elem;
      count += count_range(out + counted, dtype, (upto - counted) / elem);
      counted = upto;
    }
  }
  return {done, count, 0};
}

}  // namespace

void register_check_ops(py::module_& m) {
  m.def("count_nonfinite", &count_nonfinite, "number of NaN/Inf elements", py::arg("ptr"), py::arg("dtype"),
        py::arg("n"));
  m.def("pread_count_nonfinite", &pread_count_nonfinite,
        "pread into dst in blocks, counting NaN/Inf of each block while cached (dtype -1: no count)",
        py::arg("fd"), py::arg("offset"), py::arg("nbytes"), py::arg("dst"), py::arg("dtype"),
        py::arg("block_bytes"));
}

}  // namespace alignmerge
