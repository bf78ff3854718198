// ate_fast: the guided-step update, shared by the CPU and CUDA kernels.
//
//   out = a·x + b·(m + λ·clamp(c·g, −κ, κ)) + d·m_prev + s·z
//
// x, m, g, m_prev, z are contiguous [B, N] (N = H·D), the coefficients a, b, c, d, s
// are [B] arrays in the compute type, λ (`scale`) and κ (`clamp`) scalars. Every tensor but m may be
// absent (null pointer); an absent tensor drops its term. This header is torch-free
// and CUDA-runtime-free so that a CPU-only torch wheel is enough to build everything.
#pragma once

#include <cstdint>

#include "ate_fast/constants.h"  // DType

#if defined(__CUDACC__)
#define ATE_HD __host__ __device__ __forceinline__
#else
#define ATE_HD inline
#endif

namespace ate_fast {

// Raw arguments of one guided step. Pointers to absent tensors are null.
struct GuidedStepArgs {
  int64_t batch = 0;  // B
  int64_t row = 0;    // N: elements per batch row
  void* out = nullptr;
  const void* x = nullptr;
  const void* m = nullptr;
  const void* g = nullptr;
  const void* m_prev = nullptr;
  const void* z = nullptr;
  // [B] coefficient arrays in the compute type (double for float64 data, else float).
  const void* a = nullptr;
  const void* b = nullptr;
  const void* c = nullptr;
  const void* d = nullptr;
  const void* s = nullptr;
  double scale = 1.0;
  double clamp = 0.0;  // +inf disables the clamp
};

// clamp(u, −k, k) that propagates NaN like torch.clamp (fmin/fmax would drop it).
template <typename C>
ATE_HD C clamp_symmetric(C u, C k) {
  return u < -k ? -k : (u > k ? k : u);
}

// Coefficients of one batch row, in the compute type.
template <typename C>
struct RowCoefficients {
  C a, b, c, d, s, scale, clamp;
};

// Row r's coefficients from the [B] arrays; the arrays of absent terms are not read.
template <typename C>
ATE_HD RowCoefficients<C> row_coefficients(const C* a, const C* b, const C* c, const C* d,
                                           const C* s, int64_t r, bool has_x, bool has_g,
                                           bool has_p, bool has_z, C scale, C clamp) {
  RowCoefficients<C> k{};
  k.a = has_x ? a[r] : C(0);
  k.b = b[r];
  k.c = has_g ? c[r] : C(0);
  k.d = has_p ? d[r] : C(0);
  k.s = has_z ? s[r] : C(0);
  k.scale = scale;
  k.clamp = clamp;
  return k;
}

// One element of the update, evaluated in the order the PyTorch reference uses so
// that CPU results match it bit for bit in float32 and float64. The presence flags are
// compile-time constants on the CPU (the call is inlined and folded) and grid-uniform
// runtime values on the GPU.
template <typename C>
ATE_HD C guided_step_value(const RowCoefficients<C>& k, bool has_x, bool has_g, bool has_p,
                           bool has_z, C x, C m, C g, C mp, C z) {
  C corrected = m;
  if (has_g) corrected = m + k.scale * clamp_symmetric(k.c * g, k.clamp);
  C r = k.b * corrected;
  if (has_x) r = k.a * x + r;
  if (has_p) r = r + k.d * mp;
  if (has_z) r = r + k.s * z;
  return r;
}

// Error codes returned by the launchers (0 = success).
enum Status : int {
  kOk = 0,
  kBadDType = 1,
  kBadShape = 2,
  kNullPointer = 3,
  kCudaError = 4,
};

}  // namespace ate_fast
