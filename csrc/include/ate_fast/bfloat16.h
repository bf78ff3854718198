// bfloat16 storage for the C++ CPU kernels: a bf16 value is the upper half of a float32, so
// widening is a shift and narrowing rounds to nearest, ties to even (NaN stays a quiet NaN).
// The kernels load bf16, compute in float32 and round once at the store. Torch-free.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ate_fast/constants.h"    // DType
#include "ate_fast/guided_step.h"  // Status

#define ATE_FAST_ALWAYS_INLINE inline __attribute__((always_inline))

namespace ate_fast {

struct Bf16 {  // bfloat16 storage: the upper half of a float32
  uint16_t bits;
};

// Compute type of a storage type: bf16 computes in float32, float / double in themselves.
template <typename S>
struct Compute {
  using type = S;
};
template <>
struct Compute<Bf16> {
  using type = float;
};

ATE_FAST_ALWAYS_INLINE float widen(Bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
ATE_FAST_ALWAYS_INLINE float widen(float v) { return v; }
ATE_FAST_ALWAYS_INLINE double widen(double v) { return v; }

template <typename S, typename C>
ATE_FAST_ALWAYS_INLINE S narrow(C v) {
  if constexpr (std::is_same_v<S, Bf16>) {
    uint32_t bits;
    const float f = static_cast<float>(v);
    std::memcpy(&bits, &f, sizeof bits);
    // a select, not a branch, so that loops over rows vectorise
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // to nearest even
    const uint32_t quiet_nan = (bits >> 16) | 0x40u;
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
    return Bf16{static_cast<uint16_t>(nan ? quiet_nan : rounded)};
  } else {
    return static_cast<S>(v);
  }
}

// A launcher's storage type from its dtype: run(S{}) for S = float (kFloat32) or Bf16
// (kBFloat16) and kOk; kBadDType for any other dtype.
template <typename Run>
int by_storage(DType dtype, Run&& run) {
  switch (dtype) {
    case DType::kFloat32: run(float{}); return kOk;
    case DType::kBFloat16: run(Bf16{}); return kOk;
    default: return kBadDType;
  }
}

// Rows of bf16 go through the float32 kernels in chunks of this many values widened into
// float32 buffers on the stack (GCC does not vectorise one loop that mixes the 16-bit loads
// with float32 arithmetic; each of the three passes it does).
constexpr int64_t kBf16Chunk = 256;

ATE_FAST_ALWAYS_INLINE void widen_into(const Bf16* __restrict__ src, float* __restrict__ dst,
                                       int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i]);
}

ATE_FAST_ALWAYS_INLINE void narrow_into(const float* __restrict__ src, Bf16* __restrict__ dst,
                                        int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = narrow<Bf16>(src[i]);
}

}  // namespace ate_fast
