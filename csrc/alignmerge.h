// Shared declarations for the alignmerge._C CPU kernels.
// Tensors cross the boundary as raw data pointers (uintptr_t) plus sizes; the Python
// launchers in alignmerge/ops validate dtype, device and contiguity before calling.
#pragma once
#include <cstdint>
#include <cstring>
#include <pybind11/pybind11.h>

namespace alignmerge {

// Storage dtype codes shared with alignmerge/ops/_backend.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even, NaN kept quiet (matches torch's float -> bfloat16 cast).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Each kernel family registers its functions on the module.
void register_merge_ops(pybind11::module_& m);

}  // namespace alignmerge
