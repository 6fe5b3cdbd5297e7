// Alignment-subspace projector kernels (CPU): P(X) = U A + G Vᵀ with A = UᵀX, G = XV − U(UᵀXV),
// the operator D⊙X + μP(X), and the solver's fused preconditioned-CG step.
//
// One OpenMP parallel region per call, blocks of kRows rows split statically over threads; rows are
// walked in column chunks of kChunk so the rank-r panels A[:, chunk] and Vᵀ[:, chunk] stay in L1/L2
// while the big matrices stream through once. Rank-r products are register-blocked (GCC vector
// extensions: AVX-512/AVX2 as -march allows) with fused multiply-adds. Column reductions (UᵀX, Uᵀz) go to per-thread buffers summed in
// thread order (deterministic for a fixed thread count); row reductions (XV, zV) are per row.
// Storage of X/Y in the projector ops: bf16/fp16/fp32, computed in fp32, rounded once.
// The CG step works on contiguous fp32 state. Launchers: alignmerge/ops/projector.py. GIL released.
#include "alignmerge.h"

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

// Multiply-adds here may fuse (FMA): these kernels need fp32 accuracy, not bit-equality with torch.
#pragma GCC optimize("fp-contract=fast")

namespace py = pybind11;

namespace alignmerge {
namespace {

constexpr int64_t kChunk = 256;

inline float load_elem(const void* p, int dt, int64_t i) {
  switch (dt) {
    case kFloat32: return static_cast<const float*>(p)[i];
    case kBFloat16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default:
#if defined(__F16C__)
      return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
#else
      return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
#endif
  }
}

// dst[0..len) = storage p[start .. start+len) as fp32.
inline void load_chunk(const void* p, int dt, int64_t start, int64_t len, float* __restrict dst) {
  if (dt == kFloat32) {
    std::copy(static_cast<const float*>(p) + start, static_cast<const float*>(p) + start + len, dst);
  } else if (dt == kBFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(p) + start;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      uint32_t u = static_cast<uint32_t>(s[j]) << 16;
      float f;
      std::memcpy(&f, &u, 4);
      dst[j] = f;
    }
  } else {
    for (int64_t j = 0; j < len; ++j) dst[j] = load_elem(p, dt, start + j);
  }
}

inline void store_chunk(void* p, int dt, int64_t start, int64_t len, const float* __restrict src) {
  if (dt == kFloat32) {
    std::copy(src, src + len, static_cast<float*>(p) + start);
  } else if (dt == kBFloat16) {
    uint16_t* d = static_cast<uint16_t*>(p) + start;
    for (int64_t j = 0; j < len; ++j) d[j] = f32_to_bf16(src[j]);
  } else {
    uint16_t* d = static_cast<uint16_t*>(p) + start;
    for (int64_t j = 0; j < len; ++j) {
#if defined(__F16C__)
      d[j] = _cvtss_sh(src[j], _MM_FROUND_TO_NEAREST_INT);
#else
      d[j] = f32_to_f16(src[j]);
#endif
    }
  }
}

// GCC vector extension types (compile to AVX-512, AVX2 or SSE, whatever -march gives); unaligned.
typedef float vf16 __attribute__((vector_size(64), aligned(4)));
constexpr int64_t kVec = 16;

inline vf16 vload(const float* p) { return *reinterpret_cast<const vf16*>(p); }
inline void vstore(float* p, vf16 v) { *reinterpret_cast<vf16*>(p) = v; }

// acc[0..len) (+)= Σ_k c[k]·rows[k*n + j0 + j]: register-blocked over 64 columns (4 independent
// accumulators hide the FMA latency), k innermost, so each panel element is loaded once per row.
inline void rank_update(const float* __restrict c, const float* __restrict rows, int64_t n, int64_t r, int64_t j0,
                        int64_t len, float* __restrict acc) {
  int64_t j = 0;
  for (; j + 4 * kVec <= len; j += 4 * kVec) {
    vf16 s0 = vload(acc + j), s1 = vload(acc + j + kVec), s2 = vload(acc + j + 2 * kVec),
         s3 = vload(acc + j + 3 * kVec);
    const float* base = rows + j0 + j;
    for (int64_t k = 0; k < r; ++k) {
      const float ck = c[k];
      const float* row = base + k * n;
      s0 += ck * vload(row);
      s1 += ck * vload(row + kVec);
      s2 += ck * vload(row + 2 * kVec);
      s3 += ck * vload(row + 3 * kVec);
    }
    vstore(acc + j, s0);
    vstore(acc + j + kVec, s1);
    vstore(acc + j + 2 * kVec, s2);
    vstore(acc + j + 3 * kVec, s3);
  }
  for (; j + kVec <= len; j += kVec) {
    vf16 s0 = vload(acc + j);
    for (int64_t k = 0; k < r; ++k) s0 += c[k] * vload(rows + k * n + j0 + j);
    vstore(acc + j, s0);
  }
  for (; j < len; ++j) {
    float s = acc[j];
    for (int64_t k = 0; k < r; ++k) s += c[k] * rows[k * n + j0 + j];
    acc[j] = s;
  }
}

// low[0..len) = μ·(Σ_k u_i[k]·A[k, j0+j] + Σ_k g_i[k]·Vt[k, j0+j]) for one row chunk.
inline void lowrank_chunk(const float* __restrict ui, const float* __restrict a, const float* __restrict gi,
                          const float* __restrict vt, int64_t n, int64_t r, int64_t j0, int64_t len, float mu,
                          float* __restrict low) {
  std::fill(low, low + len, 0.0f);
  if (ui != nullptr) rank_update(ui, a, n, r, j0, len, low);
  if (gi != nullptr) rank_update(gi, vt, n, r, j0, len, low);
#pragma omp simd
  for (int64_t j = 0; j < len; ++j) low[j] *= mu;
}

// KN dot products Σ_j z[j]·Vt[k0+kk, j0+j] (kk < KN) sharing each load of z; KN fixed so the
// accumulators live in registers.
template <int KN>
inline void row_dots_fixed(const float* __restrict z, const float* __restrict vt, int64_t n, int64_t k0,
                           int64_t j0, int64_t len, float* __restrict rowacc) {
  const int64_t jv = len - len % kVec;
  vf16 s[KN] = {};
  const float* rows[KN];
#pragma GCC unroll 8
  for (int kk = 0; kk < KN; ++kk) rows[kk] = vt + (k0 + kk) * n + j0;
  for (int64_t j = 0; j < jv; j += kVec) {
    const vf16 zj = vload(z + j);
#pragma GCC unroll 8
    for (int kk = 0; kk < KN; ++kk) s[kk] += zj * vload(rows[kk] + j);
  }
  for (int kk = 0; kk < KN; ++kk) {
    float t = 0.0f;
    for (int64_t l = 0; l < kVec; ++l) t += s[kk][l];
    for (int64_t j = jv; j < len; ++j) t += z[j] * rows[kk][j];
    rowacc[k0 + kk] += t;
  }
}

// rowacc[k] += Σ_j z[j]·Vt[k, j0+j] for one row chunk, 8 (then 4, 2, 1) ranks at a time.
inline void row_dots(const float* __restrict z, const float* __restrict vt, int64_t n, int64_t r, int64_t j0,
                     int64_t len, float* __restrict rowacc) {
  int64_t k0 = 0;
  for (; k0 + 8 <= r; k0 += 8) row_dots_fixed<8>(z, vt, n, k0, j0, len, rowacc);
  if (k0 + 4 <= r) { row_dots_fixed<4>(z, vt, n, k0, j0, len, rowacc); k0 += 4; }
  if (k0 + 2 <= r) { row_dots_fixed<2>(z, vt, n, k0, j0, len, rowacc); k0 += 2; }
  if (k0 < r) row_dots_fixed<1>(z, vt, n, k0, j0, len, rowacc);
}

constexpr int64_t kRows = 4;

// colacc[k, j0+j] += Σ_b U[i0+b, k]·z_b[j] over the nb ≤ kRows rows of a row block (z_b = zrows +
// b·kChunk; rows b ≥ nb must hold finite values): kRows multiply-adds per load/store of colacc.
inline void column_update(const float* __restrict zrows, const float* __restrict u_block, int64_t nb, int64_t n,
                          int64_t r, int64_t j0, int64_t len, float* __restrict colacc) {
  const float* z0 = zrows;
  const float* z1 = zrows + kChunk;
  const float* z2 = zrows + 2 * kChunk;
  const float* z3 = zrows + 3 * kChunk;
  for (int64_t k = 0; k < r; ++k) {
    float c[kRows] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t b = 0; b < nb; ++b) c[b] = u_block[b * r + k];
    float* __restrict dst = colacc + k * n + j0;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) dst[j] += c[0] * z0[j] + c[1] * z1[j] + c[2] * z2[j] + c[3] * z3[j];
  }
}

// out[k, j] = Σ_t bufs[t][k, j] in thread order.
void sum_thread_buffers(const std::vector<std::vector<float>>& bufs, int64_t count, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    float s = 0.0f;
    for (const auto& b : bufs) s += b[i];
    out[i] = s;
  }
}

template <typename T>
const T* ptr_or_null(uintptr_t p) {
  return p == 0 ? nullptr : reinterpret_cast<const T*>(p);
}

// ------------------------------------------------------------------------------------------ ops

// ux (r×n) = UᵀX, xv (m×r) = XV; u_ptr / v_ptr (fp32 m×r, n×r) may be 0. vt_ptr: Vᵀ (r×n, fp32).
void projector_factors(uintptr_t x_ptr, int x_dtype, int64_t m, int64_t n, int64_t ld, uintptr_t u_ptr,
                       uintptr_t vt_ptr, int64_t r, uintptr_t ux_ptr, uintptr_t xv_ptr) {
  const void* x = reinterpret_cast<const void*>(x_ptr);
  const float* u = ptr_or_null<float>(u_ptr);
  const float* vt = ptr_or_null<float>(vt_ptr);
  float* ux = reinterpret_cast<float*>(ux_ptr);
  float* xv = reinterpret_cast<float*>(xv_ptr);
  py::gil_scoped_release release;
  const int threads = omp_get_max_threads();
  std::vector<std::vector<float>> col(u != nullptr ? threads : 0);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    float* colacc = nullptr;
    if (u != nullptr) {
      col[t].assign(r * n, 0.0f);
      colacc = col[t].data();
    }
    std::vector<float> buf(kRows * kChunk, 0.0f), rowacc(kRows * r);
#pragma omp for schedule(static)
    for (int64_t i0 = 0; i0 < m; i0 += kRows) {
      const int64_t nb = std::min(kRows, m - i0);
      std::fill(rowacc.begin(), rowacc.end(), 0.0f);
      for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
        const int64_t len = std::min(kChunk, n - j0);
        for (int64_t b = 0; b < nb; ++b) {
          load_chunk(x, x_dtype, (i0 + b) * ld + j0, len, buf.data() + b * kChunk);
          if (vt != nullptr) row_dots(buf.data() + b * kChunk, vt, n, r, j0, len, rowacc.data() + b * r);
        }
        if (u != nullptr) column_update(buf.data(), u + i0 * r, nb, n, r, j0, len, colacc);
      }
      if (vt != nullptr) std::copy(rowacc.begin(), rowacc.begin() + nb * r, xv + i0 * r);
    }
  }
  if (u != nullptr) sum_thread_buffers(col, r * n, ux);
}

// y = D⊙X + μ(U A + G Vᵀ) (D⊙X skipped when d_ptr is 0; U A when u_ptr is 0; G Vᵀ when g_ptr is 0).
void projector_apply(uintptr_t x_ptr, int x_dtype, int64_t ld_x, uintptr_t d_ptr, int d_dtype, int64_t ld_d,
                     uintptr_t u_ptr, uintptr_t a_ptr, uintptr_t g_ptr, uintptr_t vt_ptr, float mu, uintptr_t y_ptr,
                     int y_dtype, int64_t ld_y, int64_t m, int64_t n, int64_t r) {
  const void* x = reinterpret_cast<const void*>(x_ptr);
  const void* d = reinterpret_cast<const void*>(d_ptr);
  const float* u = ptr_or_null<float>(u_ptr);
  const float* a = ptr_or_null<float>(a_ptr);
  const float* g = ptr_or_null<float>(g_ptr);
  const float* vt = ptr_or_null<float>(vt_ptr);
  void* y = reinterpret_cast<void*>(y_ptr);
  py::gil_scoped_release release;
#pragma omp parallel
  {
    std::vector<float> low(kChunk), xb(kChunk), db(kChunk);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
        const int64_t len = std::min(kChunk, n - j0);
        lowrank_chunk(u != nullptr ? u + i * r : nullptr, a, g != nullptr ? g + i * r : nullptr, vt, n, r, j0,
                      len, mu, low.data());
        if (d != nullptr) {
          load_chunk(x, x_dtype, i * ld_x + j0, len, xb.data());
          load_chunk(d, d_dtype, i * ld_d + j0, len, db.data());
#pragma omp simd
          for (int64_t j = 0; j < len; ++j) low[j] += db[j] * xb[j];
        }
        store_chunk(y, y_dtype, i * ld_y + j0, len, low.data());
      }
    }
  }
}

// One fused PCG step on contiguous fp32 m×n state (see alignmerge/ops/projector.py cg_step):
// M = D + μ_M·diag(P); z = r/M; p ← z + βp; q = D⊙p + μ(U A + G Vᵀ); x += αp; r −= αq; z' = r/M.
// sums (5 doubles) = (⟨r,z'⟩, ⟨z',Dz'⟩, ⟨z',Dp⟩, ⟨p,Dp⟩, ⟨r,r⟩); uz = Uᵀz' (r×n); zv = z'V (m×r).
void projector_cg_step(uintptr_t x_ptr, uintptr_t r_ptr, uintptr_t p_ptr, uintptr_t d_ptr, uintptr_t u_ptr,
                       uintptr_t a_ptr, uintptr_t g_ptr, uintptr_t vt_ptr, int64_t m, int64_t n, int64_t rank,
                       float alpha, float beta, float mu, float precond_mu, uintptr_t sums_ptr, uintptr_t uz_ptr,
                       uintptr_t zv_ptr) {
  float* x = reinterpret_cast<float*>(x_ptr);
  float* res = reinterpret_cast<float*>(r_ptr);
  float* p = reinterpret_cast<float*>(p_ptr);
  const float* d = reinterpret_cast<const float*>(d_ptr);
  const float* u = ptr_or_null<float>(u_ptr);
  const float* a = ptr_or_null<float>(a_ptr);
  const float* g = ptr_or_null<float>(g_ptr);
  const float* vt = ptr_or_null<float>(vt_ptr);
  double* sums = reinterpret_cast<double*>(sums_ptr);
  float* uz = reinterpret_cast<float*>(uz_ptr);
  float* zv = reinterpret_cast<float*>(zv_ptr);
  py::gil_scoped_release release;
  // ‖V_j‖² for diag(P)
  std::vector<float> b_sq(vt != nullptr ? n : 0, 0.0f);
  for (int64_t k = 0; vt != nullptr && k < rank; ++k)
    for (int64_t j = 0; j < n; ++j) b_sq[j] += vt[k * n + j] * vt[k * n + j];
  const int threads = omp_get_max_threads();
  std::vector<std::vector<float>> col(u != nullptr ? threads : 0);
  std::vector<double> partial(static_cast<size_t>(threads) * 5, 0.0);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    float* colacc = nullptr;
    if (u != nullptr) {
      col[t].assign(rank * n, 0.0f);
      colacc = col[t].data();
    }
    std::vector<float> low(kChunk), prec(kChunk), z(kRows * kChunk, 0.0f), rowacc(kRows * rank);
    double acc[5] = {0, 0, 0, 0, 0};
#pragma omp for schedule(static)
    for (int64_t i0 = 0; i0 < m; i0 += kRows) {
      const int64_t nb = std::min(kRows, m - i0);
      std::fill(rowacc.begin(), rowacc.end(), 0.0f);
      for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
        const int64_t len = std::min(kChunk, n - j0);
        for (int64_t b = 0; b < nb; ++b) {
          const int64_t i = i0 + b;
          const float* ui = u != nullptr ? u + i * rank : nullptr;
          float a_sq = 0.0f;
          for (int64_t k = 0; ui != nullptr && k < rank; ++k) a_sq += ui[k] * ui[k];
          const int64_t off = i * n + j0;
          float* __restrict xr = x + off;
          float* __restrict rr = res + off;
          float* __restrict pr = p + off;
          const float* __restrict dr = d + off;
          lowrank_chunk(ui, a, g != nullptr ? g + i * rank : nullptr, vt, n, rank, j0, len, mu, low.data());
          float* __restrict pc = prec.data();
          if (precond_mu != 0.0f) {
            if (vt != nullptr) {
              const float* __restrict bs = b_sq.data() + j0;
#pragma omp simd
              for (int64_t j = 0; j < len; ++j) pc[j] = dr[j] + precond_mu * (a_sq + bs[j] - a_sq * bs[j]);
            } else {
#pragma omp simd
              for (int64_t j = 0; j < len; ++j) pc[j] = dr[j] + precond_mu * a_sq;
            }
          } else {
            std::copy(dr, dr + len, pc);
          }
          float* __restrict zc = z.data() + b * kChunk;
          const float* __restrict lc = low.data();
          float s_rz = 0.0f, s_zdz = 0.0f, s_zdp = 0.0f, s_pdp = 0.0f, s_rr = 0.0f;
#pragma omp simd reduction(+ : s_rz, s_zdz, s_zdp, s_pdp, s_rr)
          for (int64_t j = 0; j < len; ++j) {
            const float pn = rr[j] / pc[j] + beta * pr[j];
            const float q = dr[j] * pn + lc[j];
            xr[j] += alpha * pn;
            const float rn = rr[j] - alpha * q;
            const float zn = rn / pc[j];
            rr[j] = rn;
            pr[j] = pn;
            zc[j] = zn;
            const float dz = dr[j] * zn;
            s_rz += rn * zn;
            s_zdz += dz * zn;
            s_zdp += dz * pn;
            s_pdp += dr[j] * pn * pn;
            s_rr += rn * rn;
          }
          acc[0] += s_rz;
          acc[1] += s_zdz;
          acc[2] += s_zdp;
          acc[3] += s_pdp;
          acc[4] += s_rr;
          if (vt != nullptr) row_dots(zc, vt, n, rank, j0, len, rowacc.data() + b * rank);
        }
        if (u != nullptr) column_update(z.data(), u + i0 * rank, nb, n, rank, j0, len, colacc);
      }
      if (vt != nullptr) std::copy(rowacc.begin(), rowacc.begin() + nb * rank, zv + i0 * rank);
    }
    for (int k = 0; k < 5; ++k) partial[t * 5 + k] = acc[k];
  }
  for (int k = 0; k < 5; ++k) {
    double s = 0.0;
    for (int t = 0; t < threads; ++t) s += partial[t * 5 + k];
    sums[k] = s;
  }
  if (u != nullptr) sum_thread_buffers(col, rank * n, uz);
}

}  // namespace

void register_projector_ops(py::module_& m) {
  m.def("projector_factors", &projector_factors, "ux = UᵀX (r×n), xv = XV (m×r) in one read of X",
        py::arg("x_ptr"), py::arg("x_dtype"), py::arg("m"), py::arg("n"), py::arg("ld"), py::arg("u_ptr"),
        py::arg("vt_ptr"), py::arg("r"), py::arg("ux_ptr"), py::arg("xv_ptr"));
  m.def("projector_apply", &projector_apply, "y = D⊙X + μ(U A + G Vᵀ) in one pass", py::arg("x_ptr"),
        py::arg("x_dtype"), py::arg("ld_x"), py::arg("d_ptr"), py::arg("d_dtype"), py::arg("ld_d"), py::arg("u_ptr"),
        py::arg("a_ptr"), py::arg("g_ptr"), py::arg("vt_ptr"), py::arg("mu"), py::arg("y_ptr"), py::arg("y_dtype"),
        py::arg("ld_y"), py::arg("m"), py::arg("n"), py::arg("r"));
  m.def("projector_cg_step", &projector_cg_step, "one fused PCG step on D⊙X + μP(X) (fp32 state)",
        py::arg("x_ptr"), py::arg("r_ptr"), py::arg("p_ptr"), py::arg("d_ptr"), py::arg("u_ptr"), py::arg("a_ptr"),
        py::arg("g_ptr"), py::arg("vt_ptr"), py::arg("m"), py::arg("n"), py::arg("rank"), py::arg("alpha"),
        py::arg("beta"), py::arg("mu"), py::arg("precond_mu"), py::arg("sums_ptr"), py::arg("uz_ptr"),
        py::arg("zv_ptr"));
}

}  // namespace alignmerge
