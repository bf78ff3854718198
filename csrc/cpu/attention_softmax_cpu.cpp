// C++ CPU softmax of attention's scores and its backward (attention_softmax.h): one op
// where ATen runs seven to eight, each a few microseconds of dispatch and allocation on a
// batch-1 step's small score rows (benchmarks/README.md, "Attention's softmax backward on
// the CPU"). bfloat16 rows are widened into float32 rows per thread, computed as float32 rows
// are, and p (from the scores) and ds rounded once.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "ate_fast/bfloat16.h"
#include "ate_fast/fast_exp.h"
#include "ate_fast/launchers.h"
#include "ate_fast/vector_clones.h"

namespace ate_fast {
namespace {

constexpr int64_t kParallelThreshold = 1 << 16;  // elements; below, the calling thread
// exp(z) for z under this is 0 in float32 but for denormals: a masked key's −inf too
constexpr float kExpFloor = -87.0f;

// e = exp(s·scale − max) over one row of n scores, into p; returns Σ e (p may not alias s)
ATE_FAST_VECTOR_CLONES
float exp_row(const float* __restrict__ s, float* __restrict__ p, int64_t n, float scale) {
  float peak = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : peak)
  for (int64_t i = 0; i < n; ++i) {
    p[i] = s[i] * scale;  // rounded as torch rounds scores·scale before its softmax
    peak = p[i] > peak ? p[i] : peak;  // a NaN skipped here still reaches every p below
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float z = p[i] - peak;
    const float e = z < kExpFloor ? 0.0f : exp_clamped(z);
    p[i] = e;
    sum += e;
  }
  return sum;
}

// p ·= norm (the softmax's normalisation), then ds = p ⊙ (dp − Σ dp ⊙ p)·scale over one row
ATE_FAST_VECTOR_CLONES
void normalise_grad_row(float* __restrict__ p, const float* __restrict__ dp,
                        float* __restrict__ ds, int64_t n, float norm, float scale) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < n; ++i) {
    p[i] *= norm;
    dot += dp[i] * p[i];
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) ds[i] = (p[i] * (dp[i] - dot)) * scale;
}

// ds = p ⊙ (dp − Σ dp ⊙ p)·scale over one row, p read only
ATE_FAST_VECTOR_CLONES
void grad_row(const float* __restrict__ p, const float* __restrict__ dp,
              float* __restrict__ ds, int64_t n, float scale) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < n; ++i) dot += dp[i] * p[i];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) ds[i] = (p[i] * (dp[i] - dot)) * scale;
}

// one row of float32: ds (and p from the scores) as the kernel computes them
inline void softmax_row(const float* s_row, float* p_row, const float* dp_row, float* ds_row,
                        int64_t n, float scale) {
  if (s_row == nullptr) {
    grad_row(p_row, dp_row, ds_row, n, scale);
  } else {  // the softmax's normalisation rides in the gradient's first pass
    const float sum = exp_row(s_row, p_row, n, scale);
    normalise_grad_row(p_row, dp_row, ds_row, n, 1.0f / sum, scale);
  }
}

void softmax_rows_f32(const SoftmaxBackwardArgs& a, bool parallel) {
  const float* scores = static_cast<const float*>(a.scores);
  float* p = static_cast<float*>(a.p);
  const float* dp = static_cast<const float*>(a.dp);
  float* ds = static_cast<float*>(a.ds);
  const float scale = static_cast<float>(a.scale);
#pragma omp parallel for schedule(static) num_threads(a.threads) if (parallel)
  for (int64_t r = 0; r < a.rows; ++r) {
    softmax_row(scores != nullptr ? scores + r * a.scores_row_stride : nullptr,
                p + r * a.p_row_stride, dp + r * a.dp_row_stride, ds + r * a.ds_row_stride, a.n,
                scale);
  }
}

// bf16: each row widened into a thread's float32 rows (scores or p, dp), the float32 row,
// then p (from the scores) and ds rounded once
void softmax_rows_bf16(const SoftmaxBackwardArgs& a, bool parallel) {
  const Bf16* scores = static_cast<const Bf16*>(a.scores);
  Bf16* p = static_cast<Bf16*>(a.p);
  const Bf16* dp = static_cast<const Bf16*>(a.dp);
  Bf16* ds = static_cast<Bf16*>(a.ds);
  const float scale = static_cast<float>(a.scale);
  const int64_t n = a.n;
#pragma omp parallel num_threads(a.threads) if (parallel)
  {
    std::vector<float> buffer(static_cast<size_t>(4 * n));
    float* sf = buffer.data();
    float* pf = sf + n;
    float* dpf = pf + n;
    float* dsf = dpf + n;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.rows; ++r) {
      Bf16* p_row = p + r * a.p_row_stride;
      if (scores != nullptr) {
        widen_into(scores + r * a.scores_row_stride, sf, n);
      } else {
        widen_into(p_row, pf, n);
      }
      widen_into(dp + r * a.dp_row_stride, dpf, n);
      softmax_row(scores != nullptr ? sf : nullptr, pf, dpf, dsf, n, scale);
      if (scores != nullptr) narrow_into(pf, p_row, n);
      narrow_into(dsf, ds + r * a.ds_row_stride, n);
    }
  }
}

}  // namespace

int softmax_backward_cpu(DType dtype, const SoftmaxBackwardArgs& a) {
  const bool strides_ok = a.p_row_stride >= a.n && a.dp_row_stride >= a.n &&
                          a.ds_row_stride >= a.n &&
                          (a.scores == nullptr || a.scores_row_stride >= a.n);
  if (a.rows < 0 || a.n < 0 || a.threads < 1 || !std::isfinite(a.scale) || !strides_ok)
    return kBadShape;
  if (a.rows == 0 || a.n == 0) return kOk;
  if (a.p == nullptr || a.dp == nullptr || a.ds == nullptr) return kNullPointer;
  const bool parallel = a.threads > 1 && a.rows * a.n >= kParallelThreshold;
  switch (dtype) {
    case DType::kFloat32: softmax_rows_f32(a, parallel); return kOk;
    case DType::kBFloat16: softmax_rows_bf16(a, parallel); return kOk;
    default: return kBadDType;
  }
}

}  // namespace ate_fast
