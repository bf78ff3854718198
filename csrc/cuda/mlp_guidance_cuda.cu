// CUDA fused MLP-encoder guidance gradient: one cooperative kernel per call.
//
// Every block of the grid takes part in every layer; grid.sync() separates the layers
// (the activations live in a small global scratch that stays in L2). Forward: one warp
// per output neuron, lanes stride the input (coalesced weight reads), each weight read
// once per chunk of kRowChunk batch rows. Backward: a block per tile of 32 input columns
// (the weight reads of a warp are coalesced along the row), its warps splitting the
// output range and reducing in shared memory; each weight again read once per chunk of
// rows. Storage in float32/float64/float16/bfloat16, arithmetic in float32
// (float64 for float64). At the batch sizes of real-time control (B ≤ 8) the whole call
// is a handful of microsecond-scale phases instead of ~20 kernel launches.
//
// kUnroll: how many iterations of the layers' dot-product loops are unrolled, i.e. how many
// weight loads each thread has in flight. At B = 1 the loops are latency-bound chains (an
// H200, 2026-12-04: 40 µs per call for a 1600-256-256-128 float32 encoder whose weights
// take well under 1 µs to read): 4 is the kernel measured so far; 16 puts four times as
// many loads in flight per chain (the same adds in the same order: bit-equal results).
// ATE_FAST_MLP_GUIDANCE_UNROLL picks it (ate_fast/ops/mlp_guidance/dispatch.py); 16 has
// never run on a GPU.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "ate_fast/launchers.h"
#include "ate_fast/mlp_guidance.h"
#include "cuda_status.cuh"
#include "dtype_convert.cuh"

namespace cg = cooperative_groups;

namespace ate_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kRowChunk = 8;

template <typename C>
struct Scratch {
  C* h[kMaxMlpLayers];     // layer inputs, rows × dims[l] (h[0] = mask ⊙ x, then a0)
  C* dact[kMaxMlpLayers];  // act'(pre) of hidden layers, B × dims[l]
  C* out;                  // rows × dims[L]
  C* delta[2];             // B × widest
};

template <typename C>
__device__ __forceinline__ C warp_sum(C v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T, int kUnroll>
__global__ void __launch_bounds__(kThreads)
mlp_guidance_kernel(MlpGuidanceArgs p, Scratch<typename Compute<T>::type> s) {
  using C = typename Compute<T>::type;
  cg::grid_group grid = cg::this_grid();
  const int L = p.num_layers;
  const int64_t B = p.batch, F = p.dims[0], out_dim = p.dims[L], dz = out_dim / 2;
  const bool with_a0 = p.a0 != nullptr;
  const int64_t rows = with_a0 ? 2 * B : B;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int lane = threadIdx.x & 31;
  const int64_t warp = tid >> 5, nwarps = nthreads >> 5;
  const T* x = static_cast<const T*>(p.x);
  const T* a0 = static_cast<const T*>(p.a0);
  const T* mask = static_cast<const T*>(p.mask);
  const T* target = static_cast<const T*>(p.target);
  const T* eps = static_cast<const T*>(p.eps);

  // h_0 = mask ⊙ x (rows [0, B)), mask ⊙ a0 (rows [B, 2B)).
  for (int64_t e = tid; e < rows * F; e += nthreads) {
    const int64_t r = e / F, f = e - r * F, b = r < B ? r : r - B;
    C v = load_c((r < B ? x : a0)[b * F + f]);
    if (mask) v *= load_c(mask[b * p.mask_stride + f % p.action_dim]);
    s.h[0][e] = v;
  }
  grid.sync();

  // Forward.
  for (int l = 0; l < L; ++l) {
    const int64_t in_dim = p.dims[l], o_dim = p.dims[l + 1];
    const T* W = static_cast<const T*>(p.weights[l]);
    const T* bias = static_cast<const T*>(p.biases[l]);
    const bool last = l == L - 1;
    C* dst = last ? s.out : s.h[l + 1];
    for (int64_t o = warp; o < o_dim; o += nwarps) {
      const T* wr = W + o * in_dim;
      const C b = bias ? load_c(bias[o]) : C(0);
      for (int64_t r0 = 0; r0 < rows; r0 += kRowChunk) {
        const int nr = static_cast<int>(rows - r0 < kRowChunk ? rows - r0 : kRowChunk);
        C acc[kRowChunk];
#pragma unroll
        for (int k = 0; k < kRowChunk; ++k) acc[k] = C(0);
#pragma unroll kUnroll
        for (int64_t i = lane; i < in_dim; i += 32) {
          const C w = load_c(wr[i]);
#pragma unroll
          for (int k = 0; k < kRowChunk; ++k)
            if (k < nr) acc[k] += w * s.h[l][(r0 + k) * in_dim + i];
        }
#pragma unroll
        for (int k = 0; k < kRowChunk; ++k) {
          if (k >= nr) break;
          const C u = warp_sum(acc[k]) + b;
          if (lane == 0) {
            const int64_t r = r0 + k;
            if (last) {
              dst[r * o_dim + o] = u;
            } else {
              dst[r * o_dim + o] = activate<C>(p.activation, u);
              if (r < B) s.dact[l + 1][r * o_dim + o] = activate_grad<C>(p.activation, u);
            }
          }
        }
      }
    }
    grid.sync();
  }

  // δ = ∂y/∂(μ, log σ²) at the output; z(x) to `latent`.
  const C w = static_cast<C>(p.distance_weight);
  for (int64_t e = tid; e < B * dz; e += nthreads) {
    const int64_t b = e / dz, j = e - b * dz;
    const C* ox = s.out + b * out_dim;
    const C ev = eps ? load_c(eps[b * dz + j]) : C(0);
    const C sx = eps ? exp(C(0.5) * ox[dz + j]) : C(0);
    const C zx = ox[j] + sx * ev;
    C zt;
    if (with_a0) {
      const C* oa = s.out + (B + b) * out_dim;
      zt = oa[j] + (eps ? exp(C(0.5) * oa[dz + j]) * ev : C(0));
    } else {
      zt = load_c(target[b * p.target_stride + j]);
    }
    const C d = C(-2) * w * (zx - zt);
    s.delta[0][b * out_dim + j] = d;
    s.delta[0][b * out_dim + dz + j] = eps ? d * ev * C(0.5) * sx : C(0);
    if (p.latent) static_cast<T*>(p.latent)[b * dz + j] = store_c<T>(zx);
  }
  grid.sync();

  // Backward to the input. A block owns a tile of 32 input columns × kRowChunk rows; its
  // 8 warps split the output range (so each thread's loop is o_dim/8 long, with several
  // weight loads in flight) and reduce through shared memory.
  __shared__ C partial[kThreads / 32][kRowChunk][32];
  const int warp_in_block = threadIdx.x >> 5;
  constexpr int kWarps = kThreads / 32;
  int cur = 0;
  for (int l = L - 1; l >= 0; --l) {
    const int64_t in_dim = p.dims[l], o_dim = p.dims[l + 1];
    const T* W = static_cast<const T*>(p.weights[l]);
    const C* delta = s.delta[cur];
    const int64_t col_tiles = (in_dim + 31) / 32, row_chunks = (B + kRowChunk - 1) / kRowChunk;
    for (int64_t tile = blockIdx.x; tile < col_tiles * row_chunks; tile += gridDim.x) {
      const int64_t i = (tile % col_tiles) * 32 + lane, r0 = (tile / col_tiles) * kRowChunk;
      const int nr = static_cast<int>(B - r0 < kRowChunk ? B - r0 : kRowChunk);
      C acc[kRowChunk];
#pragma unroll
      for (int k = 0; k < kRowChunk; ++k) acc[k] = C(0);
      if (i < in_dim) {
#pragma unroll kUnroll
        for (int64_t o = warp_in_block; o < o_dim; o += kWarps) {
          const C w = load_c(W[o * in_dim + i]);
#pragma unroll
          for (int k = 0; k < kRowChunk; ++k)
            if (k < nr) acc[k] += delta[(r0 + k) * o_dim + o] * w;
        }
      }
#pragma unroll
      for (int k = 0; k < kRowChunk; ++k) partial[warp_in_block][k][lane] = acc[k];
      __syncthreads();
      if (warp_in_block == 0 && i < in_dim) {
        for (int k = 0; k < nr; ++k) {
          C v = C(0);
#pragma unroll
          for (int w = 0; w < kWarps; ++w) v += partial[w][k][lane];
          const int64_t r = r0 + k;
          if (l > 0) {
            s.delta[1 - cur][r * in_dim + i] = v * s.dact[l][r * in_dim + i];
          } else {
            if (mask) v *= load_c(mask[r * p.mask_stride + i % p.action_dim]);
            static_cast<T*>(p.grad)[r * in_dim + i] = store_c<T>(v);
          }
        }
      }
      __syncthreads();  // partial[] is reused by the next tile
    }
    if (l > 0) grid.sync();
    cur = 1 - cur;
  }
}

template <typename C>
int64_t scratch_layout(const MlpGuidanceArgs& p, C* base, Scratch<C>* s) {
  const int L = p.num_layers;
  const int64_t B = p.batch, rows = p.a0 ? 2 * B : B;
  int64_t widest = p.dims[L], off = 0;
  for (int l = 0; l < L; ++l) {
    if (s) s->h[l] = base + off;
    off += rows * p.dims[l];
    if (l > 0) {
      if (s) s->dact[l] = base + off;
      off += B * p.dims[l];
    }
    widest = std::max(widest, p.dims[l]);
  }
  if (s) s->out = base + off;
  off += rows * p.dims[L];
  for (int k = 0; k < 2; ++k) {
    if (s) s->delta[k] = base + off;
    off += B * widest;
  }
  return off;
}

template <typename T>
int launch(const MlpGuidanceArgs& p, void* scratch, int64_t scratch_elems, int device,
           cudaStream_t stream, int unroll) {
  using C = typename Compute<T>::type;
  Scratch<C> s{};
  if (scratch_layout<C>(p, static_cast<C*>(scratch), &s) > scratch_elems) return kBadShape;
  auto kernel = unroll == 16 ? mlp_guidance_kernel<T, 16> : mlp_guidance_kernel<T, 4>;
  int per_sm = 0;
  if (int rc = record_cuda(
          cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0),
          "cudaOccupancyMaxActiveBlocksPerMultiprocessor"))
    return rc;
  // One block per SM is co-resident by construction and already covers the widest layer
  // of a control-rate encoder; more blocks only make grid.sync() slower.
  const int blocks = std::max(1, std::min(per_sm, 1) * sm_count(device));
  MlpGuidanceArgs args = p;
  void* params[] = {&args, &s};
  return record_cuda(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), blocks,
                                                 kThreads, params, 0, stream),
                     "mlp_guidance cooperative launch");
}

}  // namespace

int64_t mlp_guidance_scratch_elements(const MlpGuidanceArgs& args) {
  return scratch_layout<float>(args, nullptr, nullptr);
}

int mlp_guidance_cuda(DType dtype, const MlpGuidanceArgs& args, void* scratch,
                      int64_t scratch_elems, int device, void* stream, int unroll) {
  if (unroll != 4 && unroll != 16) return kBadShape;
  if (args.num_layers < 1 || args.num_layers > kMaxMlpLayers) return kBadShape;
  if (args.batch < 0 || args.dims[args.num_layers] % 2 != 0) return kBadShape;
  if (args.batch == 0) return kOk;
  if (!args.x || !args.grad || (!args.a0 && !args.target) || !scratch) return kNullPointer;
  for (int l = 0; l < args.num_layers; ++l)
    if (!args.weights[l] || args.dims[l] <= 0) return kNullPointer;
  DeviceGuard guard(device);
  if (guard.status() != kOk) return guard.status();
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat32: return launch<float>(args, scratch, scratch_elems, device, st, unroll);
    case DType::kFloat64: return launch<double>(args, scratch, scratch_elems, device, st, unroll);
    case DType::kFloat16: return launch<__half>(args, scratch, scratch_elems, device, st, unroll);
    case DType::kBFloat16: return launch<__nv_bfloat16>(args, scratch, scratch_elems, device, st, unroll);
  }
  return kBadDType;
}

}  // namespace ate_fast
