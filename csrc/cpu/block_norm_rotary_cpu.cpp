// C++ CPU RMSNorm and rotary q/k/v epilogue of the flow-transformer block, and their
// input-VJPs (block_norm_rotary.h): each one op where ATen runs five to twelve. On one core of a
// batch-1 step every ATen op costs a few microseconds of dispatch and allocation, more right
// after a GEMM has streamed its weights through the caches (benchmarks/README.md, "The
// flow transformer's norms and rotary positions on the CPU").
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "ate_fast/bfloat16.h"
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

// bf16 rows: widened kBf16Chunk values at a time into float32, computed as norm_row
// computes, each output rounded once
ATE_FAST_VECTOR_CLONES
void norm_row_bf16(const Bf16* x, const Bf16* weight, Bf16* out, int64_t width, float eps) {
  alignas(64) float xf[kBf16Chunk], wf[kBf16Chunk], of[kBf16Chunk];
  float sum = 0.0f;
  for (int64_t at = 0; at < width; at += kBf16Chunk) {
    const int64_t n = std::min(kBf16Chunk, width - at);
    widen_into(x + at, xf, n);
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += xf[i] * xf[i];
  }
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(width) + eps);
  for (int64_t at = 0; at < width; at += kBf16Chunk) {
    const int64_t n = std::min(kBf16Chunk, width - at);
    widen_into(x + at, xf, n);
    if (weight != nullptr) {
      widen_into(weight + at, wf, n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) of[i] = (xf[i] * inv) * wf[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) of[i] = xf[i] * inv;
    }
    narrow_into(of, out + at, n);
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

// the norm VJP's bf16 rows, as norm_row_bf16 (the sums over the whole row first, chunk by
// chunk)
ATE_FAST_VECTOR_CLONES
void norm_vjp_row_bf16(const Bf16* grad, const Bf16* x, const Bf16* weight,
                       const Bf16* residual, Bf16* out, int64_t width, float eps) {
  alignas(64) float gf[kBf16Chunk], xf[kBf16Chunk], wf[kBf16Chunk], of[kBf16Chunk];
  float sum = 0.0f, dot = 0.0f;
  for (int64_t at = 0; at < width; at += kBf16Chunk) {
    const int64_t n = std::min(kBf16Chunk, width - at);
    widen_into(grad + at, gf, n);
    widen_into(x + at, xf, n);
    if (weight != nullptr) {
      widen_into(weight + at, wf, n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) gf[i] *= wf[i];
    }
#pragma omp simd reduction(+ : sum, dot)
    for (int64_t i = 0; i < n; ++i) {
      sum += xf[i] * xf[i];
      dot += gf[i] * xf[i];
    }
  }
  const float inv = 1.0f / std::sqrt(sum / static_cast<float>(width) + eps);
  const float shift = inv * inv * (dot / static_cast<float>(width));
  for (int64_t at = 0; at < width; at += kBf16Chunk) {
    const int64_t n = std::min(kBf16Chunk, width - at);
    widen_into(grad + at, gf, n);
    widen_into(x + at, xf, n);
    if (weight != nullptr) {
      widen_into(weight + at, wf, n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) gf[i] *= wf[i];
    }
    if (residual != nullptr) {
      widen_into(residual + at, of, n);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) of[i] = 0.0f;
    }
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) of[i] += inv * (gf[i] - xf[i] * shift);
    narrow_into(of, out + at, n);
  }
}

// rotate_row or unrotate_row: one head's hd values, pairs (i, half + i)
using PairRow = void (*)(const float*, const float*, const float*, float*, int64_t);

// a PairRow on bf16 values: chunks of n pairs widened into float32 laid out [lo | hi]
ATE_FAST_VECTOR_CLONES
void pairs_bf16(PairRow row, const Bf16* x, const Bf16* cos, const Bf16* sin, Bf16* out,
                int64_t half) {
  constexpr int64_t kPairs = kBf16Chunk / 2;
  alignas(64) float xf[kBf16Chunk], cf[kBf16Chunk], sf[kBf16Chunk], of[kBf16Chunk];
  for (int64_t at = 0; at < half; at += kPairs) {
    const int64_t n = std::min(kPairs, half - at);
    for (int64_t h = 0; h < 2; ++h) {
      widen_into(x + h * half + at, xf + h * n, n);
      widen_into(cos + h * half + at, cf + h * n, n);
      widen_into(sin + h * half + at, sf + h * n, n);
    }
    row(xf, cf, sf, of, n);
    narrow_into(of, out + at, n);
    narrow_into(of + n, out + half + at, n);
  }
}

// a PairRow on S = float or Bf16 values
template <typename S>
inline void pairs(PairRow row, const S* x, const S* cos, const S* sin, S* out, int64_t half) {
  if constexpr (std::is_same_v<S, Bf16>) {
    pairs_bf16(row, x, cos, sin, out, half);
  } else {
    row(x, cos, sin, out, half);
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

namespace {

// S: float, or Bf16 (its rows through norm_row_bf16 / pairs_bf16)
template <typename S>
void rms_norm_rows(const RmsNormArgs& p) {
  const S* x = static_cast<const S*>(p.x);
  const S* weight = static_cast<const S*>(p.weight);
  S* out = static_cast<S*>(p.out);
  const float eps = static_cast<float>(p.eps);
  const bool parallel = p.threads > 1 && p.rows * p.width >= kParallelThreshold;
#pragma omp parallel for schedule(static) num_threads(p.threads) if (parallel)
  for (int64_t r = 0; r < p.rows; ++r) {
    if constexpr (std::is_same_v<S, Bf16>) {
      norm_row_bf16(x + r * p.row_stride, weight, out + r * p.width, p.width, eps);
    } else {
      norm_row(x + r * p.row_stride, weight, out + r * p.width, p.width, eps);
    }
  }
}

template <typename S>
void rotate_qkv_tokens(const RotateQkvArgs& p) {
  const S* q_lin = static_cast<const S*>(p.q_lin);
  const S* kv_lin = static_cast<const S*>(p.kv_lin);
  const S* cos = static_cast<const S*>(p.cos);
  const S* sin = static_cast<const S*>(p.sin);
  S* q_out = static_cast<S*>(p.q_out);
  S* k_out = static_cast<S*>(p.k_out);
  S* v_out = static_cast<S*>(p.v_out);
  const int64_t hd = p.head_dim;
  const int64_t group = p.heads / p.kv_heads, half = hd / 2, horizon = p.horizon;
  const int64_t tokens = p.batch * horizon;
  const bool parallel = parallel_tokens(tokens, p.heads, p.kv_heads, hd, p.threads);
#pragma omp parallel for schedule(static) num_threads(p.threads) if (parallel)
  for (int64_t bt = 0; bt < tokens; ++bt) {
    const int64_t b = bt / horizon, t = bt % horizon;
    const S* c = cos + b * p.table_batch_stride + t * hd;
    const S* s = sin + b * p.table_batch_stride + t * hd;
    const S* q_row = q_lin + b * p.q_batch_stride + t * p.q_row_stride;
    const S* kv_row = kv_lin + b * p.kv_batch_stride + t * p.kv_row_stride;
    for (int64_t kvh = 0; kvh < p.kv_heads; ++kvh) {
      // the query heads sharing kv head kvh, token-major: rows t·g … t·g + g − 1
      S* q_dst = q_out + ((b * p.kv_heads + kvh) * horizon * group + t * group) * hd;
      for (int64_t j = 0; j < group; ++j)
        pairs<S>(rotate_row, q_row + (kvh * group + j) * hd, c, s, q_dst + j * hd, half);
      const int64_t at = b * p.out_batch_stride + kvh * p.out_head_stride + t * hd;
      pairs<S>(rotate_row, kv_row + kvh * hd, c, s, k_out + at, half);
      const S* v_src = kv_row + (p.kv_heads + kvh) * hd;
      S* v_dst = v_out + at;
      for (int64_t i = 0; i < hd; ++i) v_dst[i] = v_src[i];
    }
  }
}

}  // namespace

int rms_norm_cpu(DType dtype, const RmsNormArgs& p) {
  if (p.rows < 0 || p.width < 0 || p.row_stride < p.width || p.threads < 1 || !(p.eps >= 0.0))
    return kBadShape;
  if (p.rows == 0 || p.width == 0) return kOk;
  if (p.x == nullptr || p.out == nullptr) return kNullPointer;
  return by_storage(dtype, [&](auto s) { rms_norm_rows<decltype(s)>(p); });
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
  return by_storage(dtype, [&](auto s) { rotate_qkv_tokens<decltype(s)>(p); });
}

namespace {

template <typename S>
void rms_norm_vjp_rows(const RmsNormVjpArgs& p) {
  const S* grad = static_cast<const S*>(p.grad);
  const S* x = static_cast<const S*>(p.x);
  const S* weight = static_cast<const S*>(p.weight);
  const S* residual = static_cast<const S*>(p.residual);
  S* out = static_cast<S*>(p.out);
  const float eps = static_cast<float>(p.eps);
  const int64_t width = p.width;
  const bool parallel = p.threads > 1 && p.rows * width >= kParallelThreshold;
#pragma omp parallel for schedule(static) num_threads(p.threads) if (parallel)
  for (int64_t r = 0; r < p.rows; ++r) {
    const S* res = residual != nullptr ? residual + r * width : nullptr;
    if constexpr (std::is_same_v<S, Bf16>) {
      norm_vjp_row_bf16(grad + r * width, x + r * width, weight, res, out + r * width, width,
                        eps);
    } else {
      norm_vjp_row(grad + r * width, x + r * width, weight, res, out + r * width, width, eps);
    }
  }
}

template <typename S>
void unrotate_pack_tokens(const UnrotatePackArgs& p) {
  const S* dq = static_cast<const S*>(p.dq);
  const S* dk = static_cast<const S*>(p.dk);
  const S* dv = static_cast<const S*>(p.dv);
  const S* cos = static_cast<const S*>(p.cos);
  const S* sin = static_cast<const S*>(p.sin);
  S* dq_out = static_cast<S*>(p.dq_out);
  S* dkv_out = static_cast<S*>(p.dkv_out);
  const int64_t hd = p.head_dim;
  const int64_t group = p.heads / p.kv_heads, half = hd / 2, horizon = p.horizon;
  const int64_t tokens = p.batch * horizon;
  const bool parallel = parallel_tokens(tokens, p.heads, p.kv_heads, hd, p.threads);
#pragma omp parallel for schedule(static) num_threads(p.threads) if (parallel)
  for (int64_t bt = 0; bt < tokens; ++bt) {
    const int64_t b = bt / horizon, t = bt % horizon;
    const S* c = cos + b * p.table_batch_stride + t * hd;
    const S* s = sin + b * p.table_batch_stride + t * hd;
    S* q_row = dq_out + bt * p.dq_row_stride;
    S* kv_row = dkv_out + bt * p.dkv_row_stride;
    for (int64_t kvh = 0; kvh < p.kv_heads; ++kvh) {
      const S* q_src = dq + ((b * p.kv_heads + kvh) * horizon * group + t * group) * hd;
      for (int64_t j = 0; j < group; ++j)
        pairs<S>(unrotate_row, q_src + j * hd, c, s, q_row + (kvh * group + j) * hd, half);
      const int64_t at = ((b * p.kv_heads + kvh) * horizon + t) * hd;
      pairs<S>(unrotate_row, dk + at, c, s, kv_row + kvh * hd, half);
      S* v_dst = kv_row + (p.kv_heads + kvh) * hd;
      for (int64_t i = 0; i < hd; ++i) v_dst[i] = dv[at + i];
    }
  }
}

}  // namespace

int rms_norm_vjp_cpu(DType dtype, const RmsNormVjpArgs& p) {
  if (p.rows < 0 || p.width < 0 || p.threads < 1 || !(p.eps >= 0.0)) return kBadShape;
  if (p.rows == 0 || p.width == 0) return kOk;
  if (p.grad == nullptr || p.x == nullptr || p.out == nullptr) return kNullPointer;
  return by_storage(dtype, [&](auto s) { rms_norm_vjp_rows<decltype(s)>(p); });
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
  return by_storage(dtype, [&](auto s) { unrotate_pack_tokens<decltype(s)>(p); });
}

}  // namespace ate_fast
