// C++ CPU fused MLP-encoder guidance gradient: forward on x (and a0), the latent
// distance gradient, and the backward to the input in one call and one OpenMP region.
//
// Blocking: a layer's forward splits its output neurons across threads and each thread
// reuses every weight row for a block of kRows batch rows (blocked GEMV/GEMM); the
// backward splits the input columns, so each thread owns a slice of the result and
// needs no reduction. One barrier per layer. The hot loops are compiled for several x86
// levels (target_clones) so a portable wheel still uses AVX2/FMA or AVX-512 where present.
// bfloat16: every tensor stored in bf16 (half the bytes of the weights, the kernel's bound at
// control-rate batches), computed in float32 — loads widen, the outputs round once (to nearest
// even, as torch rounds).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "ate_fast/bfloat16.h"
#include "ate_fast/launchers.h"
#include "ate_fast/mlp_guidance.h"

#if defined(__x86_64__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define ATE_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#endif
#endif
#ifndef ATE_CLONES
#define ATE_CLONES
#endif
#define ATE_INLINE inline __attribute__((always_inline))

namespace ate_fast {
namespace {

constexpr int kRows = 4;  // batch rows sharing one pass over a weight row (forward: 8, then 4)
constexpr int64_t kOutChunk = 8;  // forward: output neurons per work item
constexpr int64_t kColChunk = 64; // backward: input columns per work item (threads)
// backward on one thread: one column block up to 2048 wide, so each weight is read in one
// pass over its rows (from the last, where the forward ended: see dense_transposed_rows)
// in long contiguous runs; the gin rows (≤ 4 × 8 KB) stay in L1/L2. With two passes
// (1024 wide) the second found none of the first's rows left in L2.
constexpr int64_t kSerialColChunk = 2048;
// Below this many multiply-adds (forward rows × layer MACs) the whole call runs on one
// thread. A control-rate call (B = 1, a 1600→512→512→1024 encoder: ≈1.2M) takes ~100 µs
// on one core; splitting it over OpenMP threads saves ~30 % on an idle machine but puts
// ~8 barriers in the call, and one descheduled thread stalls every barrier for a time
// slice: on a loaded 2-core machine the median went from 0.13 ms to 0.4 ms (seen here).
constexpr int64_t kParallelMacs = 1 << 21;

// out[r][o] = b[o] + Σ_i W[o][i]·in[r][i] for R rows, outputs [o0, o1).
// Every variant keeps eight independent accumulators (one vector register each after
// `omp simd`), so the FMAs are not one dependent chain: R = 8 rows × 1 output, R = 4
// rows × 2 outputs, R = 1 row × 8 outputs (the control-rate B = 1 case, which would
// otherwise wait on the FMA latency of a single accumulator).
template <typename W, typename T, int R>
ATE_INLINE void dense_rows(const W* __restrict__ w, const W* __restrict__ bias,
                           const T* __restrict__ in, int64_t in_dim, T* __restrict__ out,
                           int64_t out_dim, int64_t o0, int64_t o1) {
  int64_t o = o0;
  if constexpr (R == 1) {
    for (; o + 8 <= o1; o += 8) {
      const W* __restrict__ w0 = w + o * in_dim;
      const W *w1 = w0 + in_dim, *w2 = w1 + in_dim, *w3 = w2 + in_dim;
      const W *w4 = w3 + in_dim, *w5 = w4 + in_dim, *w6 = w5 + in_dim, *w7 = w6 + in_dim;
      T a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
      for (int64_t i = 0; i < in_dim; ++i) {
        const T v = in[i];
        a0 += widen(w0[i]) * v;
        a1 += widen(w1[i]) * v;
        a2 += widen(w2[i]) * v;
        a3 += widen(w3[i]) * v;
        a4 += widen(w4[i]) * v;
        a5 += widen(w5[i]) * v;
        a6 += widen(w6[i]) * v;
        a7 += widen(w7[i]) * v;
      }
      const T acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
      for (int k = 0; k < 8; ++k) out[o + k] = acc[k] + (bias ? T(widen(bias[o + k])) : T(0));
    }
  } else if constexpr (R == 4) {
    for (; o + 2 <= o1; o += 2) {
      const W* __restrict__ wa = w + o * in_dim;
      const W* __restrict__ wb = wa + in_dim;
      const T *i0 = in, *i1 = in + in_dim, *i2 = in + 2 * in_dim, *i3 = in + 3 * in_dim;
      T a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
      for (int64_t i = 0; i < in_dim; ++i) {
        const T va = widen(wa[i]), vb = widen(wb[i]);
        a0 += va * i0[i];
        a1 += va * i1[i];
        a2 += va * i2[i];
        a3 += va * i3[i];
        b0 += vb * i0[i];
        b1 += vb * i1[i];
        b2 += vb * i2[i];
        b3 += vb * i3[i];
      }
      const T ba = bias ? T(widen(bias[o])) : T(0), bb = bias ? T(widen(bias[o + 1])) : T(0);
      out[o] = a0 + ba, out[out_dim + o] = a1 + ba;
      out[2 * out_dim + o] = a2 + ba, out[3 * out_dim + o] = a3 + ba;
      out[o + 1] = b0 + bb, out[out_dim + o + 1] = b1 + bb;
      out[2 * out_dim + o + 1] = b2 + bb, out[3 * out_dim + o + 1] = b3 + bb;
    }
  }
  for (; o < o1; ++o) {  // R = 8, and the outputs left over by the variants above
    const W* __restrict__ wr = w + o * in_dim;
    T acc[R];
    if constexpr (R == 8) {
      T a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
      const T* i0 = in;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
      for (int64_t i = 0; i < in_dim; ++i) {
        const T wv = widen(wr[i]);
        a0 += wv * i0[i];
        a1 += wv * i0[in_dim + i];
        a2 += wv * i0[2 * in_dim + i];
        a3 += wv * i0[3 * in_dim + i];
        a4 += wv * i0[4 * in_dim + i];
        a5 += wv * i0[5 * in_dim + i];
        a6 += wv * i0[6 * in_dim + i];
        a7 += wv * i0[7 * in_dim + i];
      }
      acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
      acc[4] = a4, acc[5] = a5, acc[6] = a6, acc[7] = a7;
    } else {
      for (int k = 0; k < R; ++k) {
        const T* ik = in + k * in_dim;
        T a0 = 0;
#pragma omp simd reduction(+ : a0)
        for (int64_t i = 0; i < in_dim; ++i) a0 += widen(wr[i]) * ik[i];
        acc[k] = a0;
      }
    }
    const T b = bias ? T(widen(bias[o])) : T(0);
    for (int k = 0; k < R; ++k) out[k * out_dim + o] = acc[k] + b;
  }
}

// gin[r][i] = Σ_o delta[r][o]·W[o][i] for R rows, columns [c0, c1): four weight rows per
// pass, so each gin element is loaded and stored once per four multiply-adds.
template <typename W, typename T, int R>
ATE_INLINE void dense_transposed_rows(const W* __restrict__ w, int64_t in_dim, int64_t out_dim,
                                      const T* __restrict__ delta, T* __restrict__ gin,
                                      int64_t c0, int64_t c1) {
  for (int k = 0; k < R; ++k)
    for (int64_t i = c0; i < c1; ++i) gin[k * in_dim + i] = T(0);
  // Weight rows from the last to the first: the forward read them first to last, so the
  // rows it read last (and the layers after it) are still in L2 when the backward starts,
  // and the rows read last here are the first the next call's forward reads.
  const int64_t tail = out_dim % 4;
  for (int64_t o = out_dim - 1; o >= out_dim - tail; --o) {
    const W* __restrict__ wr = w + o * in_dim;
    for (int k = 0; k < R; ++k) {
      const T d = delta[k * out_dim + o];
      T* __restrict__ g = gin + k * in_dim;
#pragma omp simd
      for (int64_t i = c0; i < c1; ++i) g[i] += d * widen(wr[i]);
    }
  }
  for (int64_t o = out_dim - tail - 4; o >= 0; o -= 4) {
    const W* __restrict__ w0 = w + o * in_dim;
    const W* __restrict__ w1 = w0 + in_dim;
    const W* __restrict__ w2 = w1 + in_dim;
    const W* __restrict__ w3 = w2 + in_dim;
    for (int k = 0; k < R; ++k) {
      const T* dk = delta + k * out_dim + o;
      const T d0 = dk[0], d1 = dk[1], d2 = dk[2], d3 = dk[3];
      T* __restrict__ g = gin + k * in_dim;
#pragma omp simd
      for (int64_t i = c0; i < c1; ++i) g[i] += d3 * widen(w3[i]) + d2 * widen(w2[i]) + d1 * widen(w1[i]) + d0 * widen(w0[i]);
    }
  }
}

// W: the weights' storage type; T: the compute type (the activations and gradients).
#define ATE_DEFINE_KERNELS(W, T, SUFFIX)                                                    \
  ATE_CLONES void dense_##SUFFIX(const W* w, const W* bias, const T* in, int64_t rows,      \
                                 int64_t in_dim, T* out, int64_t out_dim, int64_t o0,       \
                                 int64_t o1) {                                              \
    int64_t r = 0;                                                                          \
    for (; r + 8 <= rows; r += 8)                                                           \
      dense_rows<W, T, 8>(w, bias, in + r * in_dim, in_dim, out + r * out_dim, out_dim, o0, \
                          o1);                                                              \
    for (; r + kRows <= rows; r += kRows)                                                   \
      dense_rows<W, T, kRows>(w, bias, in + r * in_dim, in_dim, out + r * out_dim, out_dim, \
                              o0, o1);                                                      \
    for (; r < rows; ++r)                                                                   \
      dense_rows<W, T, 1>(w, bias, in + r * in_dim, in_dim, out + r * out_dim, out_dim, o0, \
                          o1);                                                              \
  }                                                                                         \
  ATE_CLONES void dense_t_##SUFFIX(const W* w, int64_t in_dim, int64_t out_dim, const T* delta, \
                                   int64_t rows, T* gin, int64_t c0, int64_t c1) {          \
    int64_t r = 0;                                                                          \
    for (; r + kRows <= rows; r += kRows)                                                   \
      dense_transposed_rows<W, T, kRows>(w, in_dim, out_dim, delta + r * out_dim,           \
                                         gin + r * in_dim, c0, c1);                         \
    for (; r < rows; ++r)                                                                   \
      dense_transposed_rows<W, T, 1>(w, in_dim, out_dim, delta + r * out_dim,               \
                                     gin + r * in_dim, c0, c1);                             \
  }                                                                                         \
  inline void dense(const W* w, const W* b, const T* in, int64_t rows, int64_t in_dim,      \
                    T* out, int64_t out_dim, int64_t o0, int64_t o1) {                      \
    dense_##SUFFIX(w, b, in, rows, in_dim, out, out_dim, o0, o1);                           \
  }                                                                                         \
  inline void dense_t(const W* w, int64_t in_dim, int64_t out_dim, const T* delta,          \
                      int64_t rows, T* gin, int64_t c0, int64_t c1) {                       \
    dense_t_##SUFFIX(w, in_dim, out_dim, delta, rows, gin, c0, c1);                         \
  }

ATE_DEFINE_KERNELS(float, float, f32)
ATE_DEFINE_KERNELS(double, double, f64)
ATE_DEFINE_KERNELS(Bf16, float, bf16)

template <typename T>
struct Workspace {
  std::vector<T> buffer;
  T* take(size_t n, size_t& offset) {
    T* p = buffer.data() + offset;
    offset += n;
    return p;
  }
};

// S: the storage type of every tensor argument; T: the compute type (see Compute).
template <typename S>
int run(const MlpGuidanceArgs& p) {
  using T = typename Compute<S>::type;
  constexpr bool kWide = std::is_same_v<S, T>;  // float / double: no conversion
  const int L = p.num_layers;
  const int64_t B = p.batch, F = p.dims[0], out_dim = p.dims[L], dz = out_dim / 2;
  const bool with_a0 = p.a0 != nullptr;
  const int64_t rows = with_a0 ? 2 * B : B;  // a0's rows are stacked under x's
  const S* const* W = reinterpret_cast<const S* const*>(p.weights);
  const S* const* bias = reinterpret_cast<const S* const*>(p.biases);
  const S* x = static_cast<const S*>(p.x);
  const S* a0 = static_cast<const S*>(p.a0);
  const S* mask = static_cast<const S*>(p.mask);
  const S* target = static_cast<const S*>(p.target);
  const S* eps = static_cast<const S*>(p.eps);
  S* grad = static_cast<S*>(p.grad);
  S* latent = static_cast<S*>(p.latent);

  // Workspace: h_l for every layer input (rows × dims[l]); act'(pre) for hidden layers
  // (x rows only: a0 needs no backward); the output; two backward buffers.
  int64_t widest = 0, macs = 0;
  size_t total = 0;
  for (int l = 0; l < L; ++l) {
    total += static_cast<size_t>(rows * p.dims[l]);
    if (l > 0) total += static_cast<size_t>(B * p.dims[l]);
    widest = std::max(widest, p.dims[l]);
    macs += p.dims[l] * p.dims[l + 1];
  }
  total += static_cast<size_t>(rows * out_dim + 2 * B * std::max(widest, out_dim));
  thread_local Workspace<T> ws;
  if (ws.buffer.size() < total) ws.buffer.resize(total);
  size_t offset = 0;
  T* h[kMaxMlpLayers];
  T* dact[kMaxMlpLayers] = {nullptr};
  for (int l = 0; l < L; ++l) {
    h[l] = ws.take(static_cast<size_t>(rows * p.dims[l]), offset);
    if (l > 0) dact[l] = ws.take(static_cast<size_t>(B * p.dims[l]), offset);
  }
  T* out = ws.take(static_cast<size_t>(rows * out_dim), offset);
  const int64_t delta_width = std::max(widest, out_dim);
  T* delta[2] = {ws.take(static_cast<size_t>(B * delta_width), offset),
                 ws.take(static_cast<size_t>(B * delta_width), offset)};
  const Activation act = p.activation;
  const T w = static_cast<T>(p.distance_weight);
  const bool parallel = macs * rows >= kParallelMacs;
  // Without ε the log σ² half of the output has zero gradient: its rows of the last weight
  // are neither computed nor read back (one pass less over half of that weight).
  const int64_t used_out = eps ? out_dim : dz;

#pragma omp parallel if (parallel)
  {
    // h_0 = mask ⊙ x (and mask ⊙ a0 below it).
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t b = r < B ? r : r - B;
      const S* src = (r < B ? x : a0) + b * F;
      T* dst = h[0] + r * F;
      if (mask) {
        const S* mrow = mask + b * p.mask_stride;
        for (int64_t f = 0; f < F; ++f) dst[f] = T(widen(src[f])) * T(widen(mrow[f % p.action_dim]));
      } else {
        for (int64_t f = 0; f < F; ++f) dst[f] = T(widen(src[f]));
      }
    }
    // Forward, layer by layer: pre-activations, then act and act' for hidden layers.
    for (int l = 0; l < L; ++l) {
      const int64_t in_dim = p.dims[l], o_dim = p.dims[l + 1];
      const bool last = l == L - 1;
      T* dst = last ? out : h[l + 1];
      const int64_t o_used = last ? used_out : o_dim;
      const int64_t chunks = (o_used + kOutChunk - 1) / kOutChunk;
#pragma omp for schedule(static)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t o0 = c * kOutChunk, o1 = std::min(o0 + kOutChunk, o_used);
        dense(W[l], bias[l], h[l], rows, in_dim, dst, o_dim, o0, o1);
        if (!last) {
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t o = o0; o < o1; ++o) {
              const T u = dst[r * o_dim + o];
              if (r < B) {  // x's rows: the activation and its slope share erf / exp
                activate_with_grad<T>(act, u, dst[r * o_dim + o], dact[l + 1][r * o_dim + o]);
              } else {
                dst[r * o_dim + o] = activate<T>(act, u);
              }
            }
          }
        }
      }
    }
    // Latent distance gradient at the output: δ = ∂y/∂(μ, log σ²) ([B, used_out]).
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const T* o_x = out + b * out_dim;
      const T* o_a = with_a0 ? out + (B + b) * out_dim : nullptr;
      T* d = delta[0] + b * used_out;
      for (int64_t j = 0; j < dz; ++j) {
        const T e = eps ? T(widen(eps[b * dz + j])) : T(0);
        const T sx = eps ? std::exp(T(0.5) * o_x[dz + j]) : T(0);
        const T zx = o_x[j] + sx * e;
        const T zt = with_a0 ? o_a[j] + (eps ? std::exp(T(0.5) * o_a[dz + j]) * e : T(0))
                             : T(widen(target[b * p.target_stride + j]));
        const T dzv = T(-2) * w * (zx - zt);
        d[j] = dzv;
        if (eps) d[dz + j] = dzv * e * T(0.5) * sx;
        if (latent) latent[b * dz + j] = narrow<S>(zx);
      }
    }
    // Backward to the input, layer by layer; the last step applies the mask.
    int cur = 0;
    for (int l = L - 1; l >= 0; --l) {
      const int64_t in_dim = p.dims[l], o_dim = p.dims[l + 1];
      // bf16: the input gradient in float32 first (a delta buffer: its width ≥ dims[0])
      T* dst = l == 0 && kWide ? reinterpret_cast<T*>(grad) : delta[1 - cur];
      const int64_t width = parallel ? kColChunk : kSerialColChunk;
      const int64_t chunks = (in_dim + width - 1) / width;
#pragma omp for schedule(static)
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t c0 = c * width, c1 = std::min(c0 + width, in_dim);
        dense_t(W[l], in_dim, l == L - 1 ? used_out : o_dim, delta[cur], B, dst, c0, c1);
        for (int64_t b = 0; b < B; ++b) {
          T* g = dst + b * in_dim;
          if (l > 0) {
            const T* da = dact[l] + b * in_dim;
            for (int64_t i = c0; i < c1; ++i) g[i] *= da[i];
          } else if (mask) {
            const S* mrow = mask + b * p.mask_stride;
            for (int64_t i = c0; i < c1; ++i) g[i] *= T(widen(mrow[i % p.action_dim]));
          }
        }
      }
      cur = 1 - cur;
    }
    if constexpr (!kWide) {  // round the float32 gradient once into the output
      const T* g = delta[cur];
#pragma omp for schedule(static)
      for (int64_t i = 0; i < B * F; ++i) grad[i] = narrow<S>(g[i]);
    }
  }
  return kOk;
}

}  // namespace

int mlp_guidance_cpu(DType dtype, const MlpGuidanceArgs& args) {
  if (args.num_layers < 1 || args.num_layers > kMaxMlpLayers) return kBadShape;
  if (args.batch < 0 || args.dims[args.num_layers] % 2 != 0) return kBadShape;
  if (args.batch == 0) return kOk;
  if (!args.x || !args.grad || (!args.a0 && !args.target)) return kNullPointer;
  for (int l = 0; l < args.num_layers; ++l)
    if (!args.weights[l] || args.dims[l] <= 0) return kNullPointer;
  switch (dtype) {
    case DType::kFloat32: return run<float>(args);
    case DType::kFloat64: return run<double>(args);
    case DType::kBFloat16: return run<Bf16>(args);
    default: return kBadDType;
  }
}

}  // namespace ate_fast
