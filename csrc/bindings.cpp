// Module definition for alignmerge._C: each kernel family registers itself here.
#include "alignmerge.h"

#include <omp.h>

namespace alignmerge {

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) { mant <<= 1; --exp; }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t absx = x & 0x7fffffffu;
  if (absx > 0x7f800000u) return sign | 0x7e00u;            // NaN
  if (absx >= 0x477ff000u) return sign | 0x7c00u;           // overflow (incl. rounding) -> inf
  if (absx < 0x38800000u) {                                 // subnormal or zero in fp16
    if (absx < 0x33000000u) return sign;                    // rounds to zero
    const uint32_t exp = absx >> 23;
    const uint32_t mant = (absx & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;                       // value = mant * 2^(exp-150), unit 2^-24
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t mid = 1u << (shift - 1);
    uint32_t r = mant >> shift;
    if (rem > mid || (rem == mid && (r & 1u))) ++r;
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t r = absx + 0xfffu + ((absx >> 13) & 1u);       // round to nearest even at bit 13
  r -= 0x38000000u;                                         // rebias 127 -> 15
  return sign | static_cast<uint16_t>(r >> 13);
}

}  // namespace alignmerge

namespace alignmerge { void register_fisher_ops(pybind11::module_& m); }  // csrc/fisher_ops.cpp
namespace alignmerge { void register_projector_ops(pybind11::module_& m); }  // csrc/projector_ops.cpp
namespace alignmerge { void register_check_ops(pybind11::module_& m); }  // csrc/check_ops.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "alignmerge CPU kernels (pybind11 + OpenMP)";
  m.def("get_num_threads", []() { return omp_get_max_threads(); });
  m.def("set_num_threads", [](int n) { omp_set_num_threads(n); });
  alignmerge::register_merge_ops(m);
  alignmerge::register_fisher_ops(m);
  alignmerge::register_projector_ops(m);
  alignmerge::register_check_ops(m);
}
