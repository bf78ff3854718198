// C++ CPU gated GELU (tanh form) and its backward: one pass over the rows, the inner loop
// vectorised for the widest of AVX-512 / AVX2 / the baseline the CPU runs (GCC's
// target_clones on x86-64 Linux: one build serves every machine), OpenMP over rows for
// large batches. ATen's float32 tanh-GELU runs at ≈ 2 ns per element on one AVX-512 core
// (its tanh is the slow part); σ through a short exp polynomial is ≈ 4× faster
// (benchmarks/README.md, "The flow transformer's gated GELU on the CPU"). Both also take
// bfloat16: chunks of a row widened to float32, the float32 row, each output rounded once.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ate_fast/bfloat16.h"
#include "ate_fast/fast_exp.h"
#include "ate_fast/launchers.h"
#include "ate_fast/vector_clones.h"

namespace ate_fast {
namespace {

// Below this many elements a call runs on the calling thread (waking the pool costs more);
// above, on `threads` threads: the caller passes torch's setting, so a one-thread torch
// run stays on one core.
constexpr int64_t kParallelThreshold = 1 << 16;

constexpr float kTwoSqrt2OverPi = 1.5957691216057308f;  // 2·√(2/π)
constexpr float kCubic = 0.044715f;

// exp(−u) of the tanh-form GELU at g, u = 2√(2/π)(g + 0.044715 g³): σ(u) = 1 / (1 + e),
// and 1 − σ(u) = e·σ(u) without the cancellation of 1 − σ where σ is near 1.
inline float gelu_exp(float g) { return exp_clamped(-kTwoSqrt2OverPi * (g + kCubic * g * g * g)); }

inline float gelu_sigmoid(float g) { return 1.0f / (1.0f + gelu_exp(g)); }

ATE_FAST_VECTOR_CLONES
void forward_row(const float* __restrict__ gate, const float* __restrict__ up,
                 float* __restrict__ out, float* __restrict__ act, int64_t width) {
  if (act != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const float a = gate[i] * gelu_sigmoid(gate[i]);
      act[i] = a;
      out[i] = a * up[i];
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) out[i] = gate[i] * gelu_sigmoid(gate[i]) * up[i];
  }
}

// bf16 rows through forward_row, kBf16Chunk values at a time
ATE_FAST_VECTOR_CLONES
void forward_row_bf16(const Bf16* gate, const Bf16* up, Bf16* out, Bf16* act, int64_t width) {
  alignas(64) float g[kBf16Chunk], u[kBf16Chunk], o[kBf16Chunk], a[kBf16Chunk];
  for (int64_t at = 0; at < width; at += kBf16Chunk) {
    const int64_t n = std::min(kBf16Chunk, width - at);
    widen_into(gate + at, g, n);
    widen_into(up + at, u, n);
    forward_row(g, u, o, act != nullptr ? a : nullptr, n);
    narrow_into(o, out + at, n);
    if (act != nullptr) narrow_into(a, act + at, n);
  }
}

ATE_FAST_VECTOR_CLONES
void backward_row(const float* __restrict__ dm, const float* __restrict__ gate,
                  const float* __restrict__ up, const float* __restrict__ act,
                  float* __restrict__ d_gate, float* __restrict__ d_up, int64_t width) {
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const float g = gate[i];
    const float e = gelu_exp(g);
    const float s = 1.0f / (1.0f + e);
    const float slope = s + g * s * (e * s) * kTwoSqrt2OverPi * (1.0f + 3.0f * kCubic * g * g);
    d_gate[i] = dm[i] * up[i] * slope;
    d_up[i] = dm[i] * act[i];
  }
}

// bf16 rows through backward_row, kBf16Chunk values at a time
ATE_FAST_VECTOR_CLONES
void backward_row_bf16(const Bf16* dm, const Bf16* gate, const Bf16* up, const Bf16* act,
                       Bf16* d_gate, Bf16* d_up, int64_t width) {
  alignas(64) float m[kBf16Chunk], g[kBf16Chunk], u[kBf16Chunk], a[kBf16Chunk];
  alignas(64) float dg[kBf16Chunk], du[kBf16Chunk];
  for (int64_t at = 0; at < width; at += kBf16Chunk) {
    const int64_t n = std::min(kBf16Chunk, width - at);
    widen_into(dm + at, m, n);
    widen_into(gate + at, g, n);
    widen_into(up + at, u, n);
    widen_into(act + at, a, n);
    backward_row(m, g, u, a, dg, du, n);
    narrow_into(dg, d_gate + at, n);
    narrow_into(du, d_up + at, n);
  }
}

bool valid(int64_t rows, int64_t width, int64_t row_stride) {
  return rows >= 0 && width >= 0 && row_stride >= width;
}

}  // namespace

namespace {

// S: float, or Bf16 (its rows through forward_row_bf16)
template <typename S>
void gated_gelu_rows(const GatedGeluArgs& p) {
  const S* gate = static_cast<const S*>(p.gate);
  const S* up = static_cast<const S*>(p.up);
  S* out = static_cast<S*>(p.out);
  S* act = static_cast<S*>(p.act);
  const bool parallel = p.threads > 1 && p.rows * p.width >= kParallelThreshold;
#pragma omp parallel for schedule(static) num_threads(p.threads) if (parallel)
  for (int64_t r = 0; r < p.rows; ++r) {
    S* act_row = act != nullptr ? act + r * p.width : nullptr;
    if constexpr (std::is_same_v<S, Bf16>) {
      forward_row_bf16(gate + r * p.row_stride, up + r * p.row_stride, out + r * p.width,
                       act_row, p.width);
    } else {
      forward_row(gate + r * p.row_stride, up + r * p.row_stride, out + r * p.width, act_row,
                  p.width);
    }
  }
}

}  // namespace

int gated_gelu_cpu(DType dtype, const GatedGeluArgs& p) {
  if (!valid(p.rows, p.width, p.row_stride) || p.threads < 1) return kBadShape;
  if (p.rows == 0 || p.width == 0) return kOk;
  if (p.gate == nullptr || p.up == nullptr || p.out == nullptr) return kNullPointer;
  return by_storage(dtype, [&](auto s) { gated_gelu_rows<decltype(s)>(p); });
}

namespace {

template <typename S>
void gelu_gate_backward_rows(const GeluGateBackwardArgs& p) {
  const S* dm = static_cast<const S*>(p.dm);
  const S* gate = static_cast<const S*>(p.gate);
  const S* up = static_cast<const S*>(p.up);
  const S* act = static_cast<const S*>(p.act);
  S* out = static_cast<S*>(p.out);
  const bool parallel = p.threads > 1 && p.rows * p.width >= kParallelThreshold;
#pragma omp parallel for schedule(static) num_threads(p.threads) if (parallel)
  for (int64_t r = 0; r < p.rows; ++r) {
    S* row = out + r * 2 * p.width;
    if constexpr (std::is_same_v<S, Bf16>) {
      backward_row_bf16(dm + r * p.width, gate + r * p.row_stride, up + r * p.row_stride,
                        act + r * p.width, row, row + p.width, p.width);
    } else {
      backward_row(dm + r * p.width, gate + r * p.row_stride, up + r * p.row_stride,
                   act + r * p.width, row, row + p.width, p.width);
    }
  }
}

}  // namespace

int gelu_gate_backward_cpu(DType dtype, const GeluGateBackwardArgs& p) {
  if (!valid(p.rows, p.width, p.row_stride) || p.threads < 1) return kBadShape;
  if (p.rows == 0 || p.width == 0) return kOk;
  if (p.dm == nullptr || p.gate == nullptr || p.up == nullptr || p.act == nullptr ||
      p.out == nullptr)
    return kNullPointer;
  return by_storage(dtype, [&](auto s) { gelu_gate_backward_rows<decltype(s)>(p); });
}

}  // namespace ate_fast
