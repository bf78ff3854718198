// ate_fast: a branch-free float32 exp for the CPU kernels' vectorised loops (the gated
// GELU's sigmoid, attention's softmax): GCC vectorises a loop that calls it under
// `#pragma omp simd`, which it does not with std::exp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace ate_fast {

// exp(x) for x clamped to [−87, 87] (results stay normal floats: no denormal slow path),
// ≈ 1 ulp: 2ⁿ·p(r), n = round(x/ln 2), r = x − n·ln 2 (ln 2 in two parts), p Cephes'
// degree-7 expf polynomial. Branch-free so that the loop vectorises.
inline float exp_clamped(float x) {
  x = std::min(std::max(x, -87.0f), 87.0f);
  constexpr float kRound = 12582912.0f;  // 1.5·2²³: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2ⁿ, n in [−126, 126]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

}  // namespace ate_fast
