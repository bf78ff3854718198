// CUDA guided step: grid-stride loop over 16-byte packs (4 fp32, 8 fp16/bf16, 2 fp64),
// compute in float32 (float64 for float64 data). Packs never straddle two batch rows,
// so the [B] coefficients are read once per pack. Falls back to one element per thread
// when a row length is not a multiple of the pack or a pointer is not 16-byte aligned.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>

#include "ate_fast/launchers.h"
#include "cuda_status.cuh"
#include "dtype_convert.cuh"

namespace ate_fast {
namespace {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Flags: bit 0 x, bit 1 g, bit 2 m_prev, bit 3 z. They are uniform across the grid,
// so the branches cost nothing next to the memory traffic; templating them would
// multiply the compile time by sixteen for every architecture.
template <typename T, int VEC>
__global__ void __launch_bounds__(256)
guided_step_kernel(GuidedStepArgs p, int flags, int64_t packs_per_row, int64_t total_packs) {
  using C = typename Compute<T>::type;
  using P = Pack<T, VEC>;
  const P* __restrict__ x = static_cast<const P*>(p.x);
  const P* __restrict__ m = static_cast<const P*>(p.m);
  const P* __restrict__ g = static_cast<const P*>(p.g);
  const P* __restrict__ mp = static_cast<const P*>(p.m_prev);
  const P* __restrict__ z = static_cast<const P*>(p.z);
  P* out = static_cast<P*>(p.out);  // may alias an input (in-place update)
  const C* a = static_cast<const C*>(p.a);
  const C* b = static_cast<const C*>(p.b);
  const C* c = static_cast<const C*>(p.c);
  const C* d = static_cast<const C*>(p.d);
  const C* s = static_cast<const C*>(p.s);
  const bool has_x = flags & 1, has_g = flags & 2, has_p = flags & 4, has_z = flags & 8;
  const C scale = static_cast<C>(p.scale), clamp = static_cast<C>(p.clamp);

  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < total_packs; i += stride) {
    const int64_t r = i / packs_per_row;
    const P vm = m[i];
    P vx, vg, vp, vz;
    if (has_x) vx = x[i];
    if (has_g) vg = g[i];
    if (has_p) vp = mp[i];
    if (has_z) vz = z[i];
    const RowCoefficients<C> k =
        row_coefficients<C>(a, b, c, d, s, r, has_x, has_g, has_p, has_z, scale, clamp);
    P vo;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const C cx = has_x ? load_c(vx.v[j]) : C(0), cg = has_g ? load_c(vg.v[j]) : C(0);
      const C cp = has_p ? load_c(vp.v[j]) : C(0), cz = has_z ? load_c(vz.v[j]) : C(0);
      vo.v[j] = store_c<T>(
          guided_step_value<C>(k, has_x, has_g, has_p, has_z, cx, load_c(vm.v[j]), cg, cp, cz));
    }
    out[i] = vo;
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

template <typename T>
int launch(const GuidedStepArgs& p, int device, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const void* ptrs[] = {p.out, p.x, p.m, p.g, p.m_prev, p.z};
  bool vectorise = p.row % kVec == 0;
  for (const void* ptr : ptrs) vectorise = vectorise && (ptr == nullptr || aligned16(ptr));
  const int flags = (p.x ? 1 : 0) | (p.g ? 2 : 0) | (p.m_prev ? 4 : 0) | (p.z ? 8 : 0);
  const int threads = 256;
  // Enough resident blocks to saturate bandwidth; the grid-stride loop covers the rest.
  const int64_t max_blocks = static_cast<int64_t>(sm_count(device)) * 8;
  if (vectorise) {
    const int64_t per_row = p.row / kVec, total = per_row * p.batch;
    const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, max_blocks));
    guided_step_kernel<T, kVec><<<blocks, threads, 0, stream>>>(p, flags, per_row, total);
  } else {
    const int64_t total = p.row * p.batch;
    const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, max_blocks));
    guided_step_kernel<T, 1><<<blocks, threads, 0, stream>>>(p, flags, p.row, total);
  }
  return record_cuda(cudaGetLastError(), "guided_step kernel launch");
}

}  // namespace

int guided_step_cuda(DType dtype, const GuidedStepArgs& args, int device, void* stream) {
  if (args.batch < 0 || args.row < 0) return kBadShape;
  if (args.batch == 0 || args.row == 0) return kOk;
  if (args.out == nullptr || args.m == nullptr || args.b == nullptr) return kNullPointer;
  if ((args.x && !args.a) || (args.g && !args.c) || (args.m_prev && !args.d) ||
      (args.z && !args.s))
    return kNullPointer;
  DeviceGuard guard(device);
  if (guard.status() != kOk) return guard.status();
  auto st = static_cast<cudaStream_t>(stream);
  int rc = kBadDType;
  switch (dtype) {
    case DType::kFloat32: rc = launch<float>(args, device, st); break;
    case DType::kFloat64: rc = launch<double>(args, device, st); break;
    case DType::kFloat16: rc = launch<__half>(args, device, st); break;
    case DType::kBFloat16: rc = launch<__nv_bfloat16>(args, device, st); break;
  }
  return rc;
}

}  // namespace ate_fast
