// C++ CPU RMSNorm and rotary q/k/v epilogue of the flow-transformer block, and their
// input-VJPs (block_norm_rotary.h): each one op where ATen runs five to twelve. On one core of a
// batch-1 step every ATen op costs a few microseconds of dispatch and allocation, more right
// after a GEMM has streamed its weights through the caches (benchmarks/README.md, "The
// flow transformer's norms and rotary positions on the CPU").
#include <cmath>
#include <cstdint>

#include "ate_fast/launchers.h"
#include "ate_fast/vector_clones.h"

namespace ate_fast {
namespace {

constexpr int64_t kParallelThreshold = 1 << 16;  // elements; below, the calling thread

ATE_FAST_VECTOR_CLONES
void norm_row(const float* __restrict__ x, const float* __restrict__ weight,
              float* __restrict__ out, int64_t width, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < width; ++i) sum += x[i] * x[i];
  // as torch.nn.functional.rms_norm rounds in float32: mean, + eps, rsqrt, x·r, then ·w
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(width) + eps);
  if (weight != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) out[i] = (x[i] * inv) * weight[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) out[i] = x[i] * inv;
  }
}

// x·cos + swap_halves(x)·sin over one head's hd values
ATE_FAST_VECTOR_CLONES
void rotate_row(const float* __restrict__ x, const float* __restrict__ cos,
                const float* __restrict__ sin, float* __restrict__ out, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    out[i] = x[i + half] * sin[i] + x[i] * cos[i];
    out[i + half] = x[i] * sin[i + half] + x[i + half] * cos[i + half];
  }
}

ATE_FAST_VECTOR_CLONES
void norm_vjp_row(const float* __restrict__ grad, const float* __restrict__ x,
                  const float* __restrict__ weight, const float* __restrict__ residual,
                  float* __restrict__ out, int64_t width, float eps) {
  float sum = 0.0f, dot = 0.0f;
#pragma omp simd reduction(+ : sum, dot)
  for (int64_t i = 0; i < width; ++i) {
    sum += x[i] * x[i];
    dot += (weight != nullptr ? grad[i] * weight[i] : grad[i]) * x[i];
  }
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(width) + eps);
  // mean(gw·x̂) = inv·mean(gw·x); out = residual + inv·(gw − x·inv·that)
  const float shift = inv * inv * (dot / static_cast<float>(width));
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const float gw = weight != nullptr ? grad[i] * weight[i] : grad[i];
    const float dx = inv * (gw - x[i] * shift);
    out[i] = residual != nullptr ? residual[i] + dx : dx;
  }
}

// y·cos − swap_halves(y)·sin over one head's hd values (rotation by −θ)
ATE_FAST_VECTOR_CLONES
void unrotate_row(const float* __restrict__ y, const float* __restrict__ cos,
                  const float* __restrict__ sin, float* __restrict__ out, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    out[i] = y[i] * cos[i] - y[i + half] * sin[i];
    out[i + half] = y[i + half] * cos[i + half] - y[i] * sin[i + half];
  }
}

// sizes of a rotation over B·H tokens: kv_heads divides heads, an even head dim
bool valid_heads(int64_t batch, int64_t horizon, int64_t heads, int64_t kv_heads, int64_t hd,
                 int threads) {
  return batch >= 0 && horizon >= 0 && heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0 &&
         hd >= 2 && hd % 2 == 0 && threads >= 1;
}

// a rotation's OpenMP split: over tokens, from kParallelThreshold elements moved
bool parallel_tokens(int64_t tokens, int64_t heads, int64_t kv_heads, int64_t hd, int threads) {
  return threads > 1 && tokens * (heads + 2 * kv_heads) * hd >= kParallelThreshold;
}

}  // namespace

int rms_norm_cpu(DType dtype, const RmsNormArgs& p) {
  if (p.rows < 0 || p.width < 0 || p.row_stride < p.width || p.threads < 1 || !(p.eps >= 0.0))
    return kBadShape;
  if (p.rows == 0 || p.width == 0) return kOk;
  if (p.x == nullptr || p.out == nullptr) return kNullPointer;
  if (dtype != DType::kFloat32) return kBadDType;
  const float* x = static_cast<const float*>(p.x);
  const float* weight = static_cast<const float*>(p.weight);
  float* out = static_cast<float*>(p.out);
  const float eps = static_cast<float>(p.eps);
  const bool parallel = p.threads > 1 && p.rows * p.width >= kParallelThreshold;
#pragma omp parallel for schedule(static) num_threads(p.threads) if (parallel)
  for (int64_t r = 0; r < p.rows; ++r)
    norm_row(x + r * p.row_stride, weight, out + r * p.width, p.width, eps);
  return kOk;
}

int rotate_qkv_cpu(DType dtype, const RotateQkvArgs& p) {
  const int64_t hd = p.head_dim;
  if (!valid_heads(p.batch, p.horizon, p.heads, p.kv_heads, hd, p.threads) ||
      p.q_row_stride < p.heads * hd || p.kv_row_stride < 2 * p.kv_heads * hd)
    return kBadShape;
  if (p.batch == 0 || p.horizon == 0) return kOk;
  if (p.q_lin == nullptr || p.kv_lin == nullptr || p.cos == nullptr || p.sin == nullptr ||
      p.q_out == nullptr || p.k_out == nullptr || p.v_out == nullptr)
    return kNullPointer;
  if (dtype != DType::kFloat32) return kBadDType;
  const float* q_lin = static_cast<const float*>(p.q_lin);
  const float* kv_lin = static_cast<const float*>(p.kv_lin);
  const float* cos = static_cast<const float*>(p.cos);
  const float* sin = static_cast<const float*>(p.sin);
  float* q_out = static_cast<float*>(p.q_out);
  float* k_out = static_cast<float*>(p.k_out);
  float* v_out = static_cast<float*>(p.v_out);
  const int64_t group = p.heads / p.kv_heads, half = hd / 2, horizon = p.horizon;
  const int64_t tokens = p.batch * horizon;
  const bool parallel = parallel_tokens(tokens, p.heads, p.kv_heads, hd, p.threads);
#pragma omp parallel for schedule(static) num_threads(p.threads) if (parallel)
  for (int64_t bt = 0; bt < tokens; ++bt) {
    const int64_t b = bt / horizon, t = bt % horizon;
    const float* c = cos + b * p.table_batch_stride + t * hd;
    const float* s = sin + b * p.table_batch_stride + t * hd;
    const float* q_row = q_lin + b * p.q_batch_stride + t * p.q_row_stride;
    const float* kv_row = kv_lin + b * p.kv_batch_stride + t * p.kv_row_stride;
    for (int64_t kvh = 0; kvh < p.kv_heads; ++kvh) {
      // the query heads sharing kv head kvh, token-major: rows t·g … t·g + g − 1
      float* q_dst = q_out + ((b * p.kv_heads + kvh) * horizon * group + t * group) * hd;
      for (int64_t j = 0; j < group; ++j)
        rotate_row(q_row + (kvh * group + j) * hd, c, s, q_dst + j * hd, half);
      const int64_t at = b * p.out_batch_stride + kvh * p.out_head_stride + t * hd;
      rotate_row(kv_row + kvh * hd, c, s, k_out + at, half);
      const float* v_src = kv_row + (p.kv_heads + kvh) * hd;
      float* v_dst = v_out + at;
      for (int64_t i = 0; i < hd; ++i) v_dst[i] = v_src[i];
    }
  }
  return kOk;
}

}  // namespace ate_fast

namespace ate_fast {

int rms_norm_vjp_cpu(DType dtype, const RmsNormVjpArgs& p) {
  if (p.rows < 0 || p.width < 0 || p.threads < 1 || !(p.eps >= 0.0)) return kBadShape;
  if (p.rows == 0 || p.width == 0) return kOk;
  if (p.grad == nullptr || p.x == nullptr || p.out == nullptr) return kNullPointer;
  if (dtype != DType::kFloat32) return kBadDType;
  const float* grad = static_cast<const float*>(p.grad);
  const float* x = static_cast<const float*>(p.x);
  const float* weight = static_cast<const float*>(p.weight);
  const float* residual = static_cast<const float*>(p.residual);
  float* out = static_cast<float*>(p.out);
  const float eps = static_cast<float>(p.eps);
  const int64_t width = p.width;
  const bool parallel = p.threads > 1 && p.rows * width >= kParallelThreshold;
#pragma omp parallel for schedule(static) num_threads(p.threads) if (parallel)
  for (int64_t r = 0; r < p.rows; ++r) {
    norm_vjp_row(grad + r * width, x + r * width, weight,
                 residual != nullptr ? residual + r * width : nullptr, out + r * width, width,
                 eps);
  }
  return kOk;
}

int unrotate_pack_cpu(DType dtype, const UnrotatePackArgs& p) {
  const int64_t hd = p.head_dim;
  if (!valid_heads(p.batch, p.horizon, p.heads, p.kv_heads, hd, p.threads) ||
      p.dq_row_stride < p.heads * hd || p.dkv_row_stride < 2 * p.kv_heads * hd)
    return kBadShape;
  if (p.batch == 0 || p.horizon == 0) return kOk;
  if (p.dq == nullptr || p.dk == nullptr || p.dv == nullptr || p.cos == nullptr ||
      p.sin == nullptr || p.dq_out == nullptr || p.dkv_out == nullptr)
    return kNullPointer;
  if (dtype != DType::kFloat32) return kBadDType;
  const float* dq = static_cast<const float*>(p.dq);
  const float* dk = static_cast<const float*>(p.dk);
  const float* dv = static_cast<const float*>(p.dv);
  const float* cos = static_cast<const float*>(p.cos);
  const float* sin = static_cast<const float*>(p.sin);
  float* dq_out = static_cast<float*>(p.dq_out);
  float* dkv_out = static_cast<float*>(p.dkv_out);
  const int64_t group = p.heads / p.kv_heads, half = hd / 2, horizon = p.horizon;
  const int64_t tokens = p.batch * horizon;
  const bool parallel = parallel_tokens(tokens, p.heads, p.kv_heads, hd, p.threads);
#pragma omp parallel for schedule(static) num_threads(p.threads) if (parallel)
  for (int64_t bt = 0; bt < tokens; ++bt) {
    const int64_t b = bt / horizon, t = bt % horizon;
    const float* c = cos + b * p.table_batch_stride + t * hd;
    const float* s = sin + b * p.table_batch_stride + t * hd;
    float* q_row = dq_out + bt * p.dq_row_stride;
    float* kv_row = dkv_out + bt * p.dkv_row_stride;
    for (int64_t kvh = 0; kvh < p.kv_heads; ++kvh) {
      const float* q_src = dq + ((b * p.kv_heads + kvh) * horizon * group + t * group) * hd;
      for (int64_t j = 0; j < group; ++j)
        unrotate_row(q_src + j * hd, c, s, q_row + (kvh * group + j) * hd, half);
      const int64_t at = ((b * p.kv_heads + kvh) * horizon + t) * hd;
      unrotate_row(dk + at, c, s, kv_row + kvh * hd, half);
      float* v_dst = kv_row + (p.kv_heads + kvh) * hd;
      for (int64_t i = 0; i < hd; ++i) v_dst[i] = dv[at + i];
    }
  }
  return kOk;
}

}  // namespace ate_fast
