// Storage <-> compute type conversion for the CUDA kernels: half types compute in
// float32, float64 in float64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ate_fast {

template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename Compute<T>::type load_c(T v) {
  return static_cast<typename Compute<T>::type>(v);
}
template <> __device__ __forceinline__ float load_c<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float load_c<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T store_c(typename Compute<T>::type v) {
  return static_cast<T>(v);
}
template <> __device__ __forceinline__ __half store_c<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 store_c<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace ate_fast
