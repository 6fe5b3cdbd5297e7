// Fused per-sample squared gradients of nn.Linear on CPU (diagonal Fisher):
//   out[o, i] += sum_n (sum_t g[n, t, o] * a[n, t, i])^2
// g [N, T, O] and a [N, T, I] are contiguous fp32 (the Python launcher converts bf16/fp16),
// out [O, I] fp32. An 8 x 32 register tile of the per-sample gradient G_n = g_n^T a_n is built
// over t with AVX-512 FMAs, squared and added into out, so no per-sample gradient is written.
// Loop order: sample n outermost (packed a[n] stays in the thread's L2), each thread owning a
// static range of 8-row blocks of out, no barriers. Without AVX-512 a scalar loop with the same arithmetic is used.
#include "alignmerge.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace py = pybind11;

namespace alignmerge {
namespace {

constexpr int64_t kRows = 8;   // rows of out per register tile
constexpr int64_t kCols = 32;  // columns of out per register tile (two zmm registers)

#if defined(__AVX512F__)
inline __mmask16 lane_mask(int64_t cols, int v) {
  const int64_t k = std::max<int64_t>(0, std::min<int64_t>(16, cols - 16 * v));
  return static_cast<__mmask16>((1u << k) - 1u);
}

// out[o0 + r, i0 : i0 + cols] += (sum_t g[t, o0 + r] a[t, i0 + c])^2 for r < rows, c < cols.
inline void tile_avx512(const float* panel, const float* a, float* out, int64_t T, int64_t I, int64_t o0,
                        int64_t rows, int64_t i0, int64_t cols) {
  constexpr int V = kCols / 16;
  __mmask16 mask[V];
  for (int v = 0; v < V; ++v) mask[v] = lane_mask(cols, v);
  __m512 acc[kRows][V];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* ar = a;
  const float* gp = panel;
  for (int64_t t = 0; t < T; ++t, ar += kCols, gp += kRows) {
    __m512 av[V];
    for (int v = 0; v < V; ++v) av[v] = _mm512_loadu_ps(ar + 16 * v);
    for (int r = 0; r < kRows; ++r) {
      const __m512 b = _mm512_set1_ps(gp[r]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(b, av[v], acc[r][v]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* dst = out + (o0 + r) * I + i0;
    for (int v = 0; v < V; ++v) {
      const __m512 prev = _mm512_maskz_loadu_ps(mask[v], dst + 16 * v);
      _mm512_mask_storeu_ps(dst + 16 * v, mask[v], _mm512_fmadd_ps(acc[r][v], acc[r][v], prev));
    }
  }
}
#endif

inline void tile_scalar(const float* panel, const float* a, float* out, int64_t T, int64_t I, int64_t o0,
                        int64_t rows, int64_t i0, int64_t cols) {
  float acc[kRows][kCols] = {};
  for (int64_t t = 0; t < T; ++t) {
    const float* ar = a + t * kCols;
    const float* gr = panel + t * kRows;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) acc[r][c] += gr[r] * ar[c];
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[(o0 + r) * I + i0 + c] += acc[r][c] * acc[r][c];
}

void fisher_linear(uintptr_t out_ptr, uintptr_t g_ptr, uintptr_t a_ptr, int64_t N, int64_t T, int64_t O,
                   int64_t I) {
  py::gil_scoped_release release;
  float* out = reinterpret_cast<float*>(out_ptr);
  const float* g = reinterpret_cast<const float*>(g_ptr);
  const float* a = reinterpret_cast<const float*>(a_ptr);
  const int64_t row_blocks = (O + kRows - 1) / kRows;
  const int64_t col_blocks = (I + kCols - 1) / kCols;
  // Small problems run on one thread: a parallel region costs more than it saves there.
  const bool parallel = O * I * T * N >= (int64_t{1} << 22) && row_blocks > 1;
#pragma omp parallel if (parallel)
  {
    // a[n] repacked per thread as col_blocks panels of [T, kCols] (zero-padded): contiguous
    // rows for the microkernel instead of a 4*I-byte stride that maps every row to the same
    // L1 sets. Private copies cost T*I per sample and avoid any barrier between threads.
    std::vector<float> apack(static_cast<size_t>(col_blocks * T * kCols));
    std::vector<float> panel(static_cast<size_t>(T * kRows));
    const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t b_begin = row_blocks * tid / nth, b_end = row_blocks * (tid + 1) / nth;
    for (int64_t n = 0; n < N && b_begin < b_end; ++n) {
      const float* gn = g + n * T * O;
      const float* an = a + n * T * I;
      for (int64_t cb = 0; cb < col_blocks; ++cb) {
        const int64_t i0 = cb * kCols, cols = std::min(kCols, I - i0);
        float* dst = apack.data() + cb * T * kCols;
        for (int64_t t = 0; t < T; ++t) {
          for (int64_t c = 0; c < cols; ++c) dst[t * kCols + c] = an[t * I + i0 + c];
          for (int64_t c = cols; c < kCols; ++c) dst[t * kCols + c] = 0.0f;
        }
      }
      for (int64_t b = b_begin; b < b_end; ++b) {
        const int64_t o0 = b * kRows, rows = std::min(kRows, O - o0);
        // pack g[n, :, o0 : o0 + rows] as a [T, kRows] panel (missing rows repeat the last one)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t r = 0; r < kRows; ++r) panel[t * kRows + r] = gn[t * O + o0 + std::min<int64_t>(r, rows - 1)];
        for (int64_t cb = 0; cb < col_blocks; ++cb) {
          const int64_t i0 = cb * kCols, cols = std::min(kCols, I - i0);
          const float* ap = apack.data() + cb * T * kCols;
#if defined(__AVX512F__)
          tile_avx512(panel.data(), ap, out, T, I, o0, rows, i0, cols);
#else
          tile_scalar(panel.data(), ap, out, T, I, o0, rows, i0, cols);
#endif
        }
      }
    }
  }
}

}  // namespace

void register_fisher_ops(py::module_& m) {
  m.def("fisher_linear", &fisher_linear,
        "out[o,i] += sum_n (sum_t g[n,t,o] a[n,t,i])^2 (fp32, contiguous, in place)", py::arg("out_ptr"),
        py::arg("g_ptr"), py::arg("a_ptr"), py::arg("N"), py::arg("T"), py::arg("O"), py::arg("I"));
}

}  // namespace alignmerge
