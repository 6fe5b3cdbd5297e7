// Checks on data in flight (CPU): count NaN/Inf elements of bf16/fp16/fp32 storage by their exponent bits,
// no float conversion, so it runs at memory bandwidth; a pread that counts each block while it is still in
// cache, so checking inputs costs no extra pass over memory; and CRC-32C (hardware instruction where the
// CPU has SSE4.2) for the output shards' running checksums.
#include "alignmerge.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <tuple>
#include <unistd.h>

#include <omp.h>
#if defined(__SSE4_2__)
#include <nmmintrin.h>
#endif

namespace py = pybind11;

namespace alignmerge {
namespace {

constexpr int64_t kParallelCountMin = 1 << 22;  // smaller ranges count on the calling thread

constexpr int64_t kCountLane = 1 << 15;  // elements per narrow-accumulator run (fits the counter's width)

// NaN/Inf of x[0, n): exponent bits all ones. Runs of kCountLane elements accumulate in a counter as wide
// as the element, so the compare-and-add loop vectorises at full SIMD width.
template <class T>
int64_t count_exponent_all_ones(const T* x, int64_t n, T exp_mask) {
  int64_t count = 0;
#pragma omp parallel for reduction(+ : count) schedule(static) if (n >= kParallelCountMin)
  for (int64_t s = 0; s < n; s += kCountLane) {
    const int64_t e = std::min(n, s + kCountLane);
    T run = 0;
    for (int64_t i = s; i < e; ++i) run += static_cast<T>((x[i] & exp_mask) == exp_mask);
    count += run;
  }
  return count;
}

int64_t count_range(const void* ptr, int dtype, int64_t n) {
  if (dtype == kFloat32) return count_exponent_all_ones(static_cast<const uint32_t*>(ptr), n, 0x7f800000u);
  const uint16_t exp_mask = dtype == kBFloat16 ? 0x7f80u : 0x7c00u;
  return count_exponent_all_ones(static_cast<const uint16_t*>(ptr), n, exp_mask);
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

constexpr uint32_t kCrc32cPoly = 0x82F63B78u;  // CRC-32C (Castagnoli), reflected

// a(x) * b(x) mod P in the reflected representation (bit 31 is x^0), as zlib's crc32_combine does it.
uint32_t crc_multmodp(uint32_t a, uint32_t b) {
  uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = (b & 1) ? (b >> 1) ^ kCrc32cPoly : b >> 1;
  }
  return p;
}

// x^(8 n) mod P: appending n bytes multiplies a CRC's register by this.
uint32_t crc_shift_bytes(uint64_t n) {
  uint32_t x2k = 1u << 30;  // x^(2^k), starting at x^1
  for (int k = 0; k < 3; ++k) x2k = crc_multmodp(x2k, x2k);
  uint32_t p = 1u << 31;  // x^0
  for (; n; n >>= 1) {
    if (n & 1) p = crc_multmodp(x2k, p);
    x2k = crc_multmodp(x2k, x2k);
  }
  return p;
}

// CRC-32C of n bytes, continuing from crc (0 to start): crc(A || B) = (crc(A) * x^(8|B|) mod P) ^ crc(B),
// with crc(B) started from 0 (zlib's crc32_combine). The hardware instruction has a 3-cycle latency and
// 1-cycle throughput, so stripes of three independent lanes run about three times faster than one chain.
uint32_t crc32c_bytes(const uint8_t* p, int64_t n, uint32_t crc) {
#if defined(__SSE4_2__)
  constexpr int64_t kLane = 8192;
  static const uint32_t lane_shift = crc_shift_bytes(kLane);
  for (; n >= 3 * kLane; n -= 3 * kLane, p += 3 * kLane) {
    uint64_t a = ~crc & 0xffffffffu, b = 0xffffffffu, c = 0xffffffffu;
    for (int64_t i = 0; i < kLane; i += 8) {
      uint64_t va, vb, vc;
      std::memcpy(&va, p + i, 8);
      std::memcpy(&vb, p + kLane + i, 8);
      std::memcpy(&vc, p + 2 * kLane + i, 8);
      a = _mm_crc32_u64(a, va);
      b = _mm_crc32_u64(b, vb);
      c = _mm_crc32_u64(c, vc);
    }
    crc = crc_multmodp(lane_shift, ~static_cast<uint32_t>(a)) ^ ~static_cast<uint32_t>(b);
    crc = crc_multmodp(lane_shift, crc) ^ ~static_cast<uint32_t>(c);
  }
  uint64_t c = ~crc & 0xffffffffu;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
  }
  for (; n > 0; --n) c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
#else
  uint64_t c = ~crc & 0xffffffffu;
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t v = i;
      for (int k = 0; k < 8; ++k) v = (v >> 1) ^ (kCrc32cPoly & (0u - (v & 1u)));
      t[i] = v;
    }
    return t;
  }();
  for (; n > 0; --n) c = table[(c ^ *p++) & 0xffu] ^ (c >> 8);
#endif
  return static_cast<uint32_t>(~c);
}

uint32_t crc32c(py::buffer data, uint32_t crc) {
  const py::buffer_info info = data.request();
  const int64_t n = info.size * info.itemsize;
  const uint8_t* p = static_cast<const uint8_t*>(info.ptr);
  py::gil_scoped_release release;
  return crc32c_bytes(p, n, crc);
}

}  // namespace

void register_check_ops(py::module_& m) {
  m.def("count_nonfinite", &count_nonfinite, "number of NaN/Inf elements", py::arg("ptr"), py::arg("dtype"),
        py::arg("n"));
  m.def("pread_count_nonfinite", &pread_count_nonfinite,
        "pread into dst in blocks, counting NaN/Inf of each block while cached (dtype -1: no count)",
        py::arg("fd"), py::arg("offset"), py::arg("nbytes"), py::arg("dst"), py::arg("dtype"),
        py::arg("block_bytes"));
  m.def("crc32c", &crc32c, "CRC-32C of a contiguous buffer, continuing from crc", py::arg("data"),
        py::arg("crc") = 0);
}

}  // namespace alignmerge
